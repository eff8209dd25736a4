//! Which backend a socket gets: the one asked for, or the best this kernel and socket allow,
//! with the reason for every better one refused.
//!
//! `auto`'s rule, from the benchmark's crossover figures (BENCHMARKS.md, "Which backend wins"):
//! a peer on this host gets copy (local delivery copies every zero-copy send anyway); so does a
//! UDP socket whose zero-copy threshold is above the largest datagram (no send could go
//! zero-copy); other UDP sockets prefer MSG_ZEROCOPY, TCP sockets io_uring. Per send, the
//! socket's zero-copy threshold then decides between copy and zero-copy.

use std::os::fd::BorrowedFd;

use nix::errno::Errno;

use super::{Backend, Driver, SocketOptions};
use crate::buf::IoBuf;
use crate::error::{Error, Result};
use crate::registry::Claim;
use crate::sys::{self, Transport};

/// The largest UDP payload without jumbograms (IPv6: 65,535 - 8 bytes; IPv4's is 20 less).
const MAX_DATAGRAM: usize = 65_527;

impl<T, B: IoBuf> Driver<T, B> {
    /// Picks the socket's backend: `(backend, why not a better one, first MSG_ZEROCOPY number)`.
    pub(super) fn choose_backend(
        &mut self,
        fd: BorrowedFd<'_>,
        claim: &Claim,
        transport: Transport,
        options: &SocketOptions,
    ) -> Result<(Backend, Option<String>, u32)> {
        let unavailable = |backend: Backend, reason: String| Error::BackendUnavailable {
            backend: backend.name(),
            reason,
        };
        match options.backend {
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
            None if transport == Transport::Udp && options.zerocopy_threshold > MAX_DATAGRAM => {
                Ok((
                    Backend::Copy,
                    Some(format!(
                        "a datagram holds at most {MAX_DATAGRAM} bytes, below the zero-copy \
                         threshold of {} bytes, so no send on this socket would go zero-copy \
                         (lower zerocopy_threshold, or ask for a backend, to send zero-copy)",
                        options.zerocopy_threshold
                    )),
                    0,
                ))
            }
            None if transport == Transport::Udp => self.best_of(fd, claim, Backend::MsgZerocopy),
            None => self.best_of(fd, claim, Backend::IoUring),
        }
    }

    /// `first` if this kernel and socket allow it, else the other zero-copy backend, else copy;
    /// with the reasons of every refusal.
    fn best_of(
        &mut self,
        fd: BorrowedFd<'_>,
        claim: &Claim,
        first: Backend,
    ) -> Result<(Backend, Option<String>, u32)> {
        let mut refusals = Vec::new();
        let order = match first {
            Backend::MsgZerocopy => [Backend::MsgZerocopy, Backend::IoUring],
            _ => [Backend::IoUring, Backend::MsgZerocopy],
        };
        for backend in order {
            let tried = match backend {
                Backend::IoUring => self.ensure_ring().map(|()| 0),
                _ => self.enable_msg_zerocopy(fd, claim),
            };
            match tried {
                Ok(first_number) => {
                    let reason = (!refusals.is_empty()).then(|| refusals.join("; "));
                    return Ok((backend, reason, first_number));
                }
                Err(reason) => refusals.push(format!("{}: {reason}", backend.name())),
            }
        }
        Ok((Backend::Copy, Some(refusals.join("; ")), 0))
    }

    /// Turns on SO_ZEROCOPY; returns the number the kernel will give the next zero-copy send.
    pub(super) fn enable_msg_zerocopy(
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
