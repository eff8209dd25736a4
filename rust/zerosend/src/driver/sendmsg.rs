//! The sendmsg side of the driver: the per-socket pump that writes the head of each socket's
//! queue (with `MSG_ZEROCOPY`, or by copy), waits for room with EPOLLOUT, and reads zero-copy
//! completions from the socket's error queue.

use std::os::fd::{AsRawFd, RawFd};

use nix::errno::Errno;
use nix::sys::epoll::{EpollEvent, EpollFlags};

use super::{Backend, Driver, SocketId, Tag};
use crate::buf::IoBuf;
use crate::error::Error;
use crate::mutant;
use crate::op::OpKey;
use crate::sys::{self, Transport, IOV_MAX};
use crate::tracker::ZerocopyTracker;

/// Owner of a MSG_ZEROCOPY number that belongs to no send (a datagram that failed after the
/// kernel numbered it).
const UNOWNED: OpKey = OpKey::NEVER;

/// One socket's sendmsg side: its fields are this module's; the rest of the driver asks.
pub(super) struct MsgSocket {
    /// MSG_ZEROCOPY numbers of the calls whose releases are still to come, with their sends.
    tracker: ZerocopyTracker<OpKey>,
    /// SO_ZEROCOPY is on and `tracker` numbers MSG_ZEROCOPY sends: their releases come on the
    /// error queue (the MSG_ZEROCOPY backend, or an io_uring socket that found the ring full).
    error_queue: bool,
    /// EPOLLOUT is armed because the socket buffer was full.
    want_write: bool,
    /// An error the kernel queued for this datagram socket (ICMP), for its next send.
    pending_error: Option<Errno>,
}

impl MsgSocket {
    /// `error_queue`: SO_ZEROCOPY is on, and the kernel numbers the next call `first_number`.
    pub(super) fn new(error_queue: bool, first_number: u32) -> Self {
        Self {
            tracker: ZerocopyTracker::starting_at(first_number),
            error_queue,
            want_write: false,
            pending_error: None,
        }
    }

    /// MSG_ZEROCOPY calls whose releases are still to come.
    pub(super) fn outstanding(&self) -> usize {
        self.tracker.outstanding()
    }

    /// Releases come on the socket's error queue.
    pub(super) fn uses_error_queue(&self) -> bool {
        self.error_queue
    }

    /// SO_ZEROCOPY was just turned on (an io_uring socket sending around a full ring): the
    /// kernel numbers the next call `first_number`.
    pub(super) fn start_error_queue(&mut self, first_number: u32) {
        self.tracker = ZerocopyTracker::starting_at(first_number);
        self.error_queue = true;
    }

    /// The number the kernel gives the socket's next MSG_ZEROCOPY call, if it is known for
    /// sure (nothing outstanding): a later registration of the socket starts from it.
    pub(super) fn number_to_save(&self) -> Option<u32> {
        (self.error_queue && self.tracker.outstanding() == 0).then(|| self.tracker.next_number())
    }
}

impl<T, B: IoBuf> Driver<T, B> {
    /// The socket's epoll event: a stale handle (the socket went, its slot was reused) finds
    /// nothing.
    pub(super) fn process_socket(&mut self, id: SocketId, events: EpollFlags) {
        let Some(entry) = self.sockets.get_mut(id) else {
            return;
        };
        if entry.msg.error_queue && events.contains(EpollFlags::EPOLLERR) {
            self.read_notifications(id);
        }
        let Some(entry) = self.sockets.get_mut(id) else {
            return;
        };
        let writable =
            events.intersects(EpollFlags::EPOLLOUT | EpollFlags::EPOLLERR | EpollFlags::EPOLLHUP);
        if writable && entry.msg.want_write && !entry.queue.is_empty() {
            self.pump(id);
        }
    }

    /// Reads the zero-copy completions waiting on the socket's error queue and releases the
    /// sends they cover.
    pub(super) fn read_notifications(&mut self, id: SocketId) {
        self.read_error_queue(id, false);
    }

    /// Like `read_notifications`, after a zero-copy datagram failed; returns true if the kernel
    /// had numbered it. A datagram that failed while it was being built is not numbered (the
    /// kernel takes its number back), but one built and then dropped on the way out (a full
    /// qdisc, netfilter: `ENOBUFS` or `EPERM` with `IP_RECVERR`) keeps its number, and the skb's
    /// release queues that number's completion during the failing call. Any completion covering
    /// the next number must be that one (later numbers were never issued), so the number is
    /// accounted for and later numbers still match their sends.
    fn read_error_queue(&mut self, id: SocketId, after_failed_datagram: bool) -> bool {
        let mut completions = std::mem::take(&mut self.scratch_completions);
        completions.clear();
        let Some(entry) = self.sockets.get_mut(id) else {
            return false;
        };
        let drained = sys::drain_error_queue(entry.fd.as_raw_fd(), |c| completions.push(c));
        let next = entry.msg.tracker.next_number();
        let numbered = after_failed_datagram
            && completions
                .iter()
                .any(|c| next.wrapping_sub(c.lo) <= c.hi.wrapping_sub(c.lo));
        if numbered {
            entry.msg.tracker.push(UNOWNED);
        }
        self.apply_completions(id, &completions, drained);
        self.scratch_completions = completions;
        numbered
    }

    fn apply_completions(
        &mut self,
        id: SocketId,
        completions: &[sys::ZerocopyCompletion],
        drained: Result<sys::ErrorQueueReport, Errno>,
    ) {
        let Some(entry) = self.sockets.get_mut(id) else {
            return;
        };
        let keys = &mut self.scratch_keys;
        keys.clear();
        let ops = &mut self.ops;
        for c in completions {
            entry.stats.notifications += 1;
            if entry
                .msg
                .tracker
                .oldest()
                .is_some_and(|oldest| oldest != c.lo)
            {
                entry.stats.out_of_order_notifications += 1;
                if mutant::active(mutant::DROP_OUT_OF_ORDER) {
                    continue;
                }
            }
            entry.msg.tracker.complete(c.lo, c.hi, |key| {
                if let Some(op) = ops.get_mut(key) {
                    op.notifications_pending -= 1;
                    op.kernel_copied |= c.copied;
                    keys.push(key);
                }
            });
        }
        match drained {
            Ok(report) => {
                entry.stats.truncated_control_messages += report.truncated;
                if let Some(errno) = report.socket_error {
                    // Reading the error queue took the error from the socket (the kernel clears
                    // its pending error with it), so it is reported from here: on UDP the next
                    // send fails with it, as a plain send() would have.
                    entry.stats.queued_errors += 1;
                    if entry.transport == Transport::Udp {
                        entry.msg.pending_error = Some(errno);
                    }
                }
            }
            // Reading the error queue cannot fail on a live socket; if it does, nothing more will
            // arrive there, so end the stream rather than wait forever.
            Err(e) => self.fail_socket(id, Error::os("reading the socket error queue", e)),
        }
        let released = !self.scratch_keys.is_empty();
        for i in 0..self.scratch_keys.len() {
            let key = self.scratch_keys[i];
            self.try_finish(key);
        }
        if released {
            self.release_arrived(id);
        }
    }

    /// Writes the head of the socket's queue until it is empty or the kernel says wait.
    pub(super) fn pump(&mut self, id: SocketId) {
        loop {
            let Some(entry) = self.sockets.get_mut(id) else {
                return;
            };
            let Some(&key) = entry.queue.front() else {
                if entry.msg.want_write {
                    entry.msg.want_write = false;
                    let tag = Tag::Socket(id).to_raw();
                    let _ = self
                        .epoll
                        .modify(&entry.fd, &mut EpollEvent::new(EpollFlags::EPOLLET, tag));
                }
                return;
            };
            // A chain in the ring holds the head of the stream; the rest waits for it.
            if entry.awaiting_release || entry.ring.holds_the_head() {
                return;
            }
            if let Some(errno) = entry.msg.pending_error.take() {
                self.send_failed(id, key, errno);
                continue;
            }
            let fd = entry.fd.as_raw_fd();
            let op = self.ops.get(key).expect("queued send exists");
            if op.file.is_some() {
                if !self.write_file(id, key, fd) {
                    return;
                }
                continue;
            }
            let zerocopy = op.zerocopy();
            if entry.backend == Backend::IoUring && zerocopy && !op.bypass_ring {
                self.wait_for_ring(id);
                return;
            }
            // Copying sends queued behind each other on a stream go in one sendmsg.
            let datagram = entry.transport == Transport::Udp;
            let coalesce = !zerocopy && !datagram;
            self.scratch_iov.clear();
            for &queued in entry.queue.iter() {
                let op = self.ops.get(queued).expect("queued send exists");
                if queued != key && (!coalesce || op.zerocopy() || op.file.is_some()) {
                    break;
                }
                op.append_remaining(&mut self.scratch_iov, IOV_MAX);
                if self.scratch_iov.len() >= IOV_MAX {
                    break;
                }
            }
            if self.scratch_iov.is_empty() && !datagram {
                // Empty sends on a stream have nothing to write: done without a system call.
                self.advance_queue(id, 0);
                continue;
            }
            // SAFETY: the iovecs were just taken from `op.bufs`, which the op owns until
            // `try_finish` sees every release notification for this call arrive.
            match unsafe { sys::send_vectored(fd, &self.scratch_iov, zerocopy) } {
                Ok(0) if !self.scratch_iov.is_empty() => {
                    // A stream that accepts nothing without an error: wait for room as for EAGAIN.
                    self.wait_writable(id);
                    return;
                }
                Ok(n) => {
                    // The kernel numbered this call: its release comes under that number.
                    let tracked = zerocopy.then(|| self.sockets.get_mut(id)).flatten();
                    if let Some(entry) = tracked {
                        if mutant::active(mutant::RESOLVE_AT_ACCEPTANCE) {
                            entry.msg.tracker.push(UNOWNED);
                        } else if let Some(op) = self.ops.get_mut(key) {
                            entry.msg.tracker.push(key);
                            op.notifications_pending += 1;
                        }
                    }
                    self.advance_queue(id, n);
                }
                Err(Errno::EAGAIN) => {
                    self.wait_writable(id);
                    return;
                }
                Err(e) => {
                    // A numbered datagram was built and then dropped: the refusal to pin memory
                    // that the same errno can mean did not happen, so the send fails.
                    let numbered = zerocopy && datagram && self.read_error_queue(id, true);
                    if numbered || !self.zerocopy_refused(id, key, e) {
                        self.send_failed(id, key, e);
                    } else if self
                        .sockets
                        .get(id)
                        .is_some_and(|entry| entry.awaiting_release)
                    {
                        // Releases may have landed before we looked: read them now.
                        self.read_notifications(id);
                        return;
                    }
                }
            }
        }
    }

    /// Writes what is left of the file send at the head of the queue with one `sendfile(2)`;
    /// returns false when the socket must wait for room.
    fn write_file(&mut self, id: SocketId, key: OpKey, socket: RawFd) -> bool {
        let op = self.ops.get(key).expect("queued send exists");
        let file = op.file.as_ref().expect("a file send");
        let remaining = op.total - op.written;
        if remaining == 0 {
            self.advance_queue(id, 0);
            return true;
        }
        let offset = file.offset + op.written as u64;
        match sys::send_file(socket, file.fd.as_raw_fd(), offset, remaining) {
            Ok(0) => {
                // The file ended early: it was truncated after send_file checked its size. What
                // was sent is already in the stream, so the stream cannot go on: an I/O error,
                // as read(2) of a vanished page is, not an invalid argument.
                let error = Error::os(
                    "sending a file truncated while it was being sent",
                    Errno::EIO,
                );
                self.fail_socket(id, error);
            }
            Ok(n) => self.advance_queue(id, n),
            Err(Errno::EAGAIN) => {
                self.wait_writable(id);
                return false;
            }
            Err(e) => self.send_failed(id, key, e),
        }
        true
    }

    /// The socket buffer is full: arm EPOLLOUT and continue when the kernel makes room.
    pub(super) fn wait_writable(&mut self, id: SocketId) {
        let Some(entry) = self.sockets.get_mut(id) else {
            return;
        };
        entry.stats.eagain_waits += 1;
        if !entry.msg.want_write {
            entry.msg.want_write = true;
            let tag = Tag::Socket(id).to_raw();
            let flags = EpollFlags::EPOLLET | EpollFlags::EPOLLOUT;
            if let Err(e) = self
                .epoll
                .modify(&entry.fd, &mut EpollEvent::new(flags, tag))
            {
                self.fail_socket(id, Error::os("waiting for room in the socket buffer", e));
            }
        }
    }
}
