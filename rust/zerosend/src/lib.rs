//! zerosend: zero-copy TCP/UDP transmit on Linux that tells you when the kernel released your
//! buffer.
//!
//! A send's buffers are owned by the [`Driver`] from submission until the kernel's release
//! notification (io_uring `SEND_ZC` notification CQE, or a `MSG_ZEROCOPY` error-queue range);
//! only then is the send reported complete and the buffer handed back (dropped). That is the one
//! guarantee this crate exists for: once a send completes, the memory may be reused.

mod buf;
mod capabilities;
mod driver;
mod error;
mod fork;
pub mod mutant;
mod op;
mod region;
mod registry;
mod ring;
mod sender;
mod slab;
mod socket_id;
mod sys;
mod tracker;

pub use buf::IoBuf;
pub use capabilities::Capabilities;
pub use driver::{
    Backend, Completion, Driver, PendingSend, Rejected, SocketId, SocketOptions, SocketStats,
    Submitted,
};
pub use error::{Error, Result};
pub use op::SendResult;
pub use region::Region;
pub use sender::{DrainOutcome, SendFuture, ZeroCopySender};
pub use tracker::ZerocopyTracker;
