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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_of_fork_is_another_process() {
        let parent = current();
        // SAFETY: the child only loads an atomic and calls _exit (async-signal-safe), as the
        // child of a multi-threaded process may.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let code = if current() != parent { 0 } else { 1 };
            // SAFETY: ends the child at once, without running the parent's exit handlers.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for the child just forked; `status` is a valid out-pointer.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(waited, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the child saw its parent's process generation"
        );
        assert_eq!(current(), parent, "the parent is still itself");
    }
}
