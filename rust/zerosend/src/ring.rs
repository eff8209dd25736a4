//! The driver's io_uring: submission of SEND_ZC / SENDMSG_ZC and reaping of their completions.
//!
//! The ring signals an eventfd on every completion; the driver watches that eventfd in its epoll
//! set, so one descriptor tells the event loop that sends progressed on either backend.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

/// `IORING_SEND_ZC_REPORT_USAGE`: the notification says whether the kernel copied after all.
const SEND_ZC_REPORT_USAGE: u16 = 1 << 3;
/// `IORING_NOTIF_USAGE_ZC_COPIED`: set in a notification's `res` when the data was copied.
const NOTIF_USAGE_ZC_COPIED: i32 = i32::MIN;

/// What a completion queue entry means for the send that owns it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RingEvent {
    /// The send request finished: `res` bytes or -errno; `more` if a notification follows.
    Sent { key: u32, res: i32, more: bool },
    /// The kernel let go of the send's pages.
    Released { key: u32, copied: bool },
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
    eventfd: OwnedFd,
    unsubmitted: usize,
}

impl Ring {
    pub fn new(entries: u32) -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_cqsize(entries * 4)
            .build(entries)?;
        // SAFETY: eventfd(2) has no memory arguments; a non-negative result is a new descriptor
        // that we own from here on.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor returned by eventfd and owned by no one else.
        let eventfd = unsafe { OwnedFd::from_raw_fd(raw) };
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        Ok(Self {
            ring,
            eventfd,
            unsubmitted: 0,
        })
    }

    /// The descriptor that becomes readable when completions are waiting.
    pub fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// Queues a single-buffer SEND_ZC. `fixed` names the registered buffer holding it.
    ///
    /// # Safety
    /// `[ptr, ptr + len)` must stay valid and unmodified until the notification for `key`
    /// (or, if the first completion has no `more` flag, until that completion) is reaped.
    pub unsafe fn send_zc(
        &mut self,
        fd: RawFd,
        key: u32,
        ptr: *const u8,
        len: u32,
        fixed: Option<u16>,
    ) -> io::Result<()> {
        let entry = opcode::SendZc::new(types::Fd(fd), ptr, len)
            .flags(libc::MSG_WAITALL | libc::MSG_NOSIGNAL)
            .zc_flags(SEND_ZC_REPORT_USAGE)
            .buf_index(fixed)
            .build()
            .user_data(u64::from(key));
        // SAFETY: forwarded from this function's contract.
        unsafe { self.push(&entry) }
    }

    /// Queues a vectored SENDMSG_ZC whose header lives in `request`.
    ///
    /// # Safety
    /// `request` and every iovec it points to must stay valid and unmoved until the notification
    /// for `key` (or a final first completion) is reaped.
    pub unsafe fn sendmsg_zc(
        &mut self,
        fd: RawFd,
        key: u32,
        request: &mut VectoredRequest,
    ) -> io::Result<()> {
        request.header.msg_iov = request.iov.as_mut_ptr();
        request.header.msg_iovlen = request.iov.len();
        let entry = opcode::SendMsgZc::new(types::Fd(fd), &request.header)
            .flags((libc::MSG_WAITALL | libc::MSG_NOSIGNAL) as u32)
            .ioprio(SEND_ZC_REPORT_USAGE)
            .build()
            .user_data(u64::from(key));
        // SAFETY: forwarded from this function's contract.
        unsafe { self.push(&entry) }
    }

    /// # Safety
    /// The entry's memory must stay valid for the whole operation (see `send_zc`).
    unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        for _ in 0..2 {
            // SAFETY: forwarded from the caller's contract.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                self.unsubmitted += 1;
                return Ok(());
            }
            // The submission queue is full: hand what it holds to the kernel and retry once.
            self.flush()?;
        }
        // The kernel takes no more until completions are reaped; the caller retries then.
        Err(io::Error::from_raw_os_error(libc::EAGAIN))
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

    /// Empties the eventfd counter and collects every completion waiting in the ring.
    pub fn reap(&mut self, out: &mut Vec<RingEvent>) {
        let mut counter = 0u64;
        // SAFETY: reads 8 bytes into a live u64, as eventfd requires; EAGAIN (nothing pending)
        // is fine because the completion queue is read below regardless.
        let _ = unsafe {
            libc::read(
                self.eventfd.as_raw_fd(),
                (&mut counter as *mut u64).cast(),
                8,
            )
        };
        for cqe in self.ring.completion() {
            let key = cqe.user_data() as u32;
            let flags = cqe.flags();
            out.push(if cqueue::notif(flags) {
                RingEvent::Released {
                    key,
                    copied: cqe.result() & NOTIF_USAGE_ZC_COPIED != 0,
                }
            } else {
                RingEvent::Sent {
                    key,
                    res: cqe.result(),
                    more: cqueue::more(flags),
                }
            });
        }
    }
}

impl Ring {
    /// Reserves `slots` empty fixed-buffer slots (Linux 5.13) for regions registered later.
    pub fn reserve_fixed_slots(&self, slots: u32) -> io::Result<()> {
        self.ring.submitter().register_buffers_sparse(slots)
    }

    /// Registers `[ptr, ptr + len)` as fixed buffer `slot`.
    ///
    /// # Safety
    /// The memory must stay valid until the ring is dropped (it is never unregistered).
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
