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
use crate::op::{OpKey, SendOp, SendResult};
use crate::registry::{self, Claim};
use crate::ring::{Ring, RingEvent, VectoredRequest};
use crate::slab::Slab;
use crate::sys::{self, IOV_MAX};

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

        let id = self.sockets.next_key();
        let event = EpollEvent::new(EpollFlags::EPOLLET, Tag::Socket(id).to_raw());
        self.epoll
            .add(&fd, event)
            .map_err(|e| Error::os("adding the socket to the driver's epoll set", e))?;
        let inserted = self.sockets.insert(Entry {
            fd,
            claim,
            transport,
            backend,
            fallback_reason,
            threshold: options.zerocopy_threshold,
            queue: VecDeque::new(),
            inflight: 0,
            msg: sendmsg::MsgSocket::new(backend == Backend::MsgZerocopy, first_number),
            awaiting_release: false,
            ring: uring::RingSocket::default(),
            failed: None,
            drain_waiters: Vec::new(),
            closing: false,
            stats: SocketStats::default(),
        });
        debug_assert_eq!(inserted, id, "the slab gave another key than it announced");
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
