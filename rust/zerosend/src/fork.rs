//! Telling a process that inherited a driver through `fork()` from the one that created it.
//!
//! A child shares its parent's epoll set, io_uring (its queues are shared memory) and sockets.
//! If it used an inherited driver it would steal the parent's completions, remove the parent's
//! sockets from the shared epoll set, or send into the parent's streams. So every driver
//! remembers the process generation it was created in, and refuses all work in another one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

/// Incremented in every child right after fork, so a check costs one atomic load, no syscall.
static GENERATION: AtomicU64 = AtomicU64::new(0);
static WATCH: Once = Once::new();

extern "C" fn forked() {
    GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// The process this value was taken in (compare with [`current`] later).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Process(u64);

/// The current process, starting the fork watch on first use.
pub(crate) fn current() -> Process {
    WATCH.call_once(|| {
        // SAFETY: registers a child handler that only increments an atomic, which is
        // async-signal-safe as fork handlers must be; nothing is unregistered later.
        let rc = unsafe { libc::pthread_atfork(None, None, Some(forked)) };
        assert_eq!(rc, 0, "pthread_atfork failed: {rc}");
    });
    Process(GENERATION.load(Ordering::Relaxed))
}
