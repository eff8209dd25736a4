//! Process-wide facts about the sockets zerosend sends on.
//!
//! Two things outlive a single registration and so cannot live in one driver: a socket must not
//! be registered twice at once (two queues would interleave its bytes, and two MSG_ZEROCOPY
//! trackers would misnumber its completions), and the kernel's MSG_ZEROCOPY counter of a socket
//! keeps counting across registrations, so the next registration must start where the last left.

use std::collections::{HashMap, HashSet};
use std::os::fd::BorrowedFd;
use std::sync::{Mutex, MutexGuard};

use crate::error::{Error, Result};

/// A socket's identity: the inode of its file (stable for the socket's life, shared by dups).
pub type SocketKey = (u64, u64);

#[derive(Default)]
struct Registry {
    live: HashSet<SocketKey>,
    /// Next MSG_ZEROCOPY number of sockets that were registered before and are idle now.
    next_zerocopy_number: HashMap<SocketKey, u32>,
}

/// Bound on remembered counters, so a long-running server does not grow without limit.
const SAVED_COUNTERS: usize = 4096;

static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);

fn registry() -> MutexGuard<'static, Option<Registry>> {
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

/// The identity of the socket behind `fd`.
pub fn socket_key(fd: BorrowedFd<'_>) -> Result<SocketKey> {
    let stat = nix::sys::stat::fstat(fd).map_err(|e| Error::os("fstat on the socket", e))?;
    Ok((stat.st_dev, stat.st_ino))
}

/// Proof that this process sends on the socket through one registration only; released on drop.
#[derive(Debug)]
pub struct Claim {
    key: SocketKey,
}

impl Claim {
    /// Claims the socket, or says that it is already wrapped.
    pub fn acquire(key: SocketKey) -> Result<Self> {
        let mut guard = registry();
        let registry = guard.get_or_insert_with(Registry::default);
        if !registry.live.insert(key) {
            return Err(Error::UnsupportedSocket(
                "this socket is already wrapped by zerosend (possibly with sends still in \
                 flight); send through that wrapper, or aclose() it first"
                    .into(),
            ));
        }
        Ok(Self { key })
    }

    /// Where the kernel's MSG_ZEROCOPY counter stands, if an earlier registration left it known.
    pub fn saved_zerocopy_number(&self) -> Option<u32> {
        registry()
            .as_ref()
            .and_then(|r| r.next_zerocopy_number.get(&self.key).copied())
    }

    /// Records the counter for the socket's next registration (called when nothing is in flight).
    pub fn save_zerocopy_number(&self, next: u32) {
        if let Some(registry) = registry().as_mut() {
            let saved = &mut registry.next_zerocopy_number;
            if saved.len() >= SAVED_COUNTERS && !saved.contains_key(&self.key) {
                // Forgetting one is safe: a socket whose counter is unknown is not given the
                // MSG_ZEROCOPY backend again.
                if let Some(&evict) = saved.keys().next() {
                    saved.remove(&evict);
                }
            }
            saved.insert(self.key, next);
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(registry) = registry().as_mut() {
            registry.live.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The counter tests fill the process's one table: one at a time.
    static COUNTERS: Mutex<()> = Mutex::new(());

    /// Keys no real socket has (a device number of all ones), one range per test.
    fn key(test: u64, n: u64) -> SocketKey {
        (u64::MAX, (test << 32) | n)
    }

    #[test]
    fn a_socket_is_claimed_once_until_its_claim_is_dropped() {
        let first = Claim::acquire(key(1, 0)).unwrap();
        assert!(Claim::acquire(key(1, 0)).is_err(), "wrapped twice at once");
        assert!(Claim::acquire(key(1, 1)).is_ok(), "another socket");
        drop(first);
        assert!(
            Claim::acquire(key(1, 0)).is_ok(),
            "free again once released"
        );
    }

    #[test]
    fn the_counter_is_kept_for_the_next_registration() {
        let _serial = COUNTERS.lock().unwrap_or_else(|p| p.into_inner());
        let claim = Claim::acquire(key(2, 0)).unwrap();
        assert_eq!(
            claim.saved_zerocopy_number(),
            None,
            "never registered before"
        );
        claim.save_zerocopy_number(7);
        drop(claim);
        let again = Claim::acquire(key(2, 0)).unwrap();
        assert_eq!(again.saved_zerocopy_number(), Some(7));
        // Other sockets' counters do not push it out while there is room
        for n in 1..50 {
            Claim::acquire(key(2, n))
                .unwrap()
                .save_zerocopy_number(n as u32);
        }
        assert_eq!(again.saved_zerocopy_number(), Some(7));
    }

    #[test]
    fn the_saved_counters_are_bounded() {
        let _serial = COUNTERS.lock().unwrap_or_else(|p| p.into_inner());
        for n in 0..(SAVED_COUNTERS as u64 + 10) {
            Claim::acquire(key(3, n)).unwrap().save_zerocopy_number(1);
        }
        let saved = registry()
            .as_ref()
            .map_or(0, |r| r.next_zerocopy_number.len());
        assert!(saved <= SAVED_COUNTERS, "{saved} counters kept");
    }
}
