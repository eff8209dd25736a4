//! The driver's io_uring: submission of SEND_ZC / SENDMSG_ZC and reaping of their completions.
//!
//! The ring's own descriptor is readable while completions wait in its completion queue (or in
//! the kernel's overflow list): the driver watches it in its epoll set, or hands it to the
//! event loop to watch directly. No eventfd: that would cost a signal per completion and a
//! `read` per wake-up.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

/// `IORING_SEND_ZC_REPORT_USAGE`: the notification says whether the kernel copied after all.
pub(crate) const SEND_ZC_REPORT_USAGE: u16 = 1 << 3;
/// `IORING_NOTIF_USAGE_ZC_COPIED`: set in a notification's `res` when the data was copied.
const NOTIF_USAGE_ZC_COPIED: i32 = i32::MIN;

/// What a completion queue entry means for the send that owns it. `request` numbers the send's
/// requests (a send may need several), so a completion is matched to the request it is for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RingEvent {
    /// The send request finished: `res` bytes or -errno; `more` if a notification follows.
    Sent {
        key: u32,
        request: u32,
        res: i32,
        more: bool,
    },
    /// The kernel let go of the send's pages.
    Released {
        key: u32,
        request: u32,
        copied: bool,
    },
}

/// Which send (`key`) and which of its requests (`request`) a completion is for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RequestTag {
    pub key: u32,
    pub request: u32,
}

/// One send request as the ring needs it. The msghdr and iovecs of a vectored send live here,
/// boxed so their addresses stay fixed while the request is in the kernel.
pub(crate) struct VectoredRequest {
    pub header: libc::msghdr,
    pub iov: Vec<libc::iovec>,
}

impl VectoredRequest {
    pub fn new() -> Box<Self> {
        Box::new(Self {
            // SAFETY: an all-zero msghdr is a valid "no address, no control data" header.
            header: unsafe { std::mem::zeroed() },
            iov: Vec::new(),
        })
    }
}

pub(crate) struct Ring {
    ring: IoUring,
    unsubmitted: usize,
    /// Completions the kernel may still post for requests already queued: two per send (result
    /// and notification) until the first says no notification follows. Kept at or below the
    /// completion queue's size, so the kernel never has to hold completions back (overflow).
    expected_completions: usize,
    cq_entries: usize,
}

impl Ring {
    /// A ring with `sq_entries` submission and `cq_entries` completion slots.
    pub fn new(sq_entries: u32, cq_entries: u32) -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_cqsize(cq_entries)
            .setup_submit_all()
            .build(sq_entries)?;
        let cq_entries = ring.params().cq_entries() as usize;
        Ok(Self {
            ring,
            unsubmitted: 0,
            expected_completions: 0,
            cq_entries,
        })
    }

    /// How many sends the ring holds at once (two completions each).
    pub fn capacity(&self) -> usize {
        self.cq_entries / 2
    }

    /// The ring's descriptor: readable while completions are waiting.
    pub fn fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    /// How many sends can be queued now without risking a completion queue overflow; makes room
    /// in the submission queue (one system call) if `wanted` would not fit.
    pub fn room(&mut self, wanted: usize) -> io::Result<usize> {
        let mut sq_free = self.sq_free();
        if sq_free < wanted && self.unsubmitted > 0 {
            self.flush()?;
            sq_free = self.sq_free();
        }
        let cq_free = self.cq_entries.saturating_sub(self.expected_completions) / 2;
        Ok(sq_free.min(cq_free))
    }

    fn sq_free(&mut self) -> usize {
        let sq = self.ring.submission();
        sq.capacity() - sq.len()
    }

    /// Queues a single-buffer SEND_ZC. `fixed` names the registered buffer holding it; `link`
    /// makes the next request queued wait for this one to finish (and be cancelled if it fails).
    ///
    /// # Safety
    /// `[ptr, ptr + len)` must stay valid and unmodified until the notification for `tag`
    /// (or, if the first completion has no `more` flag, until that completion) is reaped.
    pub unsafe fn send_zc(
        &mut self,
        fd: RawFd,
        tag: RequestTag,
        ptr: *const u8,
        len: u32,
        fixed: Option<u16>,
        link: bool,
    ) -> io::Result<()> {
        let entry = opcode::SendZc::new(types::Fd(fd), ptr, len)
            .flags(libc::MSG_WAITALL | libc::MSG_NOSIGNAL)
            .zc_flags(SEND_ZC_REPORT_USAGE)
            .buf_index(fixed)
            .build()
            .user_data(u64::from(tag.key) | u64::from(tag.request) << 32);
        // SAFETY: forwarded from this function's contract.
        unsafe { self.push(entry, link) }
    }

    /// Queues a vectored SENDMSG_ZC whose header lives in `header`; `link` as for `send_zc`.
    ///
    /// # Safety
    /// `header` and every iovec it points to must stay valid and unmoved until the notification
    /// for `tag` (or a final first completion) is reaped.
    pub unsafe fn sendmsg_zc(
        &mut self,
        fd: RawFd,
        tag: RequestTag,
        header: &mut VectoredRequest,
        link: bool,
    ) -> io::Result<()> {
        header.header.msg_iov = header.iov.as_mut_ptr();
        header.header.msg_iovlen = header.iov.len();
        let entry = opcode::SendMsgZc::new(types::Fd(fd), &header.header)
            .flags((libc::MSG_WAITALL | libc::MSG_NOSIGNAL) as u32)
            .ioprio(SEND_ZC_REPORT_USAGE)
            .build()
            .user_data(u64::from(tag.key) | u64::from(tag.request) << 32);
        // SAFETY: forwarded from this function's contract.
        unsafe { self.push(entry, link) }
    }

    /// # Safety
    /// The entry's memory must stay valid for the whole operation (see `send_zc`).
    unsafe fn push(&mut self, entry: squeue::Entry, link: bool) -> io::Result<()> {
        let entry = if link {
            entry.flags(squeue::Flags::IO_LINK)
        } else {
            entry
        };
        // SAFETY: forwarded from the caller's contract.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            // Callers ask `room` first; a full queue here is a bug, reported as "try later".
            return Err(io::Error::from_raw_os_error(libc::EAGAIN));
        }
        self.unsubmitted += 1;
        self.expected_completions += 2;
        Ok(())
    }

    /// True if requests are queued that the kernel has not been given yet.
    pub fn has_unsubmitted(&self) -> bool {
        self.unsubmitted > 0
    }

    /// Hands every queued request to the kernel in one system call.
    pub fn flush(&mut self) -> io::Result<()> {
        while self.unsubmitted > 0 {
            match self.ring.submit() {
                Ok(n) => self.unsubmitted = self.unsubmitted.saturating_sub(n.max(1)),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e)
                    if e.raw_os_error() == Some(libc::EBUSY)
                        || e.raw_os_error() == Some(libc::EAGAIN) =>
                {
                    // The completion queue is backed up; the caller reaps and flushes again.
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Collects every completion waiting in the ring, from shared memory (no system call),
    /// including any the kernel held back after the completion queue overflowed (it returns those
    /// only to an `io_uring_enter` with GETEVENTS, which `submit` makes when the overflow flag is
    /// up).
    pub fn reap(&mut self, out: &mut Vec<RingEvent>) -> io::Result<()> {
        loop {
            for cqe in self.ring.completion() {
                let key = cqe.user_data() as u32;
                let request = (cqe.user_data() >> 32) as u32;
                let flags = cqe.flags();
                out.push(if cqueue::notif(flags) {
                    self.expected_completions = self.expected_completions.saturating_sub(1);
                    RingEvent::Released {
                        key,
                        request,
                        copied: cqe.result() & NOTIF_USAGE_ZC_COPIED != 0,
                    }
                } else {
                    let more = cqueue::more(flags);
                    let done = if more { 1 } else { 2 };
                    self.expected_completions = self.expected_completions.saturating_sub(done);
                    RingEvent::Sent {
                        key,
                        request,
                        res: cqe.result(),
                        more,
                    }
                });
            }
            if !self.ring.submission().cq_overflow() {
                return Ok(());
            }
            loop {
                match self.ring.submit() {
                    Ok(n) => {
                        self.unsubmitted = self.unsubmitted.saturating_sub(n);
                        break;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

impl Ring {
    /// Reserves `slots` empty fixed-buffer slots (Linux 5.13) for regions registered later.
    pub fn reserve_fixed_slots(&self, slots: u32) -> io::Result<()> {
        self.ring.submitter().register_buffers_sparse(slots)
    }

    /// Empties fixed buffer `slot`. Requests already using it keep the registration alive in
    /// the kernel until they complete.
    pub fn clear_fixed(&self, slot: u16) -> io::Result<()> {
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        // SAFETY: an empty iovec registers no memory; it only drops the slot's registration.
        unsafe {
            self.ring
                .submitter()
                .register_buffers_update(u32::from(slot), &[empty], None)
        }
    }

    /// Registers `[ptr, ptr + len)` as fixed buffer `slot`.
    ///
    /// # Safety
    /// The memory must stay valid until the slot is cleared or the ring is dropped.
    pub unsafe fn register_fixed(&self, slot: u16, ptr: *mut u8, len: usize) -> io::Result<()> {
        let iov = libc::iovec {
            iov_base: ptr.cast(),
            iov_len: len,
        };
        // SAFETY: forwarded from this function's contract.
        unsafe {
            self.ring
                .submitter()
                .register_buffers_update(u32::from(slot), &[iov], None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_held_back_after_an_overflow_are_all_reaped() {
        let mut ring = Ring::new(8, 8).unwrap();
        // Four batches of eight no-ops without reaping: 32 completions for a queue of 8, so the
        // kernel keeps 24 on its overflow list.
        for batch in 0..4u32 {
            for i in 0..8u32 {
                let nop = opcode::Nop::new()
                    .build()
                    .user_data(u64::from(batch * 8 + i));
                // SAFETY: a no-op references no memory.
                unsafe { ring.ring.submission().push(&nop) }.unwrap();
            }
            ring.ring.submit().unwrap();
        }
        assert!(ring.ring.submission().cq_overflow());
        let mut events = Vec::new();
        ring.reap(&mut events).unwrap();
        let mut keys: Vec<u32> = events
            .iter()
            .map(|event| match *event {
                RingEvent::Sent { key, .. } | RingEvent::Released { key, .. } => key,
            })
            .collect();
        keys.sort_unstable();
        assert_eq!(keys, (0..32).collect::<Vec<_>>());
        assert!(!ring.ring.submission().cq_overflow());
    }
}
