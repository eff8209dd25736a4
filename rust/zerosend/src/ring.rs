//! The driver's io_uring: submission of SEND_ZC / SENDMSG_ZC and reaping of their completions.
//!
//! Set up, where the kernel accepts it (Linux 6.1), with `IORING_SETUP_SINGLE_ISSUER |
//! DEFER_TASKRUN | TASKRUN_FLAG`: the kernel then posts completions only when the thread that
//! created the ring enters it with `GETEVENTS`, so completions that arrive while the event loop
//! is busy are batched, and the `IORING_SQ_TASKRUN` flag in shared memory says whether there is
//! anything to run: a turn with nothing to submit and nothing to run makes no system call, and
//! one `io_uring_enter` both submits the turn's requests and reaps what completed. The loop is
//! woken through an eventfd registered with the ring, which the kernel signals when deferred
//! work is queued (polling the ring's own descriptor does not see deferred work).
//!
//! Where the kernel refuses those flags, the ring is set up as before (its reason is kept): its
//! own descriptor is readable while completions wait in its completion queue (or in the
//! kernel's overflow list), and is what the driver watches.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

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
    /// The eventfd registered with a DEFER_TASKRUN ring (None: the ring's own descriptor wakes).
    wake: Option<OwnedFd>,
    /// Why the ring runs without DEFER_TASKRUN, when it was asked for and refused.
    defer_refused: Option<String>,
    unsubmitted: usize,
    /// Completions the kernel may still post for requests already queued: two per send (result
    /// and notification) until the first says no notification follows. Kept at or below the
    /// completion queue's size, so the kernel never has to hold completions back (overflow).
    expected_completions: usize,
    cq_entries: usize,
}

impl Ring {
    /// A ring with `sq_entries` submission and `cq_entries` completion slots. With
    /// `single_issuer`, the caller promises that every later call on the ring comes from the
    /// thread calling this (the kernel enforces it with `EEXIST`); the ring is then set up with
    /// DEFER_TASKRUN where the kernel accepts it.
    pub fn new(sq_entries: u32, cq_entries: u32, single_issuer: bool) -> io::Result<Self> {
        let defer_refused = if single_issuer {
            let deferred = IoUring::builder()
                .setup_cqsize(cq_entries)
                .setup_submit_all()
                .setup_single_issuer()
                .setup_defer_taskrun()
                .setup_taskrun_flag()
                .build(sq_entries);
            match deferred {
                Ok(ring) => return Self::deferred(ring),
                // An older kernel (before 6.1) or a filter that refuses the flags: run without.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => format!(
                    "the kernel refused IORING_SETUP_SINGLE_ISSUER | DEFER_TASKRUN \
                     (needs Linux 6.1): {e}"
                ),
                Err(e) => return Err(e),
            }
        } else {
            "not asked for (the ring may be used from several threads)".into()
        };
        let ring = IoUring::builder()
            .setup_cqsize(cq_entries)
            .setup_submit_all()
            .build(sq_entries)?;
        Ok(Self::with(ring, None, Some(defer_refused)))
    }

    fn deferred(ring: IoUring) -> io::Result<Self> {
        // SAFETY: eventfd(2) takes no pointers; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let wake = unsafe { OwnedFd::from_raw_fd(fd) };
        ring.submitter().register_eventfd(wake.as_raw_fd())?;
        Ok(Self::with(ring, Some(wake), None))
    }

    fn with(ring: IoUring, wake: Option<OwnedFd>, defer_refused: Option<String>) -> Self {
        let cq_entries = ring.params().cq_entries() as usize;
        Self {
            ring,
            wake,
            defer_refused,
            unsubmitted: 0,
            expected_completions: 0,
            cq_entries,
        }
    }

    /// True if the kernel posts completions only when this thread asks (DEFER_TASKRUN).
    pub fn deferred_taskrun(&self) -> bool {
        self.wake.is_some()
    }

    /// Why the ring runs without DEFER_TASKRUN, if it does.
    pub fn defer_refused(&self) -> Option<&str> {
        self.defer_refused.as_deref()
    }

    /// Consumes the eventfd's signal (a level-triggered watcher would otherwise see it
    /// readable again at once). Call when the wake descriptor was found readable, before
    /// reaping: a completion arriving after this signals again.
    pub fn clear_wake(&self) {
        if let Some(wake) = &self.wake {
            let mut count = 0u64;
            // SAFETY: reads 8 bytes into `count`, which is 8 bytes long; a non-blocking eventfd
            // that was not signalled fails with EAGAIN, which is fine: nothing to clear.
            unsafe { libc::read(wake.as_raw_fd(), std::ptr::addr_of_mut!(count).cast(), 8) };
        }
    }

    /// How many sends the ring holds at once (two completions each).
    pub fn capacity(&self) -> usize {
        self.cq_entries / 2
    }

    /// The descriptor that wakes the event loop: readable while completions (or, with
    /// DEFER_TASKRUN, deferred work that will post them) are waiting.
    pub fn fd(&self) -> RawFd {
        match &self.wake {
            Some(wake) => wake.as_raw_fd(),
            None => self.ring.as_raw_fd(),
        }
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

    /// True if the kernel holds deferred work that only an enter with GETEVENTS runs.
    fn work_pending(&mut self) -> bool {
        self.wake.is_some() && self.ring.submission().taskrun()
    }

    /// One `io_uring_enter` that submits whatever is queued and, if deferred work is pending,
    /// runs all of it (posting its completions) without waiting for more.
    fn enter(&mut self) -> io::Result<usize> {
        if !self.work_pending() {
            return self.ring.submit();
        }
        // The kernel runs at most 20 deferred items per pass unless more completions are
        // wanted: ask for as many as the queue holds, with a zero timeout, so one call runs
        // them all and returns (ETIME: fewer came, which is fine).
        let zero = types::Timespec::new();
        let args = types::SubmitArgs::new().timespec(&zero);
        match self
            .ring
            .submitter()
            .submit_with_args(self.cq_entries, &args)
        {
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => Ok(0),
            other => other,
        }
    }

    /// Hands every queued request to the kernel in one system call, which also runs the
    /// deferred work pending (its completions are then read by `reap` from shared memory).
    /// Makes no call if there is neither.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.unsubmitted == 0 && self.work_pending() {
            return match self.enter() {
                Err(e) if e.raw_os_error() != Some(libc::EINTR) => Err(e),
                // Interrupted: the flag stays up and the next reap runs the work.
                _ => Ok(()),
            };
        }
        while self.unsubmitted > 0 {
            match self.enter() {
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
        if self.work_pending() {
            // Deferred work: one enter runs it (and submits anything queued meanwhile).
            loop {
                match self.enter() {
                    Ok(n) => {
                        self.unsubmitted = self.unsubmitted.saturating_sub(n);
                        break;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => break,
                    Err(e) => return Err(e),
                }
            }
        }
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

    /// Waits (a hang guard, not a timing bound) until the wake descriptor is readable.
    fn wait_readable(fd: RawFd) {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, its count passed alongside.
        let n = unsafe { libc::poll(&mut pfd, 1, 30_000) };
        assert_eq!(n, 1, "the wake descriptor never became readable");
    }

    #[test]
    fn deferred_work_beyond_one_kernel_pass_is_all_reaped_at_once() {
        let mut ring = Ring::new(64, 128, true).unwrap();
        if !ring.deferred_taskrun() {
            eprintln!(
                "skipped: {}",
                ring.defer_refused().unwrap_or("no DEFER_TASKRUN")
            );
            return;
        }
        // 48 polls on one pipe: the one write below completes them all at once, each through
        // deferred task work queued during the write: more than the 20 items the kernel runs
        // per pass when no completions are waited for.
        let mut pipe = [0; 2];
        // SAFETY: `pipe` has room for the two descriptors pipe(2) writes.
        assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
        for i in 0..48u64 {
            let entry = opcode::PollAdd::new(types::Fd(pipe[0]), libc::POLLIN as u32)
                .build()
                .user_data(i);
            // SAFETY: a poll request references no memory of ours.
            unsafe { ring.ring.submission().push(&entry) }.unwrap();
            ring.unsubmitted += 1;
        }
        ring.flush().unwrap();
        assert!(!ring.has_unsubmitted());
        // SAFETY: writes one byte from a live one-byte buffer to the pipe's write end.
        assert_eq!(unsafe { libc::write(pipe[1], b"x".as_ptr().cast(), 1) }, 1);
        wait_readable(ring.fd());
        ring.clear_wake();
        let mut events = Vec::new();
        ring.reap(&mut events).unwrap();
        assert_eq!(events.len(), 48, "one reap must run all the deferred work");
        assert!(!ring.work_pending());
        for fd in pipe {
            // SAFETY: closes the pipe made above, used by nothing else now.
            unsafe { libc::close(fd) };
        }
    }

    #[test]
    fn a_ring_not_asked_for_defer_taskrun_says_why() {
        let ring = Ring::new(8, 16, false).unwrap();
        assert!(!ring.deferred_taskrun());
        assert!(ring.defer_refused().unwrap().contains("not asked for"));
        assert_eq!(ring.fd(), ring.ring.as_raw_fd());
    }

    #[test]
    fn completions_held_back_after_an_overflow_are_all_reaped() {
        let mut ring = Ring::new(8, 8, false).unwrap();
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
