//! The ordered per-socket queue: sends wait in call order, the head is written (in parts if the
//! kernel takes it in parts), and a send completes only when it is written and released.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;

use nix::errno::Errno;

use super::{Backend, Completion, Driver, SocketId, SocketStats};
use crate::buf::IoBuf;
use crate::error::Error;
use crate::op::{CopyReason, Mode, OpKey};
use crate::registry::Claim;
use crate::sys::Transport;
use crate::tracker::ZerocopyTracker;

/// One registered socket.
pub(super) struct Entry<T> {
    pub(super) fd: OwnedFd,
    /// This registration's exclusive hold on the socket, released when the entry goes.
    pub(super) claim: Claim,
    pub(super) transport: Transport,
    pub(super) backend: Backend,
    pub(super) fallback_reason: Option<String>,
    pub(super) threshold: usize,
    /// Sends with bytes still to write, oldest first; only the head is being written.
    pub(super) queue: VecDeque<OpKey>,
    /// Sends not yet released (queued or awaiting notifications).
    pub(super) inflight: usize,
    pub(super) tracker: ZerocopyTracker<OpKey>,
    /// SO_ZEROCOPY is on and `tracker` numbers MSG_ZEROCOPY sends: their releases come on the
    /// error queue (the MSG_ZEROCOPY backend, or an io_uring socket that found the ring full).
    pub(super) error_queue: bool,
    /// EPOLLOUT is armed because the socket buffer was full.
    pub(super) want_write: bool,
    /// ENOBUFS/ENOMEM: wait for a release before writing again.
    pub(super) awaiting_release: bool,
    /// io_uring release notifications still to come for this socket's sends.
    pub(super) ring_releases_pending: usize,
    /// Requests of this socket's chain in the ring still without their first completion.
    pub(super) ring_chain: usize,
    /// Listed in the driver's `ring_waiting`: has zero-copy sends for the next chain.
    pub(super) ring_waiting: bool,
    /// An error the kernel queued for this datagram socket (ICMP), for its next send.
    pub(super) pending_error: Option<Errno>,
    /// A fatal error ended the stream; later sends fail with it.
    pub(super) failed: Option<Error>,
    pub(super) drain_waiters: Vec<T>,
    pub(super) closing: bool,
    pub(super) stats: SocketStats,
}

impl<T, B: IoBuf> Driver<T, B> {
    /// The kernel would not send this zero-copy send as such: it refused to pin more memory
    /// (ENOBUFS/ENOMEM: `net.core.optmem_max` or `RLIMIT_MEMLOCK`), or a datagram's pages need
    /// more fragments than one skb holds (EMSGSIZE). If the socket has releases to come, wait for
    /// them and try again; otherwise send it by copy, which needs neither, so the stream never
    /// gets a hole. Returns false if `errno` is not such a refusal.
    pub(super) fn zerocopy_refused(&mut self, id: SocketId, key: OpKey, errno: Errno) -> bool {
        let Some(entry) = self.sockets.get_mut(id) else {
            return false;
        };
        let op = self.ops.get_mut(key).expect("the send exists");
        let refusal = match errno {
            Errno::ENOBUFS | Errno::ENOMEM => true,
            Errno::EMSGSIZE => entry.transport == Transport::Udp,
            _ => false,
        };
        if !refusal || !op.zerocopy() {
            return false;
        }
        // Releases of other sends may free memory; this send's own (a failed io_uring request
        // still notifies) would only bring it back here.
        let pending = entry.tracker.outstanding() + entry.ring_releases_pending;
        let releases_to_come = pending > op.notifications_pending as usize;
        if errno != Errno::EMSGSIZE && releases_to_come {
            entry.stats.enobufs_waits += 1;
            entry.awaiting_release = true;
        } else {
            entry.stats.zerocopy_refusals += 1;
            op.mode = Mode::Copy(CopyReason::KernelFallback);
        }
        true
    }

    /// Credits `n` bytes the kernel accepted to the sends at the head of the socket's queue
    /// (one sendmsg may gather several copying sends) and dequeues those now fully written.
    pub(super) fn advance_queue(&mut self, id: SocketId, mut n: usize) {
        let Some(entry) = self.sockets.get_mut(id) else {
            return;
        };
        let mut finished = std::mem::take(&mut self.scratch_finished);
        finished.clear();
        while let Some(&key) = entry.queue.front() {
            let op = self.ops.get_mut(key).expect("queued send exists");
            let take = (op.total - op.written).min(n);
            op.written += take;
            n -= take;
            if op.written < op.total && entry.transport == Transport::Tcp {
                if take > 0 {
                    entry.stats.short_sends += 1;
                }
                break;
            }
            entry.queue.pop_front();
            op.queued = false;
            finished.push(key);
            if entry.transport == Transport::Udp {
                break; // one sendmsg, one datagram
            }
        }
        for &key in &finished {
            self.try_finish(key);
        }
        self.scratch_finished = finished;
    }

    /// Resumes writing a socket that waited for releases (ENOBUFS/ENOMEM) now that one came.
    pub(super) fn release_arrived(&mut self, id: SocketId) {
        let Some(entry) = self.sockets.get_mut(id) else {
            return;
        };
        if std::mem::take(&mut entry.awaiting_release) {
            self.pump(id);
        }
    }

    /// A send of socket `id` failed with `errno` before all its bytes were written.
    pub(super) fn send_failed(&mut self, id: SocketId, key: OpKey, errno: Errno) {
        let Some(entry) = self.sockets.get_mut(id) else {
            return;
        };
        let op = self.ops.get_mut(key).expect("failed send exists");
        if !op.queued {
            return;
        }
        let error = Error::os("sending on the socket", errno);
        // A datagram failure leaves the socket usable: fail just this send. On a stream any
        // failure leaves a hole or a torn message, so the stream ends.
        if entry.transport == Transport::Udp {
            entry.queue.pop_front();
            op.queued = false;
            op.error = Some(error);
            self.try_finish(key);
        } else {
            self.fail_socket(id, error);
        }
    }

    /// Ends the stream: every send still queued fails with `error`. Sends already written keep
    /// waiting for their release notifications.
    pub(super) fn fail_socket(&mut self, id: SocketId, error: Error) {
        let Some(entry) = self.sockets.get_mut(id) else {
            return;
        };
        entry.failed = Some(error.clone());
        let keys: Vec<OpKey> = entry.queue.drain(..).collect();
        for key in keys {
            if let Some(op) = self.ops.get_mut(key) {
                op.queued = false;
                op.error = Some(error.clone());
            }
            self.try_finish(key);
        }
    }

    /// Completes the send if the kernel can no longer read its buffers.
    pub(super) fn try_finish(&mut self, key: OpKey) {
        if !self.ops.get(key).is_some_and(|op| op.released()) {
            return;
        }
        let op = self.ops.remove(key).expect("checked above");
        let id = op.socket;
        let entry = self
            .sockets
            .get_mut(id)
            .expect("a send's socket outlives it");
        entry.inflight -= 1;
        let stats = &mut entry.stats;
        stats.sends += 1;
        let total = op.total as u64;
        if op.error.is_some() {
            stats.errors += 1;
        } else {
            match op.mode {
                Mode::ZeroCopy if !op.kernel_copied => stats.bytes_zerocopy += total,
                Mode::ZeroCopy | Mode::Copy(CopyReason::KernelFallback) => {
                    stats.bytes_copied_by_kernel += total
                }
                Mode::Copy(CopyReason::BelowThreshold) => {
                    stats.bytes_copied_below_threshold += total
                }
                Mode::Copy(CopyReason::Requested) => stats.bytes_copied_requested += total,
                Mode::Copy(CopyReason::Backend) => stats.bytes_copied_backend += total,
                Mode::Copy(CopyReason::RingFull) => stats.bytes_copied_ring_full += total,
                Mode::Copy(CopyReason::File) => stats.bytes_sendfile += total,
            }
            let copied = match op.mode {
                Mode::ZeroCopy => op.kernel_copied,
                Mode::Copy(reason) => reason != CopyReason::File,
            };
            if copied {
                stats.bytes_copied += total;
            }
            if op.fixed.is_some() {
                stats.fixed_buffer_sends += 1;
            }
        }
        let (token, result, bufs, lease) = op.finish();
        if self.inline == Some(key) {
            self.inline_done = Some((token, result, bufs));
        } else {
            self.completions.push(Completion::Send {
                token,
                result,
                bufs,
            });
        }
        if entry.inflight == 0 {
            for token in entry.drain_waiters.drain(..) {
                self.completions.push(Completion::Drained { token });
            }
            if entry.closing {
                self.remove_entry(id);
            }
        }
        if let Some(lease) = lease {
            self.lease_dropped(lease);
        }
    }

    pub(super) fn remove_entry(&mut self, id: SocketId) {
        if let Some(entry) = self.sockets.remove(id) {
            let _ = self.epoll.delete(&entry.fd);
            if entry.error_queue && entry.tracker.outstanding() == 0 {
                entry
                    .claim
                    .save_zerocopy_number(entry.tracker.next_number());
            }
            for token in entry.drain_waiters {
                self.completions.push(Completion::Drained { token });
            }
        }
    }
}
