//! The io_uring side of the driver: the ring's creation, SEND_ZC / SENDMSG_ZC submission and
//! the two completions of each request: the result, then the release notification.
//!
//! Order: a socket's queued zero-copy sends go to the kernel as one chain of linked requests
//! (`IOSQE_IO_LINK`), each with `MSG_WAITALL`. The kernel starts a linked request only after the
//! one before it finished, and `MSG_WAITALL` makes a request finish only when all its bytes were
//! taken (or it failed), so the chain's bytes enter the stream in order with no round trip to
//! user space between sends. A request that ends short (an error after part of it was taken)
//! fails the link: the requests behind it complete with `ECANCELED` having sent nothing. A
//! socket has at most one chain in the kernel at a time; once every request of the chain has its
//! first completion, the unsent rest (the short request's remainder first) forms the next chain.
//!
//! Sharing: the ring's room (the completions it can take) is shared by every socket. A flush
//! gives each socket with sends waiting at most an equal share of it (its chain is cut there),
//! and a socket it cannot place is skipped, not waited on: the sockets behind it still get
//! theirs, and it keeps its place in line for the room that completions free. If no completion
//! at all comes back for `RING_STALL_LIMIT` while sockets wait (the ring is held by requests to
//! peers that do not read), a timer in the epoll set wakes the loop and the waiting sockets send
//! by sendmsg instead (MSG_ZEROCOPY, or copy), counted in `ring_full_sends`, rather than wait
//! on those peers.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::epoll::{EpollEvent, EpollFlags};

use super::regions::FIXED_SLOTS;
use super::{Driver, SocketId, Tag};
use crate::buf::IoBuf;
use crate::error::{errno_of, Error, Result};
use crate::mutant;
use crate::op::{CopyReason, Mode, OpKey};
use crate::region::SlotLease;
use crate::ring::{RequestTag, Ring, RingEvent, VectoredRequest};
use crate::sys::{self, IOV_MAX};

/// Ring sizes to try, largest first, as (submission, completion) queue entries. Many sockets'
/// chains go to the kernel in one `io_uring_enter`; every send posts two completions, and no
/// more sends are queued than the completion queue can take, so the kernel never holds
/// completions back: 16,384 entries (256 KiB of shared memory) keep 8,192 sends in the kernel
/// at once. Ring memory counts against RLIMIT_MEMLOCK for a process without CAP_IPC_LOCK, so a
/// small limit gets the small ring (512 sends at once; the others wait their turn).
const RING_SIZES: [(u32, u32); 2] = [(1024, 16384), (256, 1024)];
/// Longest chain of one socket's sends in the kernel at once.
const MAX_CHAIN: usize = 64;
/// How long sockets wait for room in the ring while no ring completion at all comes back (the
/// ring is held by requests to peers that do not read) before they send around it.
const RING_STALL_LIMIT: Duration = Duration::from_millis(100);

/// One socket's part in the ring: its fields are this module's; the rest of the driver asks.
#[derive(Debug, Default)]
pub(super) struct RingSocket {
    /// Release notifications still to come for this socket's requests.
    releases_pending: usize,
    /// Requests of this socket's chain in the ring still without their first completion.
    chain: usize,
    /// Listed in the driver's `ring_waiting`: has zero-copy sends for the next chain.
    waiting: bool,
}

impl RingSocket {
    /// Release notifications still to come for this socket's requests.
    pub(super) fn releases_pending(&self) -> usize {
        self.releases_pending
    }

    /// A chain of this socket's requests is in the kernel: it holds the head of the stream, so
    /// nothing else of the socket may be written until it completed.
    pub(super) fn holds_the_head(&self) -> bool {
        self.chain > 0
    }
}

impl<T, B: IoBuf> Driver<T, B> {
    pub(super) fn ensure_ring(&mut self) -> std::result::Result<(), String> {
        if self.ring.is_some() {
            return Ok(());
        }
        self.capabilities.io_uring_send_zc.clone()?;
        let mut created = Err(std::io::Error::from_raw_os_error(libc::ENOMEM));
        for (sq_entries, cq_entries) in RING_SIZES {
            created = Ring::new(sq_entries, cq_entries, self.single_issuer);
            if !matches!(&created, Err(e) if e.raw_os_error() == Some(libc::ENOMEM)) {
                break;
            }
        }
        let ring = created.map_err(|e| format!("creating the io_uring failed: {e}"))?;
        let timer = sys::timer_create()
            .map_err(|e| format!("creating the io_uring's wait timer failed: {e}"))?;
        self.epoll
            .add(
                &timer,
                EpollEvent::new(EpollFlags::EPOLLIN, Tag::RingTimer.to_raw()),
            )
            .map_err(|e| format!("watching the io_uring's wait timer failed: {e}"))?;
        self.ring_timer = Some(timer);
        if !self.ring_apart {
            self.watch_ring_in_epoll(ring.fd())
                .map_err(|e| format!("watching the io_uring failed: {e}"))?;
        }
        if let Err(e) = ring.reserve_fixed_slots(FIXED_SLOTS as u32) {
            self.fixed_unavailable = Some(format!("reserving fixed-buffer slots failed: {e}"));
        }
        self.ring = Some(ring);
        self.register_all_regions();
        Ok(())
    }

    pub(super) fn watch_ring_in_epoll(&self, fd: RawFd) -> nix::Result<()> {
        let event = EpollEvent::new(
            EpollFlags::EPOLLIN | EpollFlags::EPOLLET,
            Tag::Ring.to_raw(),
        );
        // SAFETY: the descriptor is the ring's, which lives in this driver as long as the epoll
        // set; it leaves the set when the ring is watched apart or dropped with the driver.
        self.epoll.add(unsafe { BorrowedFd::borrow_raw(fd) }, event)
    }

    pub(super) fn process_ring(&mut self) -> Result<()> {
        let mut events = std::mem::take(&mut self.scratch_events);
        events.clear();
        let reaped = match self.ring.as_mut() {
            Some(ring) => ring.reap(&mut events),
            None => Ok(()),
        };
        if !events.is_empty() {
            // The ring moves: sockets waiting for room get it as its requests complete.
            self.ring_stalled_since = None;
        }
        for event in events.iter().copied() {
            // A request's tag names the op's slot only (its 64 bits hold the request number
            // too). The op there is the request's: an op leaves its slot only once every
            // completion of its requests arrived, so none can name a slot reused since.
            match event {
                RingEvent::Released {
                    key,
                    request,
                    copied,
                } => {
                    if let Some(key) = self.ops.key_at(key) {
                        self.ring_released(key, request, copied);
                    }
                }
                RingEvent::Sent {
                    key,
                    request,
                    res,
                    more,
                } => {
                    if let Some(key) = self.ops.key_at(key) {
                        self.ring_sent(key, request, res, more);
                    }
                }
            }
        }
        self.scratch_events = events;
        reaped.map_err(|e| Error::os("reaping io_uring completions", errno_of(&e)))
    }

    /// A release notification. The kernel does not keep to its own flags here: a request
    /// cancelled behind a failed link member completes without `IORING_CQE_F_MORE` and still
    /// notifies, and a failed request may notify before its result arrives. So notifications
    /// are matched by request number: one a result announced releases; one that came first
    /// is remembered for the result; any other is for a request that sent nothing, and ignored.
    fn ring_released(&mut self, key: OpKey, request: u32, copied: bool) {
        let Some(op) = self.ops.get_mut(key) else {
            return;
        };
        let announced = op.ring_notifications.iter().position(|&r| r == request);
        if let Some(position) = announced {
            op.ring_notifications.swap_remove(position);
            op.notifications_pending -= 1;
        } else if op.in_ring && op.request == request {
            op.notified_before_result = true;
        }
        if announced.is_some() || op.notified_before_result {
            op.kernel_copied |= copied;
        }
        let socket = op.socket;
        if let Some(entry) = self.sockets.get_mut(socket) {
            entry.stats.notifications += 1;
            if announced.is_some() {
                entry.ring.releases_pending -= 1;
            }
        }
        self.try_finish(key);
        self.release_arrived(socket);
    }

    fn ring_sent(&mut self, key: OpKey, request: u32, res: i32, more: bool) {
        let Some(op) = self.ops.get_mut(key) else {
            return;
        };
        op.in_ring = false;
        let id = op.socket;
        let queued = op.queued;
        let notified = std::mem::take(&mut op.notified_before_result);
        let notification_to_come =
            more && !notified && !mutant::active(mutant::RESOLVE_AT_ACCEPTANCE);
        if notification_to_come {
            op.notifications_pending += 1;
            op.ring_notifications.push(request);
        }
        let Some(entry) = self.sockets.get_mut(id) else {
            return;
        };
        if notification_to_come {
            entry.ring.releases_pending += 1;
        }
        entry.ring.chain -= 1;
        let chain_done = entry.ring.chain == 0;
        if chain_done {
            self.ring_chains -= 1;
        }
        if res >= 0 {
            if queued {
                self.advance_queue(id, res as usize);
            }
        } else {
            match Errno::from_raw(-res) {
                // Cancelled behind a request that failed or ended short: nothing was sent, the
                // send is resubmitted with the next chain.
                Errno::ECANCELED | Errno::EAGAIN | Errno::EINTR => {}
                e if self.zerocopy_refused(id, key, e) => {}
                e => self.send_failed(id, key, e),
            }
        }
        self.try_finish(key);
        if chain_done {
            self.pump(id);
        }
    }

    /// The socket has zero-copy sends to queue in the ring: the next [`Driver::flush`] queues
    /// them, together with every other socket's, so that all the sends of one event loop turn
    /// on a socket form one chain and all sockets' chains go to the kernel in one system call.
    pub(super) fn wait_for_ring(&mut self, id: SocketId) {
        let Some(entry) = self.sockets.get_mut(id) else {
            return;
        };
        if !entry.ring.waiting {
            entry.ring.waiting = true;
            self.ring_waiting.push_back(id);
        }
    }

    /// Queues the socket's unsent zero-copy sends, oldest first, as one linked chain (see the
    /// module comment) of at most `share` requests, as far as the ring has room; returns false
    /// if it had none.
    fn submit_chain(&mut self, id: SocketId, share: usize) -> bool {
        let Some(entry) = self.sockets.get_mut(id) else {
            return true;
        };
        if entry.ring.chain > 0 || entry.awaiting_release {
            return true;
        }
        let fd = entry.fd.as_raw_fd();
        let mut chain = std::mem::take(&mut self.scratch_keys);
        chain.clear();
        for &key in entry.queue.iter() {
            let op = self.ops.get(key).expect("queued send exists");
            if !op.zerocopy() || op.in_ring || op.bypass_ring || chain.len() == share.min(MAX_CHAIN)
            {
                break;
            }
            chain.push(key);
        }
        let ring = self
            .ring
            .as_mut()
            .expect("io_uring sockets exist only with a ring");
        let room = match ring.room(chain.len()) {
            Ok(room) => room,
            Err(e) => {
                self.scratch_keys = chain;
                self.fail_socket(id, Error::os("submitting to io_uring", errno_of(&e)));
                return true;
            }
        };
        if room == 0 && !chain.is_empty() {
            self.scratch_keys = chain;
            return false;
        }
        chain.truncate(room);
        entry.ring.chain = chain.len();
        if !chain.is_empty() {
            self.ring_chains += 1;
        }
        for (i, &key) in chain.iter().enumerate() {
            let link = i + 1 < chain.len();
            self.push_request(key, fd, link);
        }
        self.scratch_keys = chain;
        true
    }

    fn push_request(&mut self, key: OpKey, fd: RawFd, link: bool) {
        let op = self.ops.get_mut(key).expect("queued send exists");
        op.request = op.request.wrapping_add(1);
        let tag = RequestTag {
            key: key.index(),
            request: op.request,
        };
        self.scratch_iov.clear();
        op.append_remaining(&mut self.scratch_iov, IOV_MAX);
        let ring = self
            .ring
            .as_mut()
            .expect("io_uring sockets exist only with a ring");
        let pushed = if self.scratch_iov.len() == 1 {
            let iov = self.scratch_iov[0];
            let fixed = op.fixed.as_ref().map(SlotLease::slot);
            let len = iov.iov_len.min(1 << 30) as u32;
            // SAFETY: the iovec points into `op.bufs`, owned by the op in `self.ops` until
            // `try_finish` sees no request in the ring and no notification pending, so the memory
            // outlives the request; the fixed slot, if any, was found by `fixed_slot` as the
            // registered region that contains the whole buffer.
            unsafe { ring.send_zc(fd, tag, iov.iov_base as *const u8, len, fixed, link) }
        } else {
            // The op's slot keeps its boxed msghdr from one send to the next: no allocation per
            // vectored send.
            let header =
                self.vectored[key.index() as usize].get_or_insert_with(VectoredRequest::new);
            header.iov.clear();
            header.iov.extend_from_slice(&self.scratch_iov);
            // SAFETY: the request stays boxed in `self.vectored[key]`, untouched while the op is
            // `in_ring` (only `push_request` of this op rewrites it, after the completion);
            // its iovecs point into `op.bufs`, which live until the notification, as for the
            // single-buffer case.
            unsafe { ring.sendmsg_zc(fd, tag, header, link) }
        };
        // `submit_chain` asked the ring for room first, so the push cannot fail.
        debug_assert!(
            pushed.is_ok(),
            "a request was queued without room in the ring"
        );
        op.in_ring = pushed.is_ok();
    }

    /// Queues the chains of every socket with zero-copy sends waiting (oldest first, each at
    /// most its share of the ring; one the ring has no room for sends by sendmsg instead, see
    /// the module comment) and hands them to the kernel in one `io_uring_enter`. On failure the
    /// requests stay queued (the kernel may take them on a later call), so their sends keep
    /// their buffers.
    pub fn flush(&mut self) -> Result<()> {
        self.check_process()?;
        if let Some(ring) = self.ring.as_ref() {
            let contenders = (self.ring_chains + self.ring_waiting.len()).max(1);
            let share = (ring.capacity() / contenders).max(1);
            let stalled = self
                .ring_stalled_since
                .is_some_and(|since| since.elapsed() >= RING_STALL_LIMIT);
            let mut skipped = false;
            // Only the sockets waiting now: one skipped goes to the back for the next flush.
            for _ in 0..self.ring_waiting.len() {
                let Some(id) = self.ring_waiting.pop_front() else {
                    break;
                };
                let waiting = self
                    .sockets
                    .get_mut(id)
                    .is_some_and(|entry| std::mem::take(&mut entry.ring.waiting));
                if waiting && !self.submit_chain(id, share) {
                    if stalled {
                        self.bypass_ring(id);
                    } else {
                        skipped = true;
                        self.wait_for_ring(id);
                    }
                }
            }
            self.ring_wait_clock(skipped)?;
        }
        match self.ring.as_mut() {
            Some(ring) => ring
                .flush()
                .map_err(|e| Error::os("submitting to io_uring", errno_of(&e))),
            None => Ok(()),
        }
    }

    /// Starts the clock of a wait for ring room (and the timer that ends it), or stops it.
    fn ring_wait_clock(&mut self, waiting: bool) -> Result<()> {
        if !waiting {
            self.ring_stalled_since = None;
        } else if self.ring_stalled_since.is_none() {
            self.ring_stalled_since = Some(Instant::now());
            if let Some(timer) = &self.ring_timer {
                sys::timer_arm(timer.as_fd(), RING_STALL_LIMIT)
                    .map_err(|e| Error::os("arming the io_uring's wait timer", e))?;
            }
        }
        Ok(())
    }

    /// The ring had no room for the socket's zero-copy sends (none of its requests are in it)
    /// and stalled for `RING_STALL_LIMIT`: the sends waiting go by sendmsg, with MSG_ZEROCOPY if
    /// the socket can have it (its releases then come on the error queue), else by copy.
    fn bypass_ring(&mut self, id: SocketId) {
        let Some(entry) = self.sockets.get(id) else {
            return;
        };
        let enabled = if entry.msg.uses_error_queue() || entry.msg.outstanding() > 0 {
            None
        } else {
            self.enable_msg_zerocopy(entry.fd.as_fd(), &entry.claim)
                .ok()
        };
        let Some(entry) = self.sockets.get_mut(id) else {
            return;
        };
        if let Some(first) = enabled {
            entry.msg.start_error_queue(first);
        }
        for &key in entry.queue.iter() {
            let op = self.ops.get_mut(key).expect("queued send exists");
            if op.zerocopy() && !op.in_ring && !op.bypass_ring {
                op.bypass_ring = true;
                entry.stats.ring_full_sends += 1;
                if !entry.msg.uses_error_queue() {
                    op.mode = Mode::Copy(CopyReason::RingFull);
                }
            }
        }
        self.pump(id);
    }

    /// True if sends are queued for the kernel that only the next [`Driver::flush`] (or
    /// [`Driver::poll`]) hands over.
    pub fn needs_flush(&self) -> bool {
        !self.ring_waiting.is_empty() || self.ring.as_ref().is_some_and(Ring::has_unsubmitted)
    }
}
