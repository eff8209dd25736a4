//! The handle of a socket registered with a driver (apart from the driver, which every send
//! names its socket by, so that a send's record does not depend on the driver's module).

use crate::slab::{Key, SlabKey};

/// Handle of a socket registered with a driver: a generation-checked key of its slot, so a
/// handle kept past its socket's removal never names the socket registered there next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SocketId(Key);

impl SlabKey for SocketId {
    fn from_key(key: Key) -> Self {
        Self(key)
    }

    fn key(self) -> Key {
        self.0
    }
}

impl SocketId {
    /// The handle as one integer (for bindings that keep it in a foreign object).
    pub fn to_raw(self) -> u64 {
        self.0.to_raw()
    }

    /// The handle back from [`SocketId::to_raw`]. A stale or made-up value names no socket and
    /// every driver call with it fails with [`Error::Closed`](crate::Error::Closed).
    pub fn from_raw(raw: u64) -> Self {
        Self(Key::from_raw(raw))
    }
}
