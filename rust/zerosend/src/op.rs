//! One send from submission until the kernel releases its buffers.
//!
//! A `SendOp` owns the caller's buffers. It leaves the driver only through `SendOp::finish`, which
//! the driver calls when nothing in the kernel can still read them: every byte was written (or the
//! send failed), no io_uring request is in flight, and every zero-copy notification has arrived.

use std::os::fd::OwnedFd;

use crate::buf::IoBuf;
use crate::error::Error;
use crate::region::SlotLease;
use crate::socket_id::SocketId;

/// How a send ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendResult {
    /// Bytes handed to the kernel (the whole send).
    pub nbytes: usize,
    /// True only if the kernel transmitted straight from the caller's pages with no copy.
    pub zerocopy: bool,
}

/// Why a send went by copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyReason {
    /// The caller asked for a copying send.
    Requested,
    /// Smaller than the socket's zero-copy threshold.
    BelowThreshold,
    /// The socket uses the copy backend.
    Backend,
    /// The kernel refused the zero-copy form (a datagram in more pieces than an skb holds).
    KernelFallback,
    /// A file sent with `sendfile(2)`: from the page cache, never through user memory.
    File,
    /// The io_uring had no room for it and the socket cannot use MSG_ZEROCOPY.
    RingFull,
}

/// How a send is transmitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    ZeroCopy,
    Copy(CopyReason),
}

/// The file of a `send_file`: the driver's own duplicate of its descriptor, held until the send
/// completes, and where in it the send starts.
pub(crate) struct FileSource {
    pub fd: OwnedFd,
    pub offset: u64,
}

/// Stable index of a send inside its driver.
pub(crate) type OpKey = crate::slab::Key;

pub(crate) struct SendOp<T, B> {
    pub token: T,
    pub bufs: Vec<B>,
    pub total: usize,
    /// Bytes the kernel accepted so far.
    pub written: usize,
    pub mode: Mode,
    /// Still in its socket's queue: bytes remain to be written.
    pub queued: bool,
    /// An io_uring request for this send awaits its first completion.
    pub in_ring: bool,
    /// Zero-copy notifications still to come.
    pub notifications_pending: u32,
    /// Number of the op's latest io_uring request.
    pub request: u32,
    /// io_uring requests of this op whose result said a notification follows, still to come.
    pub ring_notifications: Vec<u32>,
    /// The notification of the request in the ring came before its result.
    pub notified_before_result: bool,
    /// A notification said the kernel copied after all.
    pub kernel_copied: bool,
    /// The io_uring fixed-buffer slot holding this single-buffer send, if registered. The lease
    /// keeps the slot registered until the op is gone (see `SlotLease`).
    pub fixed: Option<SlotLease>,
    pub error: Option<Error>,
    pub socket: SocketId,
    /// Tells this send from later ones that reuse its key (set by the driver).
    /// Set for a `send_file`, whose bytes come from this file (`bufs` is empty).
    pub file: Option<FileSource>,
    /// A zero-copy send of an io_uring socket that goes by sendmsg: the ring had no room.
    pub bypass_ring: bool,
}

impl<T, B: IoBuf> SendOp<T, B> {
    pub fn new(token: T, bufs: Vec<B>, mode: Mode, socket: SocketId) -> Self {
        let total = bufs.iter().map(IoBuf::len).sum();
        Self {
            token,
            bufs,
            total,
            written: 0,
            mode,
            queued: true,
            in_ring: false,
            notifications_pending: 0,
            request: 0,
            ring_notifications: Vec::new(),
            notified_before_result: false,
            kernel_copied: false,
            fixed: None,
            error: None,
            socket,
            file: None,
            bypass_ring: false,
        }
    }

    /// A send of `count` bytes of a file, with `sendfile(2)`.
    pub fn file(token: T, file: FileSource, count: usize, socket: SocketId) -> Self {
        let mut op = Self::new(token, Vec::new(), Mode::Copy(CopyReason::File), socket);
        op.total = count;
        op.file = Some(file);
        op
    }

    pub fn zerocopy(&self) -> bool {
        self.mode == Mode::ZeroCopy
    }

    /// True once the kernel can no longer read the buffers.
    pub fn released(&self) -> bool {
        !self.queued && !self.in_ring && self.notifications_pending == 0
    }

    /// Appends the unsent part of the buffers to `out`, until `out` holds `max` slices.
    pub fn append_remaining(&self, out: &mut Vec<libc::iovec>, max: usize) {
        let mut skip = self.written;
        for buf in &self.bufs {
            if out.len() >= max {
                break;
            }
            let len = buf.len();
            if skip >= len {
                skip -= len;
                continue;
            }
            out.push(libc::iovec {
                // SAFETY: `skip < len`, so the offset stays inside the buffer the IoBuf contract
                // guarantees valid; the kernel only reads through this pointer.
                iov_base: unsafe { buf.as_ptr().add(skip) } as *mut libc::c_void,
                iov_len: len - skip,
            });
            skip = 0;
        }
    }

    /// Consumes the released op into its token, outcome, buffers and fixed-slot lease.
    pub fn finish(self) -> (T, Result<SendResult, Error>, Vec<B>, Option<SlotLease>) {
        debug_assert!(
            self.released(),
            "a send was finished while the kernel could read it"
        );
        let result = match self.error {
            Some(err) => Err(err),
            None => Ok(SendResult {
                nbytes: self.total,
                zerocopy: self.zerocopy()
                    && !self.kernel_copied
                    && !crate::mutant::active(crate::mutant::ZEROCOPY_FALSE),
            }),
        };
        (self.token, result, self.bufs, self.fixed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(mode: Mode, kernel_copied: bool) -> SendResult {
        let mut op: SendOp<(), Vec<u8>> = SendOp::new(
            (),
            vec![vec![7; 300], vec![8; 12]],
            mode,
            SocketId::from_raw(0),
        );
        assert_eq!(op.zerocopy(), mode == Mode::ZeroCopy);
        op.queued = false; // written, and (no notification pending) released
        op.kernel_copied = kernel_copied;
        assert!(op.released());
        let (_, result, bufs, _) = op.finish();
        assert_eq!(bufs.len(), 2, "the buffers come back to their owner");
        result.expect("no error was recorded")
    }

    #[test]
    fn a_send_is_reported_zero_copy_only_if_the_kernel_did_not_copy_it() {
        let sent = finished(Mode::ZeroCopy, false);
        assert_eq!((sent.nbytes, sent.zerocopy), (312, true));
        assert!(!finished(Mode::ZeroCopy, true).zerocopy);
        assert!(!finished(Mode::Copy(CopyReason::Requested), false).zerocopy);
        assert!(!finished(Mode::Copy(CopyReason::BelowThreshold), false).zerocopy);
    }

    #[test]
    fn a_send_in_the_queue_or_the_ring_is_not_released() {
        let mut op: SendOp<(), Vec<u8>> =
            SendOp::new((), vec![vec![1]], Mode::ZeroCopy, SocketId::from_raw(0));
        assert!(!op.released(), "queued");
        op.queued = false;
        op.in_ring = true;
        assert!(!op.released(), "in the ring");
        op.in_ring = false;
        op.notifications_pending = 1;
        assert!(!op.released(), "a notification to come");
        op.notifications_pending = 0;
        assert!(op.released());
    }

    #[test]
    fn the_remaining_iovecs_skip_what_was_written() {
        let bufs = vec![vec![1u8; 100], vec![2u8; 50], vec![3u8; 30]];
        let starts: Vec<usize> = bufs.iter().map(|b| b.as_ptr() as usize).collect();
        let mut op: SendOp<(), Vec<u8>> =
            SendOp::new((), bufs, Mode::ZeroCopy, SocketId::from_raw(0));
        op.written = 120; // all of the first buffer and 20 bytes of the second
        let mut out = Vec::new();
        op.append_remaining(&mut out, 8);
        let got: Vec<(usize, usize)> = out
            .iter()
            .map(|v| (v.iov_base as usize, v.iov_len))
            .collect();
        assert_eq!(got, vec![(starts[1] + 20, 30), (starts[2], 30)]);
        out.clear();
        op.append_remaining(&mut out, 1);
        assert_eq!(out.len(), 1, "no more than asked for");
    }
}
