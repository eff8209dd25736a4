//! The driver's public types: backends, per-socket options, handles, counters and outcomes.

use crate::error::{Error, Result};
use crate::op::SendResult;
pub use crate::socket_id::SocketId;

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
    /// Every backend, best first: the names bindings offer and accept.
    pub const ALL: [Backend; 3] = [Backend::IoUring, Backend::MsgZerocopy, Backend::Copy];

    pub fn name(self) -> &'static str {
        match self {
            Backend::IoUring => "io_uring",
            Backend::MsgZerocopy => "msg_zerocopy",
            Backend::Copy => "copy",
        }
    }

    /// Parses one of the [`Backend::name`]s.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|backend| backend.name() == name)
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
            zerocopy_threshold: 1 << 20,
        }
    }
}

/// Defines [`SocketStats`] and its list of counter names from one list of fields, so the
/// names bindings and benchmarks report are the field names, written once.
macro_rules! socket_stats {
    ($($(#[$doc:meta])* $field:ident,)*) => {
        /// Counters of one socket.
        #[derive(Debug, Clone, Default, PartialEq, Eq)]
        pub struct SocketStats {
            $($(#[$doc])* pub $field: u64,)*
        }

        impl SocketStats {
            /// The counters' names, in the order of [`SocketStats::counters`].
            pub const KEYS: &'static [&'static str] = &[$(stringify!($field)),*];

            /// Every counter with its name.
            pub fn counters(&self) -> impl Iterator<Item = (&'static str, u64)> {
                [$((stringify!($field), self.$field)),*].into_iter()
            }
        }
    };
}

socket_stats! {
    /// Sends completed (successfully or not).
    sends,
    /// Bytes of sends the kernel transmitted without copying.
    bytes_zerocopy,
    /// Bytes of sends that were copied, for whatever reason (the next five say why).
    bytes_copied,
    /// ... because the kernel copied a zero-copy send (loopback, veth, no scatter-gather).
    bytes_copied_by_kernel,
    /// ... because the send was below the zero-copy threshold.
    bytes_copied_below_threshold,
    /// ... because a copying send was asked for (`send`).
    bytes_copied_requested,
    /// ... because the socket uses the copy backend.
    bytes_copied_backend,
    /// ... because the event loop's io_uring had no room for the socket's zero-copy sends and
    /// the socket cannot use MSG_ZEROCOPY (see ring_full_sends).
    bytes_copied_ring_full,
    /// Bytes sent from files with `sendfile(2)` (`send_file`): page cache to socket, never through
    /// user memory; not counted in bytes_copied.
    bytes_sendfile,
    /// Zero-copy release notifications received (ranges on MSG_ZEROCOPY, CQEs on io_uring).
    notifications,
    /// MSG_ZEROCOPY completion ranges that did not start at the oldest outstanding send.
    out_of_order_notifications,
    /// Sends that the kernel accepted only in part and that were finished by further calls.
    short_sends,
    /// Times the socket buffer was full and the driver waited for room.
    eagain_waits,
    /// Times the kernel refused to pin more memory (ENOBUFS/ENOMEM) and the driver waited for
    /// this socket's releases before trying again.
    enobufs_waits,
    /// Zero-copy sends the kernel refused outright (no memory to pin and nothing to wait for,
    /// or a datagram in too many pieces); they went by copy (counted in bytes_copied_by_kernel).
    zerocopy_refusals,
    /// Sends that went from io_uring registered buffers.
    fixed_buffer_sends,
    /// Zero-copy sends of an io_uring socket that found the ring with no room for them (other
    /// sockets' sends filled it, say to peers that do not read) and none of the socket's own
    /// requests in it: they went by sendmsg instead, with MSG_ZEROCOPY where the socket allows
    /// it, else by copy (counted in bytes_copied_ring_full), rather than wait on other peers.
    ring_full_sends,
    /// Sends that ended in an error.
    errors,
    /// Errors the kernel queued on the socket's error queue (ICMP, such as port unreachable)
    /// and the driver read there; on UDP each fails the socket's next send with its errno.
    queued_errors,
    /// Error-queue messages whose control data did not fit (`MSG_CTRUNC`): their contents,
    /// possibly release notifications, were lost. Never expected; counted so it cannot pass
    /// unnoticed.
    truncated_control_messages,
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

/// What became of a send given to [`super::Driver::submit_now`].
#[derive(Debug)]
pub enum Submitted<T, B> {
    /// The send finished within the call (a copying send the kernel took whole, or a send on a
    /// stream that had already failed). Its completion is this one and no other is queued.
    Done {
        token: T,
        result: Result<SendResult>,
        bufs: Vec<B>,
    },
    /// The send is in flight; its completion comes from
    /// [`super::Driver::take_completions`], with the token last given for it (see
    /// [`super::Driver::set_token`]).
    InFlight(PendingSend),
}

/// A send in flight, as [`super::Driver::submit_now`] names it. Valid until its completion was
/// taken; the driver checks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingSend(pub(super) crate::op::OpKey);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_backend_parses_from_its_name() {
        for backend in Backend::ALL {
            assert_eq!(Backend::from_name(backend.name()), Some(backend));
        }
        assert_eq!(Backend::from_name("auto"), None);
    }

    #[test]
    fn counters_come_with_their_names_in_key_order() {
        let stats = SocketStats {
            sends: 1,
            truncated_control_messages: 2,
            ..SocketStats::default()
        };
        let counters: Vec<_> = stats.counters().collect();
        let names: Vec<_> = counters.iter().map(|(name, _)| *name).collect();
        assert_eq!(names, SocketStats::KEYS);
        assert!(counters.contains(&("sends", 1)));
        assert!(counters.contains(&("truncated_control_messages", 2)));
    }
}
