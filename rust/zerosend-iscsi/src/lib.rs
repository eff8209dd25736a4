//! The iSCSI target's protocol pieces that run per command, in pure Rust (no Python):
//! header parsing ([`bhs`]), Data-In and SCSI Response encoding ([`encode`]), RFC 1982 serial
//! numbers ([`serial`]), CRC32C digests ([`digest`]) and the READ path's inner loop
//! ([`read_path`]), which the Python target (`zerosend.iscsi`) drives through the binding.

pub mod bhs;
pub mod digest;
pub mod encode;
pub mod read_path;
pub mod serial;

pub use bhs::BHS_LEN;
pub use encode::{DataIn, ScsiResponse};
pub use read_path::{FdMedium, Medium, ReadLimits, ReadPath, ReadRun, SeqNumbers};
pub use serial::sn_lt;
