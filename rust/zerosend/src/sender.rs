//! `ZeroCopySender`: the driver on a tokio runtime, for Rust users.
//!
//! ```no_run
//! # async fn demo(stream: tokio::net::TcpStream) -> zerosend::Result<()> {
//! use zerosend::{SocketOptions, ZeroCopySender};
//! let sender = ZeroCopySender::new(&stream, &SocketOptions::default())?;
//! let (result, buf) = sender.send_zc(vec![7u8; 1 << 20]).await;
//! let sent = result?; // the kernel released `buf`: reuse it freely
//! # let _ = (sent, buf); Ok(()) }
//! ```

use std::future::Future;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::Notify;

use crate::buf::IoBuf;
use crate::driver::{Backend, Completion, Driver, SocketId, SocketOptions, SocketStats};
use crate::error::{errno_of, Error, Result};
use crate::op::SendResult;

/// Where a finished send's outcome and buffer wait for the future that asked for them.
struct Slot<B> {
    state: Mutex<SlotState<B>>,
}

enum SlotState<B> {
    Pending(Option<Waker>),
    Done(Result<SendResult>, Option<B>),
    Taken,
}

impl<B> Slot<B> {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(SlotState::Pending(None)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, SlotState<B>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn complete(&self, result: Result<SendResult>, buf: Option<B>) {
        let previous = std::mem::replace(&mut *self.lock(), SlotState::Done(result, buf));
        if let SlotState::Pending(Some(waker)) = previous {
            waker.wake();
        }
    }
}

type SenderDriver<B> = Driver<Arc<Slot<B>>, B>;

struct Shared<B: IoBuf> {
    driver: Mutex<SenderDriver<B>>,
    /// Wakes the driving task when the sender is dropped.
    shutdown: Notify,
    /// Wakes the driving task to hand queued io_uring requests to the kernel.
    flush: Notify,
}

impl<B: IoBuf> Shared<B> {
    fn lock(&self) -> MutexGuard<'_, SenderDriver<B>> {
        self.driver.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Zero-copy sends on one connected TCP/UDP socket, driven by a tokio task.
///
/// Each send owns its buffer until the kernel released it and then hands it back, so the
/// caller can reuse it. Dropping a send's future does not cancel the send: the bytes still go
/// out whole, and the buffer is dropped after its release.
pub struct ZeroCopySender<B: IoBuf + Send> {
    shared: Arc<Shared<B>>,
    id: SocketId,
    backend: Backend,
}

impl<B: IoBuf + Send + 'static> ZeroCopySender<B> {
    /// Wraps a connected TCP or UDP socket (kept open by zerosend's own duplicate while sends
    /// are in flight). Must be called inside a tokio runtime with IO enabled.
    pub fn new(socket: &impl AsFd, options: &SocketOptions) -> Result<Self> {
        let mut driver = SenderDriver::<B>::new()?;
        let id = driver.register(socket.as_fd(), options)?;
        let backend = driver.backend(id)?;
        // tokio watches its own duplicate of the driver's epoll descriptor.
        let fd = driver
            .fd()
            .try_clone_to_owned()
            .map_err(|e| Error::os("duplicating the driver descriptor", errno_of(&e)))?;
        let shared = Arc::new(Shared {
            driver: Mutex::new(driver),
            shutdown: Notify::new(),
            flush: Notify::new(),
        });
        // SAFETY: `fd` is an OwnedFd moved into the AsyncFd, so it stays open and names the
        // same epoll instance for the AsyncFd's whole life.
        let readiness = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|e| {
                Error::os(
                    "watching the driver from tokio",
                    errno_of(&e.into_parts().1),
                )
            })?;
        tokio::spawn(drive(Arc::clone(&shared), readiness, id));
        Ok(Self {
            shared,
            id,
            backend,
        })
    }

    /// The backend the socket got.
    pub fn backend(&self) -> Backend {
        self.backend
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
        let slot = Slot::new();
        let outcome = {
            let mut driver = self.shared.lock();
            let submitted = driver.submit(self.id, vec![buf], zerocopy, Arc::clone(&slot));
            if driver.needs_flush() {
                // The driving task hands this send to the kernel together with every other
                // submitted before it runs: one system call for the batch.
                self.shared.flush.notify_one();
            }
            let ready: Vec<_> = driver.take_completions().collect();
            (submitted, ready)
        };
        match outcome {
            (Err(rejected), ready) => {
                deliver(ready);
                let mut bufs = rejected.bufs;
                slot.complete(Err(rejected.error), bufs.pop());
            }
            (Ok(()), ready) => deliver(ready),
        }
        SendFuture { slot }
    }

    /// Waits until every send submitted so far was released by the kernel.
    pub async fn drain(&self) {
        let slot = Slot::new();
        let ready = {
            let mut driver = self.shared.lock();
            let _ = driver.drain(self.id, Arc::clone(&slot));
            driver.take_completions().collect::<Vec<_>>()
        };
        deliver(ready);
        let _ = SendFuture { slot }.await;
    }

    /// Sends not yet released.
    pub fn inflight(&self) -> usize {
        self.shared.lock().inflight(self.id).unwrap_or(0)
    }

    /// The socket's counters.
    pub fn stats(&self) -> SocketStats {
        self.shared.lock().stats(self.id).unwrap_or_default()
    }
}

impl<B: IoBuf + Send> Drop for ZeroCopySender<B> {
    fn drop(&mut self) {
        // Sends in flight finish; the task ends (and closes the driver) after the last release.
        self.shared.lock().close(self.id);
        self.shared.shutdown.notify_one();
    }
}

fn deliver<B>(completions: Vec<Completion<Arc<Slot<B>>, B>>) {
    for completion in completions {
        match completion {
            Completion::Send {
                token,
                result,
                mut bufs,
            } => token.complete(result, bufs.pop()),
            Completion::Drained { token } => token.complete(
                Ok(SendResult {
                    nbytes: 0,
                    zerocopy: false,
                }),
                None,
            ),
        }
    }
}

async fn drive<B: IoBuf + Send + 'static>(
    shared: Arc<Shared<B>>,
    readiness: AsyncFd<OwnedFd>,
    id: SocketId,
) {
    let mut closing = false;
    loop {
        tokio::select! {
            ready = readiness.readable() => match ready {
                Ok(mut guard) => guard.clear_ready(),
                Err(_) => break,
            },
            _ = shared.shutdown.notified(), if !closing => closing = true,
            _ = shared.flush.notified() => {}
        }
        let (ready, done) = {
            let mut driver = shared.lock();
            let _ = driver.poll();
            let ready: Vec<_> = driver.take_completions().collect();
            // After close the socket stays registered until its last send was released.
            (ready, closing && !driver.is_registered(id))
        };
        deliver(ready);
        if done {
            break;
        }
    }
    drop(readiness);
}

/// A submitted send; resolves to its outcome and the buffer, after the kernel released it.
pub struct SendFuture<B> {
    slot: Arc<Slot<B>>,
}

impl<B> Future for SendFuture<B> {
    /// The outcome, and the buffer back (None only for a drain).
    type Output = (Result<SendResult>, Option<B>);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.slot.lock();
        match std::mem::replace(&mut *state, SlotState::Taken) {
            SlotState::Done(result, buf) => Poll::Ready((result, buf)),
            SlotState::Pending(_) => {
                *state = SlotState::Pending(Some(cx.waker().clone()));
                Poll::Pending
            }
            SlotState::Taken => panic!("SendFuture polled after it completed"),
        }
    }
}
