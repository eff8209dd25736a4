//! Buffers the kernel may read after the send call returned.

/// Memory that zerosend can hand to the kernel and keep until the kernel lets go.
///
/// # Safety
/// Implementors promise that `[as_ptr(), as_ptr() + len())` is readable memory that stays valid
/// and at the same address for as long as the value lives, even when the value itself is moved.
/// zerosend moves the value into its in-flight record and drops it only after the kernel's release
/// notification, so this promise is what makes zero-copy transmit sound.
pub unsafe trait IoBuf: 'static {
    /// Start of the bytes to send.
    fn as_ptr(&self) -> *const u8;
    /// Number of bytes to send.
    fn len(&self) -> usize;
    /// True when there is nothing to send.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// SAFETY: a Vec's heap allocation does not move when the Vec is moved and is not
// reallocated while we only hold it (no push through a shared owner is possible).
unsafe impl IoBuf for Vec<u8> {
    fn as_ptr(&self) -> *const u8 {
        self.as_slice().as_ptr()
    }
    fn len(&self) -> usize {
        self.as_slice().len()
    }
}

// SAFETY: a boxed slice's allocation is fixed for the life of the box.
unsafe impl IoBuf for Box<[u8]> {
    fn as_ptr(&self) -> *const u8 {
        (**self).as_ptr()
    }
    fn len(&self) -> usize {
        (**self).len()
    }
}

// SAFETY: 'static data lives for the whole program and never moves.
unsafe impl IoBuf for &'static [u8] {
    fn as_ptr(&self) -> *const u8 {
        (**self).as_ptr()
    }
    fn len(&self) -> usize {
        (**self).len()
    }
}

// SAFETY: the Arc keeps the shared allocation alive and in place while any clone lives.
unsafe impl IoBuf for std::sync::Arc<[u8]> {
    fn as_ptr(&self) -> *const u8 {
        (**self).as_ptr()
    }
    fn len(&self) -> usize {
        (**self).len()
    }
}
