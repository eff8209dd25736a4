//! The driver: one per event loop. It owns every in-flight send, talks to the kernel on both
//! zero-copy backends, and exposes a single pollable descriptor.
//!
//! Callers submit sends and, whenever [`Driver::fd`] is readable, call [`Driver::poll`] and take
//! the finished sends from [`Driver::take_completions`]. Nothing blocks and no thread is involved,
//! so an event loop resolves many sends per wake-up.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};

mod io_uring;
mod sendmsg;

use crate::buf::IoBuf;
use crate::capabilities::Capabilities;
use crate::error::{Error, Result};
use crate::op::{CopyReason, Mode, OpKey, SendOp, SendResult};
use crate::region::Region;
use crate::registry::{self, Claim};
use crate::ring::{Ring, RingEvent, VectoredRequest};
use crate::sys::{self, Transport, IOV_MAX};
use crate::tracker::ZerocopyTracker;

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
    index: u32,
    generation: u32,
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

/// Epoll data tag of the ring's eventfd (socket tags carry their index and generation).
const RING_TAG: u64 = u64::MAX;
const EVENT_BATCH: usize = 64;

struct Entry<T> {
    fd: OwnedFd,
    /// This registration's exclusive hold on the socket, released when the entry goes.
    claim: Claim,
    generation: u32,
    transport: Transport,
    backend: Backend,
    fallback_reason: Option<String>,
    threshold: usize,
    /// Sends with bytes still to write, oldest first; only the head is being written.
    queue: VecDeque<OpKey>,
    /// Sends not yet released (queued or awaiting notifications).
    inflight: usize,
    tracker: ZerocopyTracker<OpKey>,
    /// EPOLLOUT is armed because the socket buffer was full.
    want_write: bool,
    /// ENOBUFS/ENOMEM: wait for a release before writing again.
    awaiting_release: bool,
    /// io_uring release notifications still to come for this socket's sends.
    ring_releases_pending: usize,
    /// A fatal error ended the stream; later sends fail with it.
    failed: Option<Error>,
    drain_waiters: Vec<T>,
    closing: bool,
    stats: SocketStats,
}

/// Drives zero-copy sends for many sockets from one thread.
pub struct Driver<T, B: IoBuf> {
    epoll: Epoll,
    entries: Vec<Option<Entry<T>>>,
    generations: Vec<u32>,
    free_entries: Vec<u32>,
    ops: Vec<Option<SendOp<T, B>>>,
    free_ops: Vec<OpKey>,
    ring: Option<Ring>,
    /// Regions that sends may come from; region `i` is fixed-buffer slot `i` of the ring.
    /// Declared after `ring` so the ring (and its registration) goes first on drop.
    regions: Vec<Arc<Region>>,
    /// Why registered buffers cannot be used with this ring, if they cannot.
    fixed_unavailable: Option<String>,
    capabilities: Capabilities,
    completions: Vec<Completion<T, B>>,
    scratch_iov: Vec<libc::iovec>,
    scratch_keys: Vec<OpKey>,
    scratch_events: Vec<RingEvent>,
    scratch_completions: Vec<sys::ZerocopyCompletion>,
    /// Sockets whose next request found the ring's submission queue full.
    ring_backlog: Vec<u32>,
    vectored: Vec<Option<Box<VectoredRequest>>>,
}

// SAFETY: the only non-Send parts are raw pointers in `scratch_iov` and `vectored`. They point
// into buffers owned by this driver's own sends (or into `vectored` itself), so they move to
// another thread together with what they point at; every other field is Send when T and B are.
unsafe impl<T: Send, B: IoBuf + Send> Send for Driver<T, B> {}

impl<T, B: IoBuf> Driver<T, B> {
    /// A driver with no sockets. Probes the kernel once.
    pub fn new() -> Result<Self> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
            .map_err(|e| Error::os("epoll_create1", e))?;
        Ok(Self {
            epoll,
            entries: Vec::new(),
            generations: Vec::new(),
            free_entries: Vec::new(),
            ops: Vec::new(),
            free_ops: Vec::new(),
            ring: None,
            regions: Vec::new(),
            fixed_unavailable: None,
            capabilities: Capabilities::probe(),
            completions: Vec::new(),
            scratch_iov: Vec::with_capacity(IOV_MAX),
            scratch_keys: Vec::new(),
            scratch_events: Vec::new(),
            scratch_completions: Vec::new(),
            ring_backlog: Vec::new(),
            vectored: Vec::new(),
        })
    }

    /// The descriptor to watch for readability; when readable, call [`Driver::poll`].
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.epoll.0.as_fd()
    }

    /// What the kernel offered when this driver was created.
    pub fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    /// Registers a connected TCP/UDP socket. The driver keeps its own duplicate of the
    /// descriptor until the last send on it is released.
    pub fn register(
        &mut self,
        socket: BorrowedFd<'_>,
        options: &SocketOptions,
    ) -> Result<SocketId> {
        let transport = sys::inspect_socket(socket)?;
        let claim = Claim::acquire(registry::socket_key(socket)?)?;
        let fd = sys::duplicate(socket)?;
        let (backend, fallback_reason, first_number) =
            self.choose_backend(fd.as_fd(), &claim, options.backend)?;

        let index = match self.free_entries.pop() {
            Some(index) => index,
            None => {
                self.entries.push(None);
                self.generations.push(0);
                (self.entries.len() - 1) as u32
            }
        };
        let generation = self.generations[index as usize].wrapping_add(1);
        self.generations[index as usize] = generation;
        let tag = socket_tag(index, generation);
        if let Err(e) = self
            .epoll
            .add(&fd, EpollEvent::new(EpollFlags::EPOLLET, tag))
        {
            self.free_entries.push(index);
            return Err(Error::os("adding the socket to the driver's epoll set", e));
        }
        self.entries[index as usize] = Some(Entry {
            fd,
            claim,
            generation,
            transport,
            backend,
            fallback_reason,
            threshold: options.zerocopy_threshold,
            queue: VecDeque::new(),
            inflight: 0,
            tracker: ZerocopyTracker::starting_at(first_number),
            want_write: false,
            awaiting_release: false,
            ring_releases_pending: 0,
            failed: None,
            drain_waiters: Vec::new(),
            closing: false,
            stats: SocketStats::default(),
        });
        Ok(SocketId { index, generation })
    }

    /// Picks the socket's backend: `(backend, why not a better one, first MSG_ZEROCOPY number)`.
    fn choose_backend(
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

    fn entry(&self, id: SocketId) -> Result<&Entry<T>> {
        match self.entries.get(id.index as usize) {
            Some(Some(entry)) if entry.generation == id.generation && !entry.closing => Ok(entry),
            _ => Err(Error::Closed),
        }
    }

    fn entry_mut(&mut self, id: SocketId) -> Result<&mut Entry<T>> {
        match self.entries.get_mut(id.index as usize) {
            Some(Some(entry)) if entry.generation == id.generation && !entry.closing => Ok(entry),
            _ => Err(Error::Closed),
        }
    }

    /// The backend chosen for the socket.
    pub fn backend(&self, id: SocketId) -> Result<Backend> {
        Ok(self.entry(id)?.backend)
    }

    /// Why the socket did not get a better backend, when it was chosen automatically.
    pub fn fallback_reason(&self, id: SocketId) -> Result<Option<String>> {
        Ok(self.entry(id)?.fallback_reason.clone())
    }

    /// True while the socket is registered, including after [`Driver::close`] until its last
    /// send was released.
    pub fn is_registered(&self, id: SocketId) -> bool {
        matches!(self.entries.get(id.index as usize), Some(Some(entry)) if entry.generation == id.generation)
    }

    /// Sends on the socket whose buffers the kernel has not released yet.
    pub fn inflight(&self, id: SocketId) -> Result<usize> {
        Ok(self.entry(id)?.inflight)
    }

    /// The socket's counters.
    pub fn stats(&self, id: SocketId) -> Result<SocketStats> {
        Ok(self.entry(id)?.stats.clone())
    }

    /// Submits one send of `bufs` (one vectored send; one datagram on UDP). Bytes go out in
    /// submission order. The buffers stay owned by the driver until the kernel released them;
    /// then a [`Completion::Send`] carrying `token` becomes available.
    /// `zerocopy == false` asks for a copying send in the same ordered stream.
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
        let entry = match self.entry_mut(id) {
            Ok(entry) => entry,
            Err(error) => return Err(Rejected { error, token, bufs }),
        };
        if let Some(err) = &entry.failed {
            // The stream already broke: this send fails like the ones before it, through its
            // completion, so callers handle every stream error in one place.
            let result = Err(err.clone());
            self.completions.push(Completion::Send {
                token,
                result,
                bufs,
            });
            return Ok(());
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
        let mut op = SendOp::new(token, bufs, mode, id.index);
        if use_ring && op.bufs.len() == 1 {
            op.fixed = self.fixed_slot(op.bufs[0].as_ptr(), op.bufs[0].len());
        }
        let key = self.insert_op(op);
        let entry = self.entries[id.index as usize]
            .as_mut()
            .expect("entry checked above");
        entry.inflight += 1;
        entry.queue.push_back(key);
        if entry.queue.len() == 1 {
            self.pump(id.index);
        }
        // The send is accepted either way: if the kernel refuses the submission now, the entry
        // stays queued in the ring and the next poll() retries it and reports the failure.
        let _ = self.flush_ring();
        Ok(())
    }

    /// Arranges a [`Completion::Drained`] with `token` once the socket has nothing in flight.
    pub fn drain(&mut self, id: SocketId, token: T) -> Result<()> {
        let entry = match self.entries.get_mut(id.index as usize) {
            Some(Some(entry)) if entry.generation == id.generation => entry,
            _ => {
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
            self.remove_entry(id.index);
        }
    }

    /// Processes everything the kernel reported since the last call, without blocking.
    pub fn poll(&mut self) -> Result<()> {
        let mut events = [EpollEvent::empty(); EVENT_BATCH];
        loop {
            let n = loop {
                match self.epoll.wait(&mut events, 0u16) {
                    Ok(n) => break n,
                    Err(Errno::EINTR) => continue,
                    Err(e) => return Err(Error::os("epoll_wait on the driver", e)),
                }
            };
            for event in &events[..n] {
                if event.data() == RING_TAG {
                    self.process_ring();
                } else {
                    self.process_socket(event.data(), event.events());
                }
            }
            self.flush_ring()?;
            if n < EVENT_BATCH {
                return Ok(());
            }
        }
    }

    /// Takes the sends released (and drains finished) so far.
    pub fn take_completions(&mut self) -> std::vec::Drain<'_, Completion<T, B>> {
        self.completions.drain(..)
    }

    /// True if completions are waiting to be taken.
    pub fn has_completions(&self) -> bool {
        !self.completions.is_empty()
    }

    fn insert_op(&mut self, op: SendOp<T, B>) -> OpKey {
        match self.free_ops.pop() {
            Some(key) => {
                self.ops[key as usize] = Some(op);
                key
            }
            None => {
                self.ops.push(Some(op));
                self.vectored.push(None);
                (self.ops.len() - 1) as OpKey
            }
        }
    }

    /// The kernel would not send this zero-copy send as such: it refused to pin more memory
    /// (ENOBUFS/ENOMEM: `net.core.optmem_max` or `RLIMIT_MEMLOCK`), or a datagram's pages need
    /// more fragments than one skb holds (EMSGSIZE). If the socket has releases to come, wait for
    /// them and try again; otherwise send it by copy, which needs neither, so the stream never
    /// gets a hole. Returns false if `errno` is not such a refusal.
    fn zerocopy_refused(&mut self, index: u32, key: OpKey, errno: Errno) -> bool {
        let Some(Some(entry)) = self.entries.get_mut(index as usize) else {
            return false;
        };
        let op = self.ops[key as usize].as_mut().expect("the send exists");
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
        let pending = entry.tracker.outstanding() + entry.ring_releases_pending;
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
    fn advance_queue(&mut self, index: u32, mut n: usize) {
        let mut finished = Vec::new();
        let Some(Some(entry)) = self.entries.get_mut(index as usize) else {
            return;
        };
        while let Some(&key) = entry.queue.front() {
            let op = self.ops[key as usize].as_mut().expect("queued send exists");
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
        for key in finished {
            self.try_finish(key);
        }
    }

    /// Resumes writing a socket that waited for releases (ENOBUFS/ENOMEM) now that one came.
    fn release_arrived(&mut self, index: u32) {
        let Some(Some(entry)) = self.entries.get_mut(index as usize) else {
            return;
        };
        if std::mem::take(&mut entry.awaiting_release) {
            self.pump(index);
        }
    }

    /// A send of socket `index` failed with `errno` before all its bytes were written.
    fn send_failed(&mut self, index: u32, key: OpKey, errno: Errno) {
        let Some(Some(entry)) = self.entries.get_mut(index as usize) else {
            return;
        };
        let op = self.ops[key as usize].as_mut().expect("failed send exists");
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
            self.fail_socket(index, error);
        }
    }

    /// Ends the stream: every send still queued fails with `error`. Sends already written keep
    /// waiting for their release notifications.
    fn fail_socket(&mut self, index: u32, error: Error) {
        let Some(Some(entry)) = self.entries.get_mut(index as usize) else {
            return;
        };
        entry.failed = Some(error.clone());
        let keys: Vec<OpKey> = entry.queue.drain(..).collect();
        for key in keys {
            if let Some(op) = self.ops[key as usize].as_mut() {
                op.queued = false;
                op.error = Some(error.clone());
            }
            self.try_finish(key);
        }
    }

    /// Completes the send if the kernel can no longer read its buffers.
    fn try_finish(&mut self, key: OpKey) {
        match self.ops[key as usize].as_ref() {
            Some(op) if op.released() => {}
            _ => return,
        }
        let op = self.ops[key as usize].take().expect("checked above");
        self.free_ops.push(key);
        let index = op.socket;
        let entry = self.entries[index as usize]
            .as_mut()
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
            }
            if op.mode != Mode::ZeroCopy || op.kernel_copied {
                stats.bytes_copied += total;
            }
            if op.fixed.is_some() {
                stats.fixed_buffer_sends += 1;
            }
        }
        let (token, result, bufs) = op.finish();
        self.completions.push(Completion::Send {
            token,
            result,
            bufs,
        });
        if entry.inflight == 0 {
            for token in entry.drain_waiters.drain(..) {
                self.completions.push(Completion::Drained { token });
            }
            if entry.closing {
                self.remove_entry(index);
            }
        }
    }

    fn remove_entry(&mut self, index: u32) {
        if let Some(entry) = self.entries[index as usize].take() {
            let _ = self.epoll.delete(&entry.fd);
            if entry.backend == Backend::MsgZerocopy && entry.tracker.outstanding() == 0 {
                entry
                    .claim
                    .save_zerocopy_number(entry.tracker.next_number());
            }
            for token in entry.drain_waiters {
                self.completions.push(Completion::Drained { token });
            }
            self.free_entries.push(index);
        }
    }
}

impl<T, B: IoBuf> Drop for Driver<T, B> {
    fn drop(&mut self) {
        // The ring and the sockets may still reference buffers of unreleased sends. Their memory
        // must never be reused while the kernel can read it, so it is leaked, not freed.
        for (op, request) in self.ops.iter_mut().zip(self.vectored.iter_mut()) {
            match op.take() {
                Some(op) if !op.released() => {
                    std::mem::forget(op.bufs);
                    std::mem::forget(op.token);
                    std::mem::forget(request.take());
                }
                _ => {}
            }
        }
    }
}

fn socket_tag(index: u32, generation: u32) -> u64 {
    u64::from(index) | (u64::from(generation) << 32)
}
