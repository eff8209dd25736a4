//! The io_uring side of the driver: the ring's creation, registered buffer regions, SEND_ZC /
//! SENDMSG_ZC submission (one request per socket at a time, so bytes stay in order) and the two
//! completions of each request: the result, then the release notification.

use std::os::fd::{BorrowedFd, RawFd};
use std::sync::Arc;

use nix::errno::Errno;
use nix::sys::epoll::{EpollEvent, EpollFlags};

use super::{Driver, RING_TAG};
use crate::buf::IoBuf;
use crate::error::{errno_of, Error, Result};
use crate::op::OpKey;
use crate::region::Region;
use crate::ring::{Ring, RingEvent, VectoredRequest};
use crate::sys::IOV_MAX;

/// Fixed-buffer slots reserved in the ring, one per registered region.
const FIXED_SLOTS: u32 = 64;
/// The kernel's limit on one fixed buffer.
const MAX_FIXED_LEN: usize = 1 << 30;

impl<T, B: IoBuf> Driver<T, B> {
    pub(super) fn ensure_ring(&mut self) -> std::result::Result<(), String> {
        if self.ring.is_some() {
            return Ok(());
        }
        self.capabilities.io_uring_send_zc.clone()?;
        let ring = Ring::new(256).map_err(|e| format!("creating the io_uring failed: {e}"))?;
        let event = EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLET, RING_TAG);
        // SAFETY: the eventfd is owned by `ring`, which lives in this driver as long as the
        // epoll set; it is removed from the set only by the ring being dropped with the driver.
        let eventfd = unsafe { BorrowedFd::borrow_raw(ring.eventfd()) };
        self.epoll
            .add(eventfd, event)
            .map_err(|e| format!("watching the io_uring eventfd failed: {e}"))?;
        if let Err(e) = ring.reserve_fixed_slots(FIXED_SLOTS) {
            self.fixed_unavailable = Some(format!("reserving fixed-buffer slots failed: {e}"));
        }
        self.ring = Some(ring);
        for slot in 0..self.regions.len() {
            if let Err(e) = self.register_fixed(slot) {
                self.fixed_unavailable = Some(e.to_string());
            }
        }
        Ok(())
    }

    /// Lets sends from `region` use io_uring's registered (fixed) buffers: no page pinning and
    /// lookup per send. Sends from anywhere else keep working as before.
    pub fn register_region(&mut self, region: Arc<Region>) -> Result<()> {
        if self.regions.iter().any(|r| Arc::ptr_eq(r, &region)) {
            return Ok(());
        }
        if self.regions.len() >= FIXED_SLOTS as usize {
            return Err(Error::Pool(format!(
                "at most {FIXED_SLOTS} buffer pools can be used with one event loop"
            )));
        }
        if region.len() > MAX_FIXED_LEN {
            return Err(Error::Pool(format!(
                "a buffer pool can hold at most {MAX_FIXED_LEN} bytes (the kernel's limit on one \
                 registered buffer); this one has {}",
                region.len()
            )));
        }
        self.regions.push(region);
        if self.ring.is_some() && self.fixed_unavailable.is_none() {
            if let Err(e) = self.register_fixed(self.regions.len() - 1) {
                self.regions.pop();
                return Err(e);
            }
        }
        Ok(())
    }

    pub(super) fn register_fixed(&mut self, slot: usize) -> Result<()> {
        let (Some(ring), Some(region)) = (self.ring.as_ref(), self.regions.get(slot)) else {
            return Ok(());
        };
        // SAFETY: the region is kept alive by `self.regions`, which is dropped after the ring.
        unsafe { ring.register_fixed(slot as u16, region.as_ptr(), region.len()) }.map_err(|e| {
            let errno = errno_of(&e);
            if errno == Errno::ENOMEM {
                Error::Pool(format!(
                    "registering {} bytes of buffer pool memory with io_uring failed (ENOMEM): \
                     RLIMIT_MEMLOCK is too low for a process without CAP_IPC_LOCK; raise it \
                     (ulimit -l) or make the pool smaller",
                    region.len()
                ))
            } else {
                Error::os("registering buffer pool memory with io_uring", errno)
            }
        })
    }

    /// The fixed-buffer slot whose region holds `[ptr, ptr + len)`, if any.
    pub(super) fn fixed_slot(&self, ptr: *const u8, len: usize) -> Option<u16> {
        if self.ring.is_none() || self.fixed_unavailable.is_some() {
            return None;
        }
        self.regions
            .iter()
            .position(|r| r.contains(ptr, len))
            .map(|slot| slot as u16)
    }

    pub(super) fn process_ring(&mut self) {
        let mut events = std::mem::take(&mut self.scratch_events);
        events.clear();
        if let Some(ring) = self.ring.as_mut() {
            ring.reap(&mut events);
        }
        for event in events.iter().copied() {
            match event {
                RingEvent::Released { key, copied } => {
                    let Some(op) = self.ops[key as usize].as_mut() else {
                        continue;
                    };
                    op.notifications_pending -= 1;
                    op.kernel_copied |= copied;
                    let socket = op.socket;
                    if let Some(Some(entry)) = self.entries.get_mut(socket as usize) {
                        entry.stats.notifications += 1;
                        entry.ring_releases_pending -= 1;
                    }
                    self.try_finish(key);
                    self.release_arrived(socket);
                }
                RingEvent::Sent { key, res, more } => self.ring_sent(key, res, more),
            }
        }
        self.scratch_events = events;
    }

    pub(super) fn ring_sent(&mut self, key: OpKey, res: i32, more: bool) {
        let Some(op) = self.ops[key as usize].as_mut() else {
            return;
        };
        op.in_ring = false;
        let index = op.socket;
        if more {
            op.notifications_pending += 1;
            if let Some(Some(entry)) = self.entries.get_mut(index as usize) {
                entry.ring_releases_pending += 1;
            }
        }
        if res >= 0 {
            if op.queued {
                self.advance_queue(index, res as usize);
            }
        } else {
            match Errno::from_raw(-res) {
                Errno::EAGAIN | Errno::EINTR => {}
                e if self.zerocopy_refused(index, key, e) => {}
                e => self.send_failed(index, key, e),
            }
        }
        self.try_finish(key);
        self.pump(index);
    }

    pub(super) fn submit_to_ring(&mut self, index: u32, key: OpKey, fd: RawFd) {
        let op = self.ops[key as usize].as_mut().expect("queued send exists");
        self.scratch_iov.clear();
        op.append_remaining(&mut self.scratch_iov, IOV_MAX);
        let ring = self
            .ring
            .as_mut()
            .expect("io_uring sockets exist only with a ring");
        let pushed = if self.scratch_iov.len() == 1 {
            let iov = self.scratch_iov[0];
            let fixed = op.fixed;
            let len = iov.iov_len.min(1 << 30) as u32;
            // SAFETY: the iovec points into `op.bufs`, owned by the op in `self.ops` until
            // `try_finish` sees no request in the ring and no notification pending, so the memory
            // outlives the request; the fixed slot, if any, was found by `fixed_slot` as the
            // registered region that contains the whole buffer.
            unsafe { ring.send_zc(fd, key, iov.iov_base as *const u8, len, fixed) }
        } else {
            // The op's slot keeps its boxed msghdr from one send to the next: no allocation per
            // vectored send.
            let request = self.vectored[key as usize].get_or_insert_with(VectoredRequest::new);
            request.iov.clear();
            request.iov.extend_from_slice(&self.scratch_iov);
            // SAFETY: the request stays boxed in `self.vectored[key]`, untouched while the op is
            // `in_ring` (only `submit_to_ring` of this op rewrites it, after the completion);
            // its iovecs point into `op.bufs`, which live until the notification, as for the
            // single-buffer case.
            unsafe { ring.sendmsg_zc(fd, key, request) }
        };
        match pushed {
            Ok(()) => op.in_ring = true,
            Err(e) => {
                // The entry never reached the submission queue: nothing in the kernel refers to
                // the send, so it can wait in its queue or fail without risk to its buffers.
                match errno_of(&e) {
                    Errno::EAGAIN => self.ring_backlog.push(index),
                    errno => self.send_failed(index, key, errno),
                }
            }
        }
    }

    /// Submits what the ring's queue holds, then the requests of sockets that found it full,
    /// for as long as that makes progress. On failure the entries stay queued in the ring (the
    /// kernel may take them on a later call), so their sends keep their buffers.
    pub(super) fn flush_ring(&mut self) -> Result<()> {
        loop {
            let Some(ring) = self.ring.as_mut() else {
                return Ok(());
            };
            ring.flush()
                .map_err(|e| Error::os("submitting to io_uring", errno_of(&e)))?;
            let waiting = std::mem::take(&mut self.ring_backlog);
            if waiting.is_empty() {
                return Ok(());
            }
            for &index in &waiting {
                self.pump(index);
            }
            if self.ring_backlog.len() >= waiting.len() {
                // Still full: the kernel needs its completions reaped first, which the eventfd
                // will signal; those sockets are retried then.
                return Ok(());
            }
        }
    }
}
