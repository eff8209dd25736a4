//! The driver's public types: backends, per-socket options, handles, counters and outcomes.

use crate::error::{Error, Result};
use crate::op::SendResult;

/// How a socket's zero-copy sends reach the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// io_uring `SEND_ZC` / `SENDMSG_ZC`; release signalled by a notification CQE.
    IoUring,
    /// `sendmsg(MSG_ZEROCOPY)`; release signalled on the socket's error queue.
    MsgZerocopy,
    /// Plain copying `sendmsg`; the buffer is free as soon as the kernel accepted it.
    Copy,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::IoUring => "io_uring",
            Backend::MsgZerocopy => "msg_zerocopy",
            Backend::Copy => "copy",
        }
    }

    /// Parses "io_uring", "msg_zerocopy" or "copy".
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "io_uring" => Some(Backend::IoUring),
            "msg_zerocopy" => Some(Backend::MsgZerocopy),
            "copy" => Some(Backend::Copy),
            _ => None,
        }
    }
}

/// How to send on one socket.
#[derive(Debug, Clone)]
pub struct SocketOptions {
    /// `None` picks the best backend the kernel offers for this socket.
    pub backend: Option<Backend>,
    /// Sends smaller than this many bytes go by copy (zero-copy costs more than it saves there).
    pub zerocopy_threshold: usize,
}

impl Default for SocketOptions {
    fn default() -> Self {
        Self {
            backend: None,
            zerocopy_threshold: 10 * 1024,
        }
    }
}

/// Handle of a socket registered with a driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SocketId {
    pub(super) index: u32,
    pub(super) generation: u32,
}

impl SocketId {
    /// The handle as one integer (for bindings that keep it in a foreign object).
    pub fn to_raw(self) -> u64 {
        socket_tag(self.index, self.generation)
    }

    /// The handle back from [`SocketId::to_raw`]. A stale or made-up value names no socket and
    /// every driver call with it fails with [`Error::Closed`].
    pub fn from_raw(raw: u64) -> Self {
        Self {
            index: (raw & 0xffff_ffff) as u32,
            generation: (raw >> 32) as u32,
        }
    }
}

/// Counters of one socket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SocketStats {
    /// Sends completed (successfully or not).
    pub sends: u64,
    /// Bytes of sends the kernel transmitted without copying.
    pub bytes_zerocopy: u64,
    /// Bytes of sends that were copied, for whatever reason (the next four say why).
    pub bytes_copied: u64,
    /// ... because the kernel copied a zero-copy send (loopback, veth, no scatter-gather).
    pub bytes_copied_by_kernel: u64,
    /// ... because the send was below the zero-copy threshold.
    pub bytes_copied_below_threshold: u64,
    /// ... because a copying send was asked for (`send`).
    pub bytes_copied_requested: u64,
    /// ... because the socket uses the copy backend.
    pub bytes_copied_backend: u64,
    /// Bytes sent from files with `sendfile(2)` (`send_file`): page cache to socket, never through
    /// user memory; not counted in bytes_copied.
    pub bytes_sendfile: u64,
    /// Zero-copy release notifications received (ranges on MSG_ZEROCOPY, CQEs on io_uring).
    pub notifications: u64,
    /// MSG_ZEROCOPY completion ranges that did not start at the oldest outstanding send.
    pub out_of_order_notifications: u64,
    /// Sends that the kernel accepted only in part and that were finished by further calls.
    pub short_sends: u64,
    /// Times the socket buffer was full and the driver waited for room.
    pub eagain_waits: u64,
    /// Times the kernel refused to pin more memory (ENOBUFS/ENOMEM) and the driver waited for
    /// this socket's releases before trying again.
    pub enobufs_waits: u64,
    /// Zero-copy sends the kernel refused outright (no memory to pin and nothing to wait for,
    /// or a datagram in too many pieces); they went by copy (counted in bytes_copied_by_kernel).
    pub zerocopy_refusals: u64,
    /// Sends that went from io_uring registered buffers.
    pub fixed_buffer_sends: u64,
    /// Sends that ended in an error.
    pub errors: u64,
    /// Errors the kernel queued on the socket's error queue (ICMP, such as port unreachable)
    /// and the driver read there; on UDP each fails the socket's next send with its errno.
    pub queued_errors: u64,
    /// Error-queue messages whose control data did not fit (`MSG_CTRUNC`): their contents,
    /// possibly release notifications, were lost. Never expected; counted so it cannot pass
    /// unnoticed.
    pub truncated_control_messages: u64,
}

/// A finished piece of work, handed back with the caller's token.
#[derive(Debug)]
pub enum Completion<T, B> {
    /// A send whose buffers the kernel released; they are handed back in `bufs`.
    Send {
        token: T,
        result: Result<SendResult>,
        bufs: Vec<B>,
    },
    /// Every send submitted on the socket before the drain request was released.
    Drained { token: T },
}

/// A send the driver did not accept: why, and the caller's token and buffers, untouched.
#[derive(Debug)]
pub struct Rejected<T, B> {
    pub error: Error,
    pub token: T,
    pub bufs: Vec<B>,
}

pub(super) fn socket_tag(index: u32, generation: u32) -> u64 {
    u64::from(index) | (u64::from(generation) << 32)
}
