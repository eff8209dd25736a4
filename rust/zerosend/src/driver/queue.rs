//! The ordered per-socket queue: sends enter it in call order (`submit`, `submit_file`), the
//! head is written (in parts if the kernel takes it in parts), and a send completes only when it
//! is written and released; `drain` and `close` wait on it.

use std::collections::VecDeque;
use std::os::fd::{BorrowedFd, OwnedFd};

use nix::errno::Errno;

use super::{Backend, Completion, Driver, PendingSend, Rejected, SocketId, SocketStats, Submitted};
use crate::buf::IoBuf;
use crate::error::{Error, Result};
use crate::op::{CopyReason, FileSource, Mode, OpKey, SendOp};
use crate::registry::Claim;
use crate::sys::{self, Transport, IOV_MAX};

/// One registered socket.
pub(super) struct Entry<T> {
    pub(super) fd: OwnedFd,
    /// This registration's exclusive hold on the socket, released when the entry goes.
    pub(super) claim: Claim,
    pub(super) transport: Transport,
    pub(super) backend: Backend,
    pub(super) fallback_reason: Option<String>,
    pub(super) threshold: usize,
    /// Sends with bytes still to write, oldest first; only the head is being written.
    pub(super) queue: VecDeque<OpKey>,
    /// Sends not yet released (queued or awaiting notifications).
    pub(super) inflight: usize,
    /// The socket's sendmsg side: MSG_ZEROCOPY numbering, EPOLLOUT, queued errors (owned by
    /// `sendmsg.rs`).
    pub(super) msg: super::sendmsg::MsgSocket,
    /// ENOBUFS/ENOMEM: wait for a release before writing again.
    pub(super) awaiting_release: bool,
    /// The socket's requests in the io_uring (owned by `uring.rs`).
    pub(super) ring: super::uring::RingSocket,
    /// A fatal error ended the stream; later sends fail with it.
    pub(super) failed: Option<Error>,
    pub(super) drain_waiters: Vec<T>,
    pub(super) closing: bool,
    pub(super) stats: SocketStats,
}

impl<T, B: IoBuf> Driver<T, B> {
    /// Submits one send of `bufs` (one vectored send; one datagram on UDP). Bytes go out in
    /// submission order. The buffers stay owned by the driver until the kernel released them;
    /// then a [`Completion::Send`] carrying `token` becomes available.
    /// `zerocopy == false` asks for a copying send in the same ordered stream.
    ///
    /// Sendmsg-backed sends are written at once; io_uring sends are queued and handed to the
    /// kernel, together with every other queued since, by the next [`Driver::flush`] or
    /// [`Driver::poll`] (call one before waiting on [`Driver::fd`]).
    ///
    /// Returns [`Rejected`], with the token and buffers, only when the send could not be
    /// accepted at all (closed socket, bad arguments); failures of the stream arrive as the
    /// send's completion.
    pub fn submit(
        &mut self,
        id: SocketId,
        bufs: Vec<B>,
        zerocopy: bool,
        token: T,
    ) -> std::result::Result<(), Rejected<T, B>> {
        if let Submitted::Done {
            token,
            result,
            bufs,
        } = self.submit_now(id, bufs, zerocopy, token)?
        {
            self.completions.push(Completion::Send {
                token,
                result,
                bufs,
            });
        }
        Ok(())
    }

    /// Like [`Driver::submit`], but a send that finishes within the call (a copying send the
    /// kernel took whole, or a send on a stream that already failed) comes back at once as
    /// [`Submitted::Done`] instead of as a queued completion: a binding can then skip whatever
    /// it would do to wait for it. Otherwise the send is [`Submitted::InFlight`]; its token may
    /// still be replaced with [`Driver::set_token`] until its completion is taken.
    pub fn submit_now(
        &mut self,
        id: SocketId,
        bufs: Vec<B>,
        zerocopy: bool,
        token: T,
    ) -> std::result::Result<Submitted<T, B>, Rejected<T, B>> {
        let entry = match self.entry_mut(id) {
            Ok(entry) => entry,
            Err(error) => return Err(Rejected { error, token, bufs }),
        };
        if let Some(err) = &entry.failed {
            // The stream already broke: this send fails like the ones before it, through its
            // completion, so callers handle every stream error in one place.
            let result = Err(err.clone());
            entry.stats.sends += 1;
            entry.stats.errors += 1;
            return Ok(Submitted::Done {
                token,
                result,
                bufs,
            });
        }
        if entry.transport == Transport::Udp && bufs.len() > IOV_MAX {
            let error = Error::InvalidArgument(format!(
                "a datagram can be gathered from at most {IOV_MAX} buffers, got {}",
                bufs.len()
            ));
            return Err(Rejected { error, token, bufs });
        }
        let total: usize = bufs.iter().map(IoBuf::len).sum();
        let mode = if !zerocopy {
            Mode::Copy(CopyReason::Requested)
        } else if entry.backend == Backend::Copy {
            Mode::Copy(CopyReason::Backend)
        } else if total < entry.threshold || total == 0 {
            Mode::Copy(CopyReason::BelowThreshold)
        } else {
            Mode::ZeroCopy
        };
        let use_ring = entry.backend == Backend::IoUring && mode == Mode::ZeroCopy;
        let mut op = SendOp::new(token, bufs, mode, id);
        if use_ring && op.bufs.len() == 1 {
            op.fixed = self.fixed_lease(op.bufs[0].as_ptr(), op.bufs[0].len());
        }
        Ok(self.enqueue_now(id, op))
    }

    /// Replaces the token of a send in flight; returns the old one. Fails, handing `token`
    /// back, if the send's completion was already queued (or taken).
    pub fn set_token(&mut self, send: PendingSend, token: T) -> std::result::Result<T, T> {
        match self.ops.get_mut(send.0) {
            Some(op) => Ok(std::mem::replace(&mut op.token, token)),
            None => Err(token),
        }
    }

    /// Submits a send of `count` bytes of `file` from `offset` (to its end if `count` is None)
    /// with `sendfile(2)`, in the same ordered stream as every other send: page cache to
    /// socket, never through user memory (the result says `zerocopy: false`; the bytes are
    /// counted in [`SocketStats::bytes_sendfile`]). TCP only. The driver holds its own duplicate
    /// of the file descriptor until the send completes with a [`Completion::Send`] carrying
    /// `token` (and no buffers); the file's own offset is neither used nor moved.
    ///
    /// The file is checked before anything is queued (a regular file, open for reading, with
    /// `offset + count` within its size), so a bad file is refused with nothing sent. A file
    /// truncated while it is being sent ends the stream with an error. The socket's peer
    /// closing makes `sendfile` raise `SIGPIPE`, which Rust and Python programs ignore.
    pub fn submit_file(
        &mut self,
        id: SocketId,
        file: BorrowedFd<'_>,
        offset: u64,
        count: Option<u64>,
        token: T,
    ) -> std::result::Result<(), Rejected<T, B>> {
        let entry = match self.entry_mut(id) {
            Ok(entry) => entry,
            Err(error) => {
                return Err(Rejected {
                    error,
                    token,
                    bufs: Vec::new(),
                })
            }
        };
        let (fd, count) = match file_send_checked(entry.transport, file, offset, count) {
            Ok(checked) => checked,
            Err(error) => {
                return Err(Rejected {
                    error,
                    token,
                    bufs: Vec::new(),
                })
            }
        };
        if let Some(err) = entry.failed.clone() {
            entry.stats.sends += 1;
            entry.stats.errors += 1;
            self.completions.push(Completion::Send {
                token,
                result: Err(err),
                bufs: Vec::new(),
            });
            return Ok(());
        }
        let op = SendOp::file(token, FileSource { fd, offset }, count, id);
        if let Submitted::Done {
            token,
            result,
            bufs,
        } = self.enqueue_now(id, op)
        {
            self.completions.push(Completion::Send {
                token,
                result,
                bufs,
            });
        }
        Ok(())
    }

    /// Queues the send behind the socket's others and writes it at once if it is the head;
    /// a send that finishes meanwhile is handed back as done.
    fn enqueue_now(&mut self, id: SocketId, op: SendOp<T, B>) -> Submitted<T, B> {
        let key = self.insert_op(op);
        let entry = self
            .sockets
            .get_mut(id)
            .expect("the socket was checked by the caller");
        entry.inflight += 1;
        entry.queue.push_back(key);
        if entry.queue.len() == 1 {
            self.inline = Some(key);
            self.pump(id);
            self.inline = None;
        }
        match self.inline_done.take() {
            Some((token, result, bufs)) => Submitted::Done {
                token,
                result,
                bufs,
            },
            None => Submitted::InFlight(PendingSend(key)),
        }
    }

    /// Arranges a [`Completion::Drained`] with `token` once the socket has nothing in flight.
    pub fn drain(&mut self, id: SocketId, token: T) -> Result<()> {
        self.check_process()?;
        let entry = match self.sockets.get_mut(id) {
            Some(entry) => entry,
            None => {
                self.completions.push(Completion::Drained { token });
                return Ok(());
            }
        };
        if entry.inflight == 0 {
            self.completions.push(Completion::Drained { token });
        } else {
            entry.drain_waiters.push(token);
        }
        Ok(())
    }

    /// Stops accepting sends on the socket. Sends already submitted still go out whole; the
    /// driver closes its descriptor after the last one is released.
    pub fn close(&mut self, id: SocketId) {
        let Ok(entry) = self.entry_mut(id) else {
            return;
        };
        entry.closing = true;
        if entry.inflight == 0 {
            self.remove_entry(id);
        }
    }

    /// The kernel would not send this zero-copy send as such: it refused to pin more memory
    /// (ENOBUFS/ENOMEM: `net.core.optmem_max` or `RLIMIT_MEMLOCK`), or a datagram's pages need
    /// more fragments than one skb holds (EMSGSIZE). If the socket has releases to come, wait for
    /// them and try again; otherwise send it by copy, which needs neither, so the stream never
    /// gets a hole. Returns false if `errno` is not such a refusal.
    pub(super) fn zerocopy_refused(&mut self, id: SocketId, key: OpKey, errno: Errno) -> bool {
        let Some(entry) = self.sockets.get_mut(id) else {
            return false;
        };
        let op = self.ops.get_mut(key).expect("the send exists");
        let refusal = match errno {
            Errno::ENOBUFS | Errno::ENOMEM => true,
            Errno::EMSGSIZE => entry.transport == Transport::Udp,
            _ => false,
        };
        if !refusal || !op.zerocopy() {
            return false;
        }
        // Releases of other sends may free memory; this send's own (a failed io_uring request
        // still notifies) would only bring it back here.
        let pending = entry.msg.outstanding() + entry.ring.releases_pending();
        let releases_to_come = pending > op.notifications_pending as usize;
        if errno != Errno::EMSGSIZE && releases_to_come {
            entry.stats.enobufs_waits += 1;
            entry.awaiting_release = true;
        } else {
            entry.stats.zerocopy_refusals += 1;
            op.mode = Mode::Copy(CopyReason::KernelFallback);
        }
        true
    }

    /// Credits `n` bytes the kernel accepted to the sends at the head of the socket's queue
    /// (one sendmsg may gather several copying sends) and dequeues those now fully written.
    pub(super) fn advance_queue(&mut self, id: SocketId, mut n: usize) {
        let Some(entry) = self.sockets.get_mut(id) else {
            return;
        };
        let mut finished = std::mem::take(&mut self.scratch_finished);
        finished.clear();
        while let Some(&key) = entry.queue.front() {
            let op = self.ops.get_mut(key).expect("queued send exists");
            let take = (op.total - op.written).min(n);
            op.written += take;
            n -= take;
            if op.written < op.total && entry.transport == Transport::Tcp {
                if take > 0 {
                    entry.stats.short_sends += 1;
                }
                break;
            }
            entry.queue.pop_front();
            op.queued = false;
            finished.push(key);
            if entry.transport == Transport::Udp {
                break; // one sendmsg, one datagram
            }
        }
        for &key in &finished {
            self.try_finish(key);
        }
        self.scratch_finished = finished;
    }

    /// Resumes writing a socket that waited for releases (ENOBUFS/ENOMEM) now that one came.
    pub(super) fn release_arrived(&mut self, id: SocketId) {
        let Some(entry) = self.sockets.get_mut(id) else {
            return;
        };
        if std::mem::take(&mut entry.awaiting_release) {
            self.pump(id);
        }
    }

    /// A send of socket `id` failed with `errno` before all its bytes were written.
    pub(super) fn send_failed(&mut self, id: SocketId, key: OpKey, errno: Errno) {
        let Some(entry) = self.sockets.get_mut(id) else {
            return;
        };
        let op = self.ops.get_mut(key).expect("failed send exists");
        if !op.queued {
            return;
        }
        let error = Error::os("sending on the socket", errno);
        // A datagram failure leaves the socket usable: fail just this send. On a stream any
        // failure leaves a hole or a torn message, so the stream ends.
        if entry.transport == Transport::Udp {
            entry.queue.pop_front();
            op.queued = false;
            op.error = Some(error);
            self.try_finish(key);
        } else {
            self.fail_socket(id, error);
        }
    }

    /// Ends the stream: every send still queued fails with `error`. Sends already written keep
    /// waiting for their release notifications.
    pub(super) fn fail_socket(&mut self, id: SocketId, error: Error) {
        let Some(entry) = self.sockets.get_mut(id) else {
            return;
        };
        entry.failed = Some(error.clone());
        let keys: Vec<OpKey> = entry.queue.drain(..).collect();
        for key in keys {
            if let Some(op) = self.ops.get_mut(key) {
                op.queued = false;
                op.error = Some(error.clone());
            }
            self.try_finish(key);
        }
    }

    /// Completes the send if the kernel can no longer read its buffers.
    pub(super) fn try_finish(&mut self, key: OpKey) {
        if !self.ops.get(key).is_some_and(|op| op.released()) {
            return;
        }
        let op = self.ops.remove(key).expect("checked above");
        let id = op.socket;
        let entry = self
            .sockets
            .get_mut(id)
            .expect("a send's socket outlives it");
        entry.inflight -= 1;
        let stats = &mut entry.stats;
        stats.sends += 1;
        let total = op.total as u64;
        if op.error.is_some() {
            stats.errors += 1;
        } else {
            match op.mode {
                Mode::ZeroCopy if !op.kernel_copied => stats.bytes_zerocopy += total,
                Mode::ZeroCopy | Mode::Copy(CopyReason::KernelFallback) => {
                    stats.bytes_copied_by_kernel += total
                }
                Mode::Copy(CopyReason::BelowThreshold) => {
                    stats.bytes_copied_below_threshold += total
                }
                Mode::Copy(CopyReason::Requested) => stats.bytes_copied_requested += total,
                Mode::Copy(CopyReason::Backend) => stats.bytes_copied_backend += total,
                Mode::Copy(CopyReason::RingFull) => stats.bytes_copied_ring_full += total,
                Mode::Copy(CopyReason::File) => stats.bytes_sendfile += total,
            }
            let copied = match op.mode {
                Mode::ZeroCopy => op.kernel_copied,
                Mode::Copy(reason) => reason != CopyReason::File,
            };
            if copied {
                stats.bytes_copied += total;
            }
            if op.fixed.is_some() {
                stats.fixed_buffer_sends += 1;
            }
        }
        let (token, result, bufs, lease) = op.finish();
        if self.inline == Some(key) {
            self.inline_done = Some((token, result, bufs));
        } else {
            self.completions.push(Completion::Send {
                token,
                result,
                bufs,
            });
        }
        if entry.inflight == 0 {
            for token in entry.drain_waiters.drain(..) {
                self.completions.push(Completion::Drained { token });
            }
            if entry.closing {
                self.remove_entry(id);
            }
        }
        if let Some(lease) = lease {
            self.lease_dropped(lease);
        }
    }

    pub(super) fn remove_entry(&mut self, id: SocketId) {
        if let Some(entry) = self.sockets.remove(id) {
            let _ = self.epoll.delete(&entry.fd);
            if let Some(number) = entry.msg.number_to_save() {
                entry.claim.save_zerocopy_number(number);
            }
            for token in entry.drain_waiters {
                self.completions.push(Completion::Drained { token });
            }
        }
    }
}

/// Checks a `send_file` request and takes the driver's own duplicate of the file: returns it
/// with the byte count to send.
fn file_send_checked(
    transport: Transport,
    file: BorrowedFd<'_>,
    offset: u64,
    count: Option<u64>,
) -> Result<(std::os::fd::OwnedFd, usize)> {
    if transport != Transport::Tcp {
        return Err(Error::InvalidArgument(
            "send_file needs a TCP socket; on UDP, read the file into a buffer and send it as \
             datagrams with send_zc"
                .into(),
        ));
    }
    let size = sys::inspect_file(file)?;
    if offset > size {
        return Err(Error::InvalidArgument(format!(
            "offset {offset} is past the end of the file ({size} bytes)"
        )));
    }
    let count = count.unwrap_or(size - offset);
    if count > size - offset {
        return Err(Error::InvalidArgument(format!(
            "offset {offset} + count {count} is past the end of the file ({size} bytes); \
             pass count=None to send up to the end"
        )));
    }
    let count = usize::try_from(count)
        .map_err(|_| Error::InvalidArgument(format!("count {count} is too large")))?;
    Ok((sys::duplicate(file)?, count))
}
