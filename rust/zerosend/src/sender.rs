//! `ZeroCopySender`: the driver on a tokio runtime, for Rust users.
//!
//! One concept, a thread's driver seen from tokio: the senders, the futures of their sends, the
//! task that drives the ring and the drain's outcome all share the one thread-local driver and
//! its bookkeeping, so they live together.
//!
//! # One driver per thread
//!
//! Every sender made on a thread shares that thread's one [`Driver`]: one epoll set, one
//! io_uring, one tokio task that reaps completions for all of the thread's sockets. The ring is
//! set up for a single issuer (`IORING_SETUP_SINGLE_ISSUER | DEFER_TASKRUN` where the kernel has
//! it), so every submission, flush and reap must come from the thread that created it. That is
//! why the driver lives in a thread-local and why [`ZeroCopySender`] and [`SendFuture`] are
//! `!Send`: the type system keeps them on the thread that owns the ring.
//!
//! The driving task is spawned with [`tokio::task::spawn_local`], so senders are made inside a
//! [`tokio::task::LocalSet`]: on a current-thread runtime (`LocalSet::block_on` or
//! `run_until`), or one `LocalSet` per thread for a thread-per-core server (each thread then has
//! its own driver and ring). A work-stealing worker pool cannot host them: a task that moves
//! between threads would submit to a ring from a thread that does not own it.
//!
//! The task watches two descriptors with `AsyncFd`: the driver's epoll set (error queues of
//! MSG_ZEROCOPY sockets, sockets waiting for room) and the ring's own wake-up descriptor, so an
//! io_uring completion is reaped straight from the ring's shared memory. Sends submitted in one
//! scheduler turn reach the kernel together, in one `io_uring_enter`, when the task runs next.
//! The task ends when the thread has no sender left and every send was released; the next
//! sender then builds a new driver.
//!
//! ```no_run
//! # async fn demo(stream: tokio::net::TcpStream) -> zerosend::Result<()> {
//! use zerosend::{SocketOptions, ZeroCopySender};
//! // Inside a tokio::task::LocalSet.
//! let sender = ZeroCopySender::new(&stream, &SocketOptions::default())?;
//! let (result, buf) = sender.send_zc(vec![7u8; 1 << 20]).await;
//! let sent = result?; // the kernel released `buf`: reuse it freely
//! let outcome = sender.drain().await?; // every send so far released, and how they went
//! # let _ = (sent, buf, outcome); Ok(()) }
//! ```

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::task::{Context, Poll, Waker};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::buf::IoBuf;
use crate::driver::{Backend, Completion, Driver, SocketId, SocketOptions, SocketStats};
use crate::error::{errno_of, Error, Result};
use crate::op::SendResult;

/// A caller's buffer with its type erased, so that one driver serves every buffer type used on
/// its thread. The address and length are read once, from the caller's `IoBuf`.
struct AnyBuf {
    ptr: *const u8,
    len: usize,
    buf: Box<dyn Any>,
}

impl AnyBuf {
    fn new<B: IoBuf>(buf: B) -> Self {
        Self {
            ptr: buf.as_ptr(),
            len: buf.len(),
            buf: Box::new(buf),
        }
    }

    fn into_inner<B: IoBuf>(self) -> B {
        // Each sender only ever gets back the buffers it submitted, all of type B.
        *self
            .buf
            .downcast::<B>()
            .expect("a send's buffer comes back as the type it was sent as")
    }
}

// SAFETY: `ptr` and `len` were read from the `IoBuf` boxed in `buf`. The `IoBuf` contract keeps
// those bytes valid and at the same address for as long as that value lives, however it is
// moved; it lives exactly as long as this `AnyBuf`.
unsafe impl IoBuf for AnyBuf {
    fn as_ptr(&self) -> *const u8 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
}

/// How the sends of one socket went between two drains.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainOutcome {
    /// Sends released (successfully or not).
    pub sends: u64,
    /// Bytes of the successful ones.
    pub bytes: u64,
    /// Of those, bytes the kernel transmitted without copying.
    pub bytes_zerocopy: u64,
    /// Sends that ended in an error.
    pub errors: u64,
}

/// The running tally of one socket since its last drain.
#[derive(Default)]
struct Tally {
    outcome: DrainOutcome,
    first_error: Option<Error>,
}

impl Tally {
    fn count(&mut self, result: &Result<SendResult>) {
        self.outcome.sends += 1;
        match result {
            Ok(sent) => {
                self.outcome.bytes += sent.nbytes as u64;
                if sent.zerocopy {
                    self.outcome.bytes_zerocopy += sent.nbytes as u64;
                }
            }
            Err(err) => {
                self.outcome.errors += 1;
                self.first_error.get_or_insert_with(|| err.clone());
            }
        }
    }

    fn into_result(self) -> Result<DrainOutcome> {
        match self.first_error {
            Some(err) => Err(err),
            None => Ok(self.outcome),
        }
    }
}

/// Where a finished send's (or drain's) outcome waits for the future that asked for it.
struct Slot {
    socket: SocketId,
    state: RefCell<SlotState>,
}

enum SlotState {
    Pending(Option<Waker>),
    Sent(Result<SendResult>, Option<AnyBuf>),
    Drained(Result<DrainOutcome>),
    Taken,
}

impl Slot {
    fn new(socket: SocketId) -> Rc<Self> {
        Rc::new(Self {
            socket,
            state: RefCell::new(SlotState::Pending(None)),
        })
    }

    fn finish(&self, done: SlotState) {
        let previous = std::mem::replace(&mut *self.state.borrow_mut(), done);
        if let SlotState::Pending(Some(waker)) = previous {
            waker.wake();
        }
    }

    /// Takes the outcome if it is there, else remembers who to wake.
    fn poll_take(&self, cx: &mut Context<'_>) -> Poll<SlotState> {
        let mut state = self.state.borrow_mut();
        match &mut *state {
            SlotState::Pending(waker) => {
                if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            SlotState::Taken => panic!("a zerosend future was polled after it completed"),
            _ => Poll::Ready(std::mem::replace(&mut *state, SlotState::Taken)),
        }
    }
}

type ThreadDriver = Driver<Rc<Slot>, AnyBuf>;

/// Rounds of reaping one run of the driving task makes before it yields to the thread's other
/// tasks (each round that found work polls again).
const TURN_ROUNDS: usize = 32;

/// The thread's driver and what its task needs to drive it.
struct Local {
    driver: RefCell<ThreadDriver>,
    /// tokio's watch on (a duplicate of) the driver's epoll descriptor.
    epoll: AsyncFd<OwnedFd>,
    /// tokio's watch on (a duplicate of) the ring's wake-up descriptor, once there is a ring.
    ring: RefCell<Option<AsyncFd<OwnedFd>>>,
    /// The driving task's waker, and whether it was already woken to flush.
    task: RefCell<Option<Waker>>,
    kicked: Cell<bool>,
    /// Live senders, and sockets whose sender was dropped with sends still in flight.
    senders: Cell<usize>,
    closing: RefCell<Vec<SocketId>>,
    tallies: RefCell<HashMap<SocketId, Tally>>,
    /// Failures of the driver itself (poll, flush, reap): how many, and the last one. Each
    /// sender's next drain reports the last one it has not seen.
    faults: Cell<u64>,
    last_fault: RefCell<Option<Error>>,
    /// The driving task has ended; a new sender must build a new driver.
    stopped: Cell<bool>,
}

thread_local! {
    static THREAD_DRIVER: RefCell<Weak<Local>> = const { RefCell::new(Weak::new()) };
}

fn duplicate(fd: std::os::fd::BorrowedFd<'_>, what: &'static str) -> Result<OwnedFd> {
    fd.try_clone_to_owned()
        .map_err(|e| Error::os(what, errno_of(&e)))
}

fn watch(fd: OwnedFd) -> Result<AsyncFd<OwnedFd>> {
    // SAFETY: `fd` is an OwnedFd moved into the AsyncFd, so it stays open and names the same
    // open file for the AsyncFd's whole life.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(|e| {
        Error::os(
            "watching the driver from tokio (inside a runtime with IO enabled?)",
            errno_of(&e.into_parts().1),
        )
    })
}

impl Local {
    /// The thread's driver, made (and its task spawned) if the thread has none.
    fn for_this_thread() -> Result<Rc<Self>> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::InvalidArgument(
                "ZeroCopySender::new needs a tokio runtime with IO enabled, inside a \
                 tokio::task::LocalSet (the thread's driver is driven by a local task)"
                    .into(),
            ));
        }
        let existing = THREAD_DRIVER.with(|cell| cell.borrow().upgrade());
        if let Some(local) = existing.filter(|local| !local.stopped.get()) {
            return Ok(local);
        }
        let driver = ThreadDriver::new_single_thread()?;
        let epoll = watch(duplicate(
            driver.fd(),
            "duplicating the driver's descriptor",
        )?)?;
        let local = Rc::new(Self {
            driver: RefCell::new(driver),
            epoll,
            ring: RefCell::new(None),
            task: RefCell::new(None),
            kicked: Cell::new(false),
            senders: Cell::new(0),
            closing: RefCell::new(Vec::new()),
            tallies: RefCell::new(HashMap::new()),
            faults: Cell::new(0),
            last_fault: RefCell::new(None),
            stopped: Cell::new(false),
        });
        let task = Rc::clone(&local);
        tokio::task::spawn_local(async move {
            std::future::poll_fn(|cx| task.turn(cx)).await;
            task.stopped.set(true);
        });
        THREAD_DRIVER.with(|cell| *cell.borrow_mut() = Rc::downgrade(&local));
        Ok(local)
    }

    /// Watches the ring's descriptor once the driver has a ring (made by the first io_uring
    /// socket).
    fn watch_ring(&self) -> Result<()> {
        if self.ring.borrow().is_some() {
            return Ok(());
        }
        let fd = match self.driver.borrow_mut().ring_fd_apart()? {
            Some(fd) => duplicate(fd, "duplicating the io_uring's descriptor")?,
            None => return Ok(()),
        };
        *self.ring.borrow_mut() = Some(watch(fd)?);
        // The task must poll the new descriptor once to be woken by it.
        self.kick();
        Ok(())
    }

    /// Wakes the driving task (to flush, deliver or notice a dropped sender).
    fn kick(&self) {
        if !self.kicked.replace(true) {
            if let Some(waker) = self.task.borrow().as_ref() {
                waker.wake_by_ref();
            }
        }
    }

    fn record(&self, outcome: Result<()>) {
        if let Err(err) = outcome {
            self.faults.set(self.faults.get() + 1);
            *self.last_fault.borrow_mut() = Some(err);
        }
    }

    /// Hands finished sends and drains to their futures.
    fn deliver(&self) {
        let done: Vec<_> = self.driver.borrow_mut().take_completions().collect();
        for completion in done {
            match completion {
                Completion::Send {
                    token,
                    result,
                    mut bufs,
                } => {
                    self.tallies
                        .borrow_mut()
                        .entry(token.socket)
                        .or_default()
                        .count(&result);
                    token.finish(SlotState::Sent(result, bufs.pop()));
                }
                Completion::Drained { token } => {
                    let tally = self.tallies.borrow_mut().remove(&token.socket);
                    token.finish(SlotState::Drained(tally.unwrap_or_default().into_result()));
                }
            }
        }
    }

    /// One run of the driving task: reaps what the kernel reported, flushes queued sends,
    /// delivers, until neither descriptor is ready (so both wake the task again).
    fn turn(&self, cx: &mut Context<'_>) -> Poll<()> {
        {
            let mut task = self.task.borrow_mut();
            if !task.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *task = Some(cx.waker().clone());
            }
        }
        for _ in 0..TURN_ROUNDS {
            self.kicked.set(false);
            let mut woken = false;
            match self.epoll.poll_read_ready(cx) {
                Poll::Ready(Ok(mut guard)) => {
                    guard.clear_ready();
                    woken = true;
                    let polled = self.driver.borrow_mut().poll();
                    self.record(polled);
                }
                Poll::Ready(Err(e)) => {
                    // tokio's reactor is gone (the runtime is shutting down): nothing can
                    // drive the sends any more; the driver keeps their buffers (never frees
                    // them early).
                    self.record(Err(Error::os("waiting on the driver", errno_of(&e))));
                    return Poll::Ready(());
                }
                Poll::Pending => {}
            }
            let ring_ready = match self.ring.borrow().as_ref().map(|r| r.poll_read_ready(cx)) {
                Some(Poll::Ready(Ok(mut guard))) => {
                    guard.clear_ready();
                    Some(Ok(()))
                }
                Some(Poll::Ready(Err(e))) => Some(Err(e)),
                _ => None,
            };
            match ring_ready {
                Some(Ok(())) => {
                    woken = true;
                    let polled = self.driver.borrow_mut().poll_ring();
                    self.record(polled);
                }
                Some(Err(e)) => {
                    self.record(Err(Error::os("waiting on the io_uring", errno_of(&e))));
                    return Poll::Ready(());
                }
                None => {}
            }
            {
                let mut driver = self.driver.borrow_mut();
                if driver.needs_flush() {
                    let flushed = driver.flush().and_then(|()| {
                        // What the ring already holds need not wait for another wake-up.
                        if self.ring.borrow().is_some() {
                            driver.reap_ring()
                        } else {
                            Ok(())
                        }
                    });
                    drop(driver);
                    self.record(flushed);
                }
            }
            self.deliver();
            if !woken && !self.kicked.get() {
                // Both descriptors were polled with nothing new: they will wake the task.
                return if self.idle() {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                };
            }
        }
        // Still busy: yield to the thread's other tasks and come back in the next tick.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// True when no sender is left and every dropped sender's sends were released.
    fn idle(&self) -> bool {
        let driver = self.driver.borrow();
        let mut closing = self.closing.borrow_mut();
        let mut tallies = self.tallies.borrow_mut();
        closing.retain(|&id| {
            let registered = driver.is_registered(id);
            if !registered {
                tallies.remove(&id);
            }
            registered
        });
        self.senders.get() == 0 && closing.is_empty()
    }
}

/// Zero-copy sends on one connected TCP/UDP socket, driven by its thread's shared driver.
///
/// Each send owns its buffer until the kernel released it and then hands it back, so the
/// caller can reuse it. Dropping a send's future does not cancel the send: the bytes still go
/// out whole, and the buffer is dropped after its release. Dropping the sender lets the sends in
/// flight finish the same way (the thread's driving task keeps running until they have).
pub struct ZeroCopySender<B: IoBuf> {
    local: Rc<Local>,
    id: SocketId,
    backend: Backend,
    /// How many driver faults this sender's drains have reported.
    faults_seen: Cell<u64>,
    _buffers: PhantomData<fn(B) -> B>,
}

impl<B: IoBuf> ZeroCopySender<B> {
    /// Wraps a connected TCP or UDP socket (kept open by zerosend's own duplicate while sends
    /// are in flight), on the calling thread's driver.
    ///
    /// Outside a tokio runtime it fails with [`Error::InvalidArgument`].
    ///
    /// # Panics
    /// Inside a runtime but outside a [`tokio::task::LocalSet`] (see the module documentation),
    /// when it has to start the thread's driving task (tokio offers no way to ask first).
    pub fn new(socket: &impl AsFd, options: &SocketOptions) -> Result<Self> {
        let local = Local::for_this_thread()?;
        let (id, backend) = {
            let mut driver = local.driver.borrow_mut();
            let id = driver.register(socket.as_fd(), options)?;
            (id, driver.backend(id)?)
        };
        local.senders.set(local.senders.get() + 1);
        let sender = Self {
            faults_seen: Cell::new(local.faults.get()),
            local,
            id,
            backend,
            _buffers: PhantomData,
        };
        sender.local.watch_ring()?;
        Ok(sender)
    }

    /// The backend the socket got.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Why the socket did not get a better backend (when it was chosen automatically).
    pub fn fallback_reason(&self) -> Option<String> {
        self.local
            .driver
            .borrow()
            .fallback_reason(self.id)
            .ok()
            .flatten()
    }

    /// How the thread's io_uring was set up: `None` before an io_uring socket made it,
    /// `Some(Ok(()))` with `SINGLE_ISSUER | DEFER_TASKRUN`, `Some(Err(reason))` without.
    pub fn ring_setup(&self) -> Option<std::result::Result<(), String>> {
        self.local.driver.borrow().ring_defer_taskrun()
    }

    /// Submits a zero-copy send now; the future yields the outcome and the buffer back once
    /// the kernel released it.
    pub fn send_zc(&self, buf: B) -> SendFuture<B> {
        self.submit(buf, true)
    }

    /// Submits a copying send in the same ordered stream.
    pub fn send(&self, buf: B) -> SendFuture<B> {
        self.submit(buf, false)
    }

    fn submit(&self, buf: B, zerocopy: bool) -> SendFuture<B> {
        let slot = Slot::new(self.id);
        let (rejected, wake) = {
            let mut driver = self.local.driver.borrow_mut();
            let submitted = driver.submit(self.id, vec![AnyBuf::new(buf)], zerocopy, slot.clone());
            // The task hands this send to the kernel together with every other submitted
            // before it runs: one system call for the batch.
            (submitted.err(), driver.needs_flush())
        };
        if let Some(mut rejected) = rejected {
            let mut tallies = self.local.tallies.borrow_mut();
            let result = Err(rejected.error);
            tallies.entry(self.id).or_default().count(&result);
            slot.finish(SlotState::Sent(result, rejected.bufs.pop()));
        }
        if wake {
            self.local.kick();
        }
        // A send that finished within the call (a copy the kernel took whole) resolves now.
        self.local.deliver();
        SendFuture {
            slot,
            _buffer: PhantomData,
        }
    }

    /// Waits until every send submitted so far was released by the kernel, and tells how the
    /// sends released since the previous drain went: their count and bytes, or the first error
    /// among them (the stream broke), or a failure of the thread's driver since this sender's
    /// previous drain.
    pub async fn drain(&self) -> Result<DrainOutcome> {
        let slot = Slot::new(self.id);
        self.local
            .driver
            .borrow_mut()
            .drain(self.id, slot.clone())?;
        self.local.deliver();
        let outcome = std::future::poll_fn(|cx| slot.poll_take(cx)).await;
        let faults = self.local.faults.get();
        if self.faults_seen.replace(faults) != faults {
            if let Some(fault) = self.local.last_fault.borrow().clone() {
                return Err(fault);
            }
        }
        match outcome {
            SlotState::Drained(result) => result,
            _ => unreachable!("a drain's slot only ever holds a drain outcome"),
        }
    }

    /// Sends not yet released.
    pub fn inflight(&self) -> usize {
        self.local.driver.borrow().inflight(self.id).unwrap_or(0)
    }

    /// The socket's counters.
    pub fn stats(&self) -> SocketStats {
        self.local
            .driver
            .borrow()
            .stats(self.id)
            .unwrap_or_default()
    }
}

impl<B: IoBuf> Drop for ZeroCopySender<B> {
    fn drop(&mut self) {
        // Sends in flight finish; the driving task keeps the driver until the last release.
        let registered = {
            let mut driver = self.local.driver.borrow_mut();
            driver.close(self.id);
            driver.is_registered(self.id)
        };
        if registered {
            self.local.closing.borrow_mut().push(self.id);
        } else {
            self.local.tallies.borrow_mut().remove(&self.id);
        }
        self.local.senders.set(self.local.senders.get() - 1);
        self.local.kick();
    }
}

/// A submitted send; resolves to its outcome and the buffer, after the kernel released it.
pub struct SendFuture<B> {
    slot: Rc<Slot>,
    _buffer: PhantomData<fn() -> B>,
}

impl<B: IoBuf> Future for SendFuture<B> {
    /// The outcome, and the buffer back.
    type Output = (Result<SendResult>, B);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.slot.poll_take(cx) {
            Poll::Ready(SlotState::Sent(result, Some(buf))) => {
                Poll::Ready((result, buf.into_inner()))
            }
            Poll::Ready(_) => unreachable!("a send's slot holds its outcome and its buffer"),
            Poll::Pending => Poll::Pending,
        }
    }
}
