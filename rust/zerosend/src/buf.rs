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

#[cfg(test)]
mod tests {
    use super::IoBuf;
    use std::sync::Arc;

    /// Every owner of bytes reports the very bytes it owns: the kernel reads `len()` bytes at
    /// `as_ptr()`, so a wrong pointer or length sends other memory.
    fn sends_its_own_bytes<B: IoBuf>(buf: &B, expected: &[u8]) {
        assert_eq!(buf.len(), expected.len());
        assert_eq!(buf.is_empty(), expected.is_empty());
        // SAFETY: IoBuf promises `len()` readable bytes at `as_ptr()` while `buf` lives.
        let seen = unsafe { std::slice::from_raw_parts(buf.as_ptr(), buf.len()) };
        assert_eq!(seen, expected);
    }

    #[test]
    fn each_owner_hands_the_kernel_its_own_bytes() {
        let bytes: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        sends_its_own_bytes(&bytes.clone(), &bytes);
        sends_its_own_bytes(&bytes.clone().into_boxed_slice(), &bytes);
        sends_its_own_bytes(&Arc::<[u8]>::from(bytes.clone()), &bytes);
        let leaked: &'static [u8] = Vec::leak(bytes.clone());
        sends_its_own_bytes(&leaked, &bytes);
    }

    #[test]
    fn only_an_empty_buffer_is_empty() {
        sends_its_own_bytes(&Vec::<u8>::new(), &[]);
        sends_its_own_bytes(&Box::<[u8]>::from(&[][..]), &[]);
        sends_its_own_bytes(&vec![7u8], &[7]);
    }
}
