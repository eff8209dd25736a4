//! The driver: one per event loop. It owns every in-flight send, talks to the kernel on both
//! zero-copy backends, and exposes a single pollable descriptor.
//!
//! Callers submit sends, [`Driver::flush`] them once per event loop turn, and whenever
//! [`Driver::fd`] is readable call [`Driver::poll`] and take the finished sends from
//! [`Driver::take_completions`]. Nothing blocks and no thread is involved,
//! so an event loop resolves many sends per wake-up.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};

mod choice;
mod queue;
mod regions;
mod sendmsg;
mod types;
mod uring;

use queue::Entry;
pub use types::{
    Backend, Completion, PendingSend, Rejected, SocketId, SocketOptions, SocketStats, Submitted,
};

use crate::buf::IoBuf;
use crate::capabilities::Capabilities;
use crate::error::{Error, Result};
use crate::fork;
use crate::op::{CopyReason, FileSource, Mode, OpKey, SendOp, SendResult};
use crate::registry::{self, Claim};
use crate::ring::{Ring, RingEvent, VectoredRequest};
use crate::slab::Slab;
use crate::sys::{self, Transport, IOV_MAX};
use crate::tracker::ZerocopyTracker;

/// What an event of the driver's epoll set is about: decoded once from the event's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    /// The ring's descriptor.
    Ring,
    /// The timer that ends a wait for ring room (see `uring.rs`).
    RingTimer,
    /// A socket, by its handle (a slot index of `u32::MAX` would take 4 billion sockets, so no
    /// handle collides with the two tags above).
    Socket(SocketId),
}

impl Tag {
    fn to_raw(self) -> u64 {
        match self {
            Tag::Ring => u64::MAX,
            Tag::RingTimer => u64::MAX - 1,
            Tag::Socket(id) => id.to_raw(),
        }
    }

    fn from_raw(raw: u64) -> Self {
        match raw {
            u64::MAX => Tag::Ring,
            raw if raw == u64::MAX - 1 => Tag::RingTimer,
            raw => Tag::Socket(SocketId::from_raw(raw)),
        }
    }
}
const EVENT_BATCH: usize = 64;

/// Drives zero-copy sends for many sockets from one thread.
pub struct Driver<T, B: IoBuf> {
    epoll: Epoll,
    sockets: Slab<Entry<T>, SocketId>,
    ops: Slab<SendOp<T, B>>,
    ring: Option<Ring>,
    /// Regions that sends may come from; region `i` is fixed-buffer slot `i` of the ring.
    /// Declared after `ring` so the ring (and its registration) goes first on drop.
    regions: Vec<Option<regions::Slot>>,
    /// Why registered buffers cannot be used with this ring, if they cannot.
    fixed_unavailable: Option<String>,
    capabilities: Capabilities,
    completions: Vec<Completion<T, B>>,
    /// The send that `submit_now` is submitting: its completion, if it comes within the call,
    /// goes to `inline_done` instead of `completions`.
    inline: Option<OpKey>,
    inline_done: Option<(T, Result<SendResult>, Vec<B>)>,
    scratch_finished: Vec<OpKey>,
    scratch_iov: Vec<libc::iovec>,
    scratch_keys: Vec<OpKey>,
    scratch_events: Vec<RingEvent>,
    scratch_completions: Vec<sys::ZerocopyCompletion>,
    /// Sockets with zero-copy sends to queue in the ring at the next flush, oldest first.
    ring_waiting: VecDeque<SocketId>,
    /// Sockets with a chain of requests in the ring.
    ring_chains: usize,
    /// Since when sockets have waited for ring room with no ring completion reaped.
    ring_stalled_since: Option<std::time::Instant>,
    /// Wakes the event loop (through the epoll set) when that wait reaches its limit.
    ring_timer: Option<std::os::fd::OwnedFd>,
    vectored: Vec<Option<Box<VectoredRequest>>>,
    /// The caller watches the ring's descriptor itself (see [`Driver::ring_fd_apart`]), so it is
    /// not in the epoll set.
    ring_apart: bool,
    /// The process that created the driver; in any other (a fork child) it refuses all work.
    process: fork::Process,
    /// Every call comes from one thread: the ring may use DEFER_TASKRUN.
    single_issuer: bool,
    /// [`Driver::shut_down`] closed the kernel objects: no socket can be registered any more.
    shut: bool,
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
            sockets: Slab::default(),
            ops: Slab::default(),
            ring: None,
            regions: Vec::new(),
            fixed_unavailable: None,
            capabilities: Capabilities::probe(),
            completions: Vec::new(),
            inline: None,
            inline_done: None,
            scratch_finished: Vec::new(),
            scratch_iov: Vec::with_capacity(IOV_MAX),
            scratch_keys: Vec::new(),
            scratch_events: Vec::new(),
            scratch_completions: Vec::new(),
            ring_waiting: VecDeque::new(),
            ring_chains: 0,
            ring_stalled_since: None,
            ring_timer: None,
            vectored: Vec::new(),
            ring_apart: false,
            process: fork::current(),
            single_issuer: false,
            shut: false,
        })
    }

    /// A driver used from one thread only: the thread that registers its first io_uring
    /// socket (which creates the ring) must make every later call on it (an event loop's
    /// thread). Its ring is then set up with `IORING_SETUP_SINGLE_ISSUER | DEFER_TASKRUN`
    /// where the kernel accepts it: completions are posted only when the driver asks, in
    /// batches, and submitting and reaping take one system call. A call from another thread
    /// fails with `EEXIST`.
    pub fn new_single_thread() -> Result<Self> {
        let mut driver = Self::new()?;
        driver.single_issuer = true;
        Ok(driver)
    }

    /// How the io_uring was set up: `None` before the first io_uring socket made it,
    /// `Some(Ok(()))` with DEFER_TASKRUN, `Some(Err(reason))` without it and why.
    pub fn ring_defer_taskrun(&self) -> Option<std::result::Result<(), String>> {
        self.ring.as_ref().map(|ring| match ring.defer_refused() {
            None if ring.deferred_taskrun() => Ok(()),
            None => Err("not set up".to_string()),
            Some(reason) => Err(reason.to_string()),
        })
    }

    /// True in a process that inherited this driver through `fork()`. There every call that
    /// would touch the kernel fails with [`Error::Forked`] and [`Driver::close`] does nothing:
    /// the epoll set, the io_uring and the sockets are shared with the parent, which still uses
    /// them. Dropping the driver there only closes the child's descriptors.
    pub fn forked(&self) -> bool {
        self.process != fork::current()
    }

    fn check_process(&self) -> Result<()> {
        if self.forked() {
            Err(Error::Forked)
        } else {
            Ok(())
        }
    }

    /// The descriptor to watch for readability; when readable, call [`Driver::poll`].
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.epoll.0.as_fd()
    }

    /// For an event loop that can watch two descriptors: takes the io_uring out of
    /// [`Driver::fd`]'s epoll set (now and for a ring created later) and returns its descriptor,
    /// if the driver has a ring yet. The caller then watches it too and, when it is readable,
    /// calls [`Driver::poll_ring`]: completions are reaped straight from the ring's shared
    /// memory, with no nested `epoll_wait`. Idempotent.
    pub fn ring_fd_apart(&mut self) -> Result<Option<BorrowedFd<'_>>> {
        self.check_process()?;
        if !self.ring_apart {
            self.ring_apart = true;
            if let Some(ring) = &self.ring {
                // SAFETY: the ring's descriptor is open while `self.ring` holds it.
                let fd = unsafe { BorrowedFd::borrow_raw(ring.fd()) };
                self.epoll
                    .delete(fd)
                    .map_err(|e| Error::os("taking the io_uring out of the epoll set", e))?;
            }
        }
        // SAFETY: as above; the borrow is tied to `self`, which owns the ring.
        Ok(self
            .ring
            .as_ref()
            .map(|ring| unsafe { BorrowedFd::borrow_raw(ring.fd()) }))
    }

    /// Processes the io_uring's completions (from shared memory: no system call unless the
    /// kernel overflowed some) and hands sends they unblocked to the kernel. For a caller that
    /// watches the ring apart ([`Driver::ring_fd_apart`]); [`Driver::poll`] does this too.
    pub fn poll_ring(&mut self) -> Result<()> {
        self.check_process()?;
        if let Some(ring) = &self.ring {
            ring.clear_wake();
        }
        self.process_ring()?;
        self.flush()
    }

    /// Like [`Driver::poll_ring`], for a caller that was not woken by the ring's descriptor
    /// (at the end of an event loop turn, say): reaps what is there without consuming the
    /// descriptor's readiness.
    pub fn reap_ring(&mut self) -> Result<()> {
        self.check_process()?;
        self.process_ring()?;
        self.flush()
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
        self.check_process()?;
        if self.shut {
            return Err(Error::Closed);
        }
        let transport = sys::inspect_socket(socket)?;
        let claim = Claim::acquire(registry::socket_key(socket)?)?;
        let fd = sys::duplicate(socket)?;
        let (backend, fallback_reason, first_number) =
            self.choose_backend(fd.as_fd(), &claim, transport, options)?;

        let id = self.sockets.insert(Entry {
            fd,
            claim,
            transport,
            backend,
            fallback_reason,
            threshold: options.zerocopy_threshold,
            queue: VecDeque::new(),
            inflight: 0,
            tracker: ZerocopyTracker::starting_at(first_number),
            error_queue: backend == Backend::MsgZerocopy,
            want_write: false,
            awaiting_release: false,
            ring_releases_pending: 0,
            ring_chain: 0,
            ring_waiting: false,
            pending_error: None,
            failed: None,
            drain_waiters: Vec::new(),
            closing: false,
            stats: SocketStats::default(),
        });
        let entry = self.sockets.get(id).expect("just inserted");
        let event = EpollEvent::new(EpollFlags::EPOLLET, Tag::Socket(id).to_raw());
        if let Err(e) = self.epoll.add(&entry.fd, event) {
            self.sockets.remove(id);
            return Err(Error::os("adding the socket to the driver's epoll set", e));
        }
        Ok(id)
    }

    /// The socket, unless it was closed (or the handle is stale).
    fn entry(&self, id: SocketId) -> Result<&Entry<T>> {
        match self.sockets.get(id) {
            Some(entry) if !entry.closing => Ok(entry),
            _ => Err(Error::Closed),
        }
    }

    fn entry_mut(&mut self, id: SocketId) -> Result<&mut Entry<T>> {
        self.check_process()?;
        match self.sockets.get_mut(id) {
            Some(entry) if !entry.closing => Ok(entry),
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
        self.sockets.get(id).is_some()
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

    /// Processes everything the kernel reported since the last call, without blocking.
    pub fn poll(&mut self) -> Result<()> {
        self.check_process()?;
        let mut events = [EpollEvent::empty(); EVENT_BATCH];
        loop {
            let n = loop {
                match self.epoll.wait(&mut events, 0u16) {
                    Ok(n) => break n,
                    Err(Errno::EINTR) => continue,
                    Err(e) => return Err(Error::os("epoll_wait on the driver", e)),
                }
            };
            let mut ring_ready = self.ring_apart && self.ring.is_some();
            for event in &events[..n] {
                match Tag::from_raw(event.data()) {
                    Tag::Ring => ring_ready = true,
                    Tag::RingTimer => {
                        // The flush below sends around the ring if the wait for room went on.
                        if let Some(timer) = &self.ring_timer {
                            sys::timer_clear(timer.as_fd());
                        }
                    }
                    Tag::Socket(id) => self.process_socket(id, event.events()),
                }
            }
            // Also when watched apart: reading the completion queue costs no system call, and
            // what it finds now need not wake the event loop again.
            if ring_ready {
                self.process_ring()?;
            }
            self.flush()?;
            if n < EVENT_BATCH {
                return Ok(());
            }
        }
    }

    /// Sends on every socket whose buffers the kernel has not released yet.
    pub fn inflight_total(&self) -> usize {
        self.ops.len()
    }

    /// Undoes [`Driver::ring_fd_apart`]: puts the io_uring back into [`Driver::fd`]'s epoll set,
    /// so that [`Driver::poll`] alone moves every send on. For whoever takes the driver over
    /// from an event loop that is gone (the loop watched the ring's descriptor). Idempotent.
    pub fn rejoin_ring(&mut self) -> Result<()> {
        self.check_process()?;
        if std::mem::take(&mut self.ring_apart) {
            if let Some(fd) = self.ring.as_ref().map(Ring::fd) {
                // Adding reports the ring's present readiness: completions already posted wake
                // the next wait.
                self.watch_ring_in_epoll(fd)
                    .map_err(|e| Error::os("putting the io_uring back in the epoll set", e))?;
            }
        }
        Ok(())
    }

    /// Closes the driver's kernel objects once nothing is in flight: the io_uring (with its
    /// fixed-buffer registrations), its timer and every socket's duplicate. Returns false, and
    /// does nothing, while a send is unreleased: its buffers must outlive the kernel's use.
    /// Afterwards every socket is closed and registering one fails with [`Error::Closed`]; only
    /// the epoll descriptor stays, until the driver is dropped.
    pub fn shut_down(&mut self) -> bool {
        if self.forked() || self.inflight_total() > 0 {
            return false;
        }
        self.shut = true;
        let ids: Vec<SocketId> = self.sockets.iter_mut().map(|(id, _)| id).collect();
        for id in ids {
            self.remove_entry(id);
        }
        self.ring_waiting.clear();
        if let Some(timer) = self.ring_timer.take() {
            let _ = self.epoll.delete(&timer);
        }
        // The ring goes before the regions it registered, as on drop.
        self.ring = None;
        self.regions.clear();
        true
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
        let key = self.ops.insert(op);
        // One boxed vectored request per op slot, made on first use.
        if self.vectored.len() < self.ops.slots() {
            self.vectored.resize_with(self.ops.slots(), || None);
        }
        key
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

impl<T, B: IoBuf> Drop for Driver<T, B> {
    fn drop(&mut self) {
        // The ring and the sockets may still reference buffers of unreleased sends. Their memory
        // must never be reused while the kernel can read it, so it is leaked, not freed.
        for (key, op) in self.ops.drain() {
            if !op.released() {
                std::mem::forget(op.bufs);
                std::mem::forget(op.token);
                let request = self.vectored.get_mut(key.index() as usize);
                std::mem::forget(request.and_then(Option::take));
            }
        }
    }
}
