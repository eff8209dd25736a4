//! Which backend a socket gets: the one asked for, or the best this kernel and socket allow,
//! with the reason for every better one refused.

use std::os::fd::BorrowedFd;

use nix::errno::Errno;

use super::{Backend, Driver};
use crate::buf::IoBuf;
use crate::error::{Error, Result};
use crate::registry::Claim;
use crate::sys;

impl<T, B: IoBuf> Driver<T, B> {
    /// Picks the socket's backend: `(backend, why not a better one, first MSG_ZEROCOPY number)`.
    pub(super) fn choose_backend(
        &mut self,
        fd: BorrowedFd<'_>,
        claim: &Claim,
        wanted: Option<Backend>,
    ) -> Result<(Backend, Option<String>, u32)> {
        let unavailable = |backend: Backend, reason: String| Error::BackendUnavailable {
            backend: backend.name(),
            reason,
        };
        match wanted {
            Some(Backend::Copy) => Ok((Backend::Copy, None, 0)),
            Some(Backend::MsgZerocopy) => self
                .enable_msg_zerocopy(fd, claim)
                .map(|first| (Backend::MsgZerocopy, None, first))
                .map_err(|reason| unavailable(Backend::MsgZerocopy, reason)),
            Some(Backend::IoUring) => self
                .ensure_ring()
                .map(|()| (Backend::IoUring, None, 0))
                .map_err(|reason| unavailable(Backend::IoUring, reason)),
            None if sys::peer_is_local(fd) => Ok((
                Backend::Copy,
                Some(
                    "the peer is on this host: the kernel copies every zero-copy send on local \
                     delivery anyway, so copying up front costs less (ask for a backend \
                     explicitly to send zero-copy regardless)"
                        .to_string(),
                ),
                0,
            )),
            None => {
                let uring_reason = match self.ensure_ring() {
                    Ok(()) => return Ok((Backend::IoUring, None, 0)),
                    Err(reason) => reason,
                };
                match self.enable_msg_zerocopy(fd, claim) {
                    Ok(first) => Ok((
                        Backend::MsgZerocopy,
                        Some(format!("io_uring: {uring_reason}")),
                        first,
                    )),
                    Err(reason) => Ok((
                        Backend::Copy,
                        Some(format!("io_uring: {uring_reason}; msg_zerocopy: {reason}")),
                        0,
                    )),
                }
            }
        }
    }

    /// Turns on SO_ZEROCOPY; returns the number the kernel will give the next zero-copy send.
    fn enable_msg_zerocopy(
        &self,
        fd: BorrowedFd<'_>,
        claim: &Claim,
    ) -> std::result::Result<u32, String> {
        self.capabilities.msg_zerocopy.clone()?;
        let refused = |e: Errno| format!("SO_ZEROCOPY refused on this socket: {e}");
        if sys::zerocopy_enabled(fd).map_err(refused)? {
            // The kernel's counter kept counting since SO_ZEROCOPY was set; only a registration
            // of ours that ended with nothing in flight tells where it stands.
            return claim.saved_zerocopy_number().ok_or_else(|| {
                "SO_ZEROCOPY was already set on this socket by other code, so the kernel's \
                 MSG_ZEROCOPY counter is unknown and completions could not be matched to sends"
                    .to_string()
            });
        }
        sys::enable_zerocopy(fd).map_err(refused)?;
        Ok(0)
    }
}
