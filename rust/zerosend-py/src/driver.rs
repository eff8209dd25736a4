//! `zerosend._native.Driver`: the core driver of one asyncio event loop.
//!
//! The Python layer registers `fileno()` with `loop.add_reader` and calls `dispatch()` when it
//! is readable. Completions resolve their futures here, in one batch per wake-up, on the loop's
//! own thread: on asyncio native `InFlightSend` futures, which need no Python frame per send.
//!
//! One concept, the Python face of one loop's driver: every method takes the lock on the core
//! driver, does one thing of the core's API, and turns the completions it collected into
//! Python outcomes; the socket-bound send callables are in `send_methods`.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use pyo3::exceptions::PyValueError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use zerosend::{Backend, Completion, SocketId, SocketOptions, Submitted};

use crate::buffer::{extract_buffers, PyBuf};
use crate::completed::CompletedSend;
use crate::errors::to_pyerr;
use crate::future::{is_asyncio_loop, InFlightSend, Outcome};
use crate::pool::PoolMemory;
use crate::send_methods::{FileSender, Sender};
use crate::types::SendResult;

type CoreDriver = zerosend::Driver<Py<PyAny>, PyBuf>;
type CoreCompletion = Completion<Py<PyAny>, PyBuf>;

/// Drives zero-copy sends of many sockets for one event loop.
#[pyclass(frozen, weakref, module = "zerosend._native")]
pub struct Driver {
    // Only the loop thread uses a driver; the mutex makes that safe to state, and it is never
    // held while Python code can run: futures are resolved and buffers released (which may run
    // a pool's callback) after unlocking.
    core: Mutex<CoreDriver>,
    /// A `flush` call is scheduled on the loop: later submits of this turn need no other.
    flush_scheduled: AtomicBool,
    /// `watch_ring` handed the io_uring's descriptor to the loop: completions are reaped from
    /// the ring by `dispatch_ring` and after every `flush`.
    ring_watched: AtomicBool,
    results: Results,
    /// The last send that finished inside its call, with its outcome, for reuse.
    last_completed: Mutex<Option<(zerosend::SendResult, Py<CompletedSend>)>>,
    /// Asked for SINGLE_ISSUER | DEFER_TASKRUN at construction.
    defer_taskrun: bool,
}

impl Driver {
    fn lock(&self) -> MutexGuard<'_, CoreDriver> {
        self.core
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The future of a send in flight, made now (outside the lock: `create_future` runs Python
    /// code) and given to the send as its token: a native `InFlightSend` on an asyncio loop
    /// (`native`), else the loop face's own future (trio's).
    fn future_for(
        &self,
        py: Python<'_>,
        send: zerosend::PendingSend,
        event_loop: &Bound<'_, PyAny>,
        native: bool,
    ) -> PyResult<Py<PyAny>> {
        let future = new_future(py, event_loop, native)?;
        match self.lock().set_token(send, future.clone_ref(py)) {
            Ok(_placeholder) => Ok(future),
            // Only this driver's own progress could have finished the send meanwhile, and
            // nothing here made any; say so rather than hand out a future that never resolves.
            Err(_) => Err(pyo3::exceptions::PyRuntimeError::new_err(
                "zerosend: the send finished before its future was attached; its outcome is lost",
            )),
        }
    }

    /// The awaitable of a send that finished inside its call. Successive sends of one size on
    /// one loop share one (it is immutable): no allocation per small send.
    fn completed(
        &self,
        py: Python<'_>,
        event_loop: &Bound<'_, PyAny>,
        result: zerosend::Result<zerosend::SendResult>,
    ) -> PyResult<Py<PyAny>> {
        let result = match result {
            Ok(result) => result,
            Err(err) => {
                let error = to_pyerr(err).into_value(py).into_any();
                let done = CompletedSend::error(event_loop.clone().unbind(), error);
                return Ok(Py::new(py, done)?.into_any());
            }
        };
        let mut last = self
            .last_completed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((held, done)) = last.as_ref() {
            let same =
                *held == result || zerosend::mutant::active(zerosend::mutant::STALE_COMPLETED);
            if same && done.get().on_loop(event_loop) {
                return Ok(done.clone_ref(py).into_any());
            }
        }
        let value = self.results.object(py, result)?.into_any();
        let done = Py::new(py, CompletedSend::value(event_loop.clone().unbind(), value))?;
        *last = Some((result, done.clone_ref(py)));
        Ok(done.into_any())
    }

    /// Schedules `flush` on the loop if sends wait for it and no flush is scheduled yet.
    fn schedule_flush(
        &self,
        slf: &Bound<'_, Self>,
        needs_flush: bool,
        event_loop: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        if needs_flush && !self.flush_scheduled.swap(true, Ordering::AcqRel) {
            let py = slf.py();
            let flush = slf.getattr(intern!(py, "flush"))?;
            if let Err(err) = event_loop.call_method1(intern!(py, "call_soon"), (flush,)) {
                self.flush_scheduled.store(false, Ordering::Release);
                return Err(err);
            }
        }
        Ok(())
    }

    /// `submit`'s work; `native`: the loop is asyncio's (see `future_for`).
    pub(crate) fn send(
        slf: &Bound<'_, Self>,
        socket: u64,
        buffers: &Bound<'_, PyAny>,
        zerocopy: bool,
        event_loop: &Bound<'_, PyAny>,
        native: bool,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let bufs = extract_buffers(buffers)?;
        #[cfg(feature = "mutants")]
        let exports: Vec<_> = bufs.iter().map(PyBuf::export_handle).collect();
        let this = slf.get();
        let (submitted, needs_flush, completions) = {
            let mut core = this.lock();
            let submitted = core.submit_now(SocketId::from_raw(socket), bufs, zerocopy, py.None());
            (submitted, core.needs_flush(), Self::collect(&mut core))
        };
        resolve_all(py, &this.results, completions)?;
        // A rejected send's buffers are released here, outside the lock.
        let submitted = submitted.map_err(|rejected| to_pyerr(rejected.error))?;
        let future = match submitted {
            Submitted::Done { result, bufs, .. } => {
                drop(bufs);
                this.completed(py, event_loop, result)?
            }
            Submitted::InFlight(send) => this.future_for(py, send, event_loop, native)?,
        };
        #[cfg(feature = "mutants")]
        if zerocopy && zerosend::mutant::active(zerosend::mutant::EARLY_RELEASE_ON_CANCEL) {
            release_exports_on_cancel(py, &future, exports)?;
        }
        this.schedule_flush(slf, needs_flush, event_loop)?;
        Ok(future)
    }

    /// `submit_file`'s work, with the arguments checked.
    pub(crate) fn send_file(
        slf: &Bound<'_, Self>,
        socket: u64,
        fd: i32,
        offset: u64,
        count: Option<u64>,
        event_loop: &Bound<'_, PyAny>,
        native: bool,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        if fd < 0 {
            return Err(PyValueError::new_err("the file is closed (fileno() is -1)"));
        }
        // SAFETY: the caller passes the descriptor of a file it holds open for the duration of
        // this call; the driver only duplicates it.
        let file = unsafe { BorrowedFd::borrow_raw(fd) };
        let future = new_future(py, event_loop, native)?;
        let this = slf.get();
        let (submitted, needs_flush, completions) = {
            let mut core = this.lock();
            let submitted = core.submit_file(
                SocketId::from_raw(socket),
                file,
                offset,
                count,
                future.clone_ref(py),
            );
            (submitted, core.needs_flush(), Self::collect(&mut core))
        };
        resolve_all(py, &this.results, completions)?;
        submitted.map_err(|rejected| to_pyerr(rejected.error))?;
        this.schedule_flush(slf, needs_flush, event_loop)?;
        Ok(future)
    }

    fn collect(core: &mut CoreDriver) -> Vec<CoreCompletion> {
        if core.has_completions() {
            core.take_completions().collect()
        } else {
            Vec::new()
        }
    }
}

/// A new future of a send: native on asyncio, else made by the loop face (trio's).
fn new_future(py: Python<'_>, event_loop: &Bound<'_, PyAny>, native: bool) -> PyResult<Py<PyAny>> {
    if native {
        Ok(Py::new(py, InFlightSend::new(event_loop.clone().unbind()))?.into_any())
    } else {
        Ok(event_loop
            .call_method0(intern!(py, "create_future"))?
            .unbind())
    }
}

/// Sets the future's result or exception unless it was cancelled meanwhile.
fn resolve(py: Python<'_>, results: &Results, completion: CoreCompletion) -> PyResult<()> {
    let (future, outcome) = match completion {
        Completion::Send {
            token,
            result,
            bufs,
        } => {
            // The kernel let go of these pages: release the exports (lets a bytearray resize).
            drop(bufs);
            (token, Some(result))
        }
        Completion::Drained { token } => (token, None),
    };
    let future = future.bind(py);
    if future.is_none() {
        return Ok(()); // a send whose future could not be made: `submit` raised already
    }
    if let Ok(native) = future.cast::<InFlightSend>() {
        let outcome = match outcome {
            Some(Ok(result)) => Outcome::Value(results.object(py, result)?.into_any()),
            Some(Err(_)) if zerosend::mutant::active(zerosend::mutant::ERROR_AS_RESULT) => {
                let nothing = zerosend::SendResult {
                    nbytes: 0,
                    zerocopy: false,
                };
                Outcome::Value(results.object(py, nothing)?.into_any())
            }
            Some(Err(err)) => Outcome::Error(to_pyerr(err).into_value(py).into_any()),
            None => Outcome::Value(py.None()),
        };
        // A cancelled future drops its outcome (the send went out all the same).
        return InFlightSend::finish(native, outcome).map(drop);
    }
    let set = match outcome {
        Some(Ok(result)) => {
            future.call_method1(intern!(py, "set_result"), (results.object(py, result)?,))
        }
        Some(Err(_)) if zerosend::mutant::active(zerosend::mutant::ERROR_AS_RESULT) => {
            let nothing = zerosend::SendResult {
                nbytes: 0,
                zerocopy: false,
            };
            future.call_method1(intern!(py, "set_result"), (results.object(py, nothing)?,))
        }
        Some(Err(err)) => future.call_method1(
            intern!(py, "set_exception"),
            (to_pyerr(err).into_value(py),),
        ),
        None => future.call_method1(intern!(py, "set_result"), (py.None(),)),
    };
    // Only a cancelled future refuses its outcome; asking first would cost every send a call.
    match set {
        Err(_) if future.call_method0(intern!(py, "cancelled"))?.is_truthy()? => Ok(()),
        other => other.map(drop),
    }
}

/// The early-release fault: cancelling `future` drops the buffers' exports at once.
#[cfg(feature = "mutants")]
fn release_exports_on_cancel(
    py: Python<'_>,
    future: &Py<PyAny>,
    exports: Vec<crate::buffer::Export>,
) -> PyResult<()> {
    let callback = pyo3::types::PyCFunction::new_closure(
        py,
        None,
        None,
        move |args: &Bound<'_, pyo3::types::PyTuple>, _kwargs| -> PyResult<()> {
            if args.get_item(0)?.call_method0("cancelled")?.is_truthy()? {
                crate::buffer::release_early(&exports);
            }
            Ok(())
        },
    )?;
    future
        .bind(py)
        .call_method1("add_done_callback", (callback,))?;
    Ok(())
}

/// `SendResult` objects: successive sends with equal outcomes (a stream of equal-sized sends)
/// share one, which is immutable, instead of allocating one per send.
#[derive(Default)]
struct Results {
    last: Mutex<Option<(zerosend::SendResult, Py<SendResult>)>>,
}

impl Results {
    fn object(&self, py: Python<'_>, result: zerosend::SendResult) -> PyResult<Py<SendResult>> {
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match last.as_ref() {
            Some((held, object))
                if *held == result || zerosend::mutant::active(zerosend::mutant::STALE_RESULT) =>
            {
                Ok(object.clone_ref(py))
            }
            _ => {
                let object = Py::new(py, SendResult::from(result))?;
                *last = Some((result, object.clone_ref(py)));
                Ok(object)
            }
        }
    }
}

fn resolve_all(
    py: Python<'_>,
    results: &Results,
    completions: Vec<CoreCompletion>,
) -> PyResult<()> {
    let mut first_error = None;
    for completion in completions {
        if let Err(err) = resolve(py, results, completion) {
            first_error.get_or_insert(err);
        }
    }
    first_error.map_or(Ok(()), Err)
}

#[pymethods]
impl Driver {
    /// `defer_taskrun`: set the io_uring up with SINGLE_ISSUER | DEFER_TASKRUN where the
    /// kernel accepts it (only the loop thread calls a driver, as that needs). Off by default:
    /// measured on the rig, a 1 MiB send that waits for socket room is then moved on only when
    /// the loop enters the ring, which costs more wake-ups and system calls than it saves.
    #[new]
    #[pyo3(signature = (defer_taskrun=false))]
    fn new(defer_taskrun: bool) -> PyResult<Self> {
        let core = if defer_taskrun {
            CoreDriver::new_single_thread()
        } else {
            CoreDriver::new()
        };
        Ok(Self {
            core: Mutex::new(core.map_err(to_pyerr)?),
            flush_scheduled: AtomicBool::new(false),
            ring_watched: AtomicBool::new(false),
            results: Results::default(),
            last_completed: Mutex::new(None),
            defer_taskrun,
        })
    }

    /// Whether this driver was asked for SINGLE_ISSUER | DEFER_TASKRUN (`ring_setup` says
    /// whether the kernel granted it).
    #[getter]
    fn defer_taskrun(&self) -> bool {
        self.defer_taskrun
    }

    /// True in a process that inherited this driver through fork(): it belongs to the parent.
    #[getter]
    fn forked(&self) -> bool {
        self.lock().forked()
    }

    /// The descriptor to watch for readability.
    fn fileno(&self) -> i32 {
        self.lock().fd().as_raw_fd()
    }

    /// Registers a connected socket by descriptor; returns its handle.
    #[pyo3(signature = (fd, backend, zerocopy_threshold))]
    fn register(&self, fd: i32, backend: Option<&str>, zerocopy_threshold: usize) -> PyResult<u64> {
        let backend = match backend {
            None | Some("auto") => None,
            Some(name) => Some(Backend::from_name(name).ok_or_else(|| {
                let known: Vec<&str> = Backend::ALL.iter().map(|b| b.name()).collect();
                PyValueError::new_err(format!(
                    "unknown backend {name:?}; use \"auto\" or one of {}",
                    known.join(", ")
                ))
            })?),
        };
        if fd < 0 {
            return Err(PyValueError::new_err(
                "the socket is closed (fileno() is -1)",
            ));
        }
        // SAFETY: the caller passes the descriptor of a live socket object it holds for the
        // duration of this call; the driver only duplicates it.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let options = SocketOptions {
            backend,
            zerocopy_threshold,
        };
        let id = self.lock().register(borrowed, &options).map_err(to_pyerr)?;
        Ok(id.to_raw())
    }

    /// Submits one send (a buffer, or a list/tuple of buffers sent as one) and returns a future
    /// of `event_loop` that resolves with its `SendResult` (on asyncio a native `InFlightSend`,
    /// else one made with the loop's `create_future`), or,
    /// for a send that finished inside the call (a copy the kernel took whole), a done
    /// `CompletedSend`. io_uring requests are handed to the kernel together by `flush`, which
    /// this schedules with `event_loop.call_soon` once per event loop turn: one system call for
    /// every send of the turn.
    fn submit(
        slf: &Bound<'_, Self>,
        socket: u64,
        buffers: &Bound<'_, PyAny>,
        zerocopy: bool,
        event_loop: &Bound<'_, PyAny>,
    ) -> PyResult<Py<PyAny>> {
        let native = is_asyncio_loop(event_loop)?;
        Self::send(slf, socket, buffers, zerocopy, event_loop, native)
    }

    /// `submit` bound to one socket and loop: a callable `sender(buf)` (the `send_zc` and
    /// `send` of `zerosend.Socket`), which submits with no Python frame in between.
    fn sender(
        slf: &Bound<'_, Self>,
        socket: u64,
        event_loop: &Bound<'_, PyAny>,
        zerocopy: bool,
    ) -> PyResult<Sender> {
        Sender::new(slf, socket, event_loop, zerocopy)
    }

    /// `submit_file` bound to one socket and loop: a callable `file_sender(file, offset=0,
    /// count=None)` (`zerosend.Socket.send_file`). `check(file, offset, count)` is called only
    /// for arguments off the common path (not an int descriptor or a file whose `fileno()`
    /// gives one, or offsets that are not non-negative ints): it raises the error that names
    /// the argument, or returns the descriptor.
    fn file_sender(
        slf: &Bound<'_, Self>,
        socket: u64,
        event_loop: &Bound<'_, PyAny>,
        check: Py<PyAny>,
    ) -> PyResult<FileSender> {
        FileSender::new(slf, socket, event_loop, check)
    }

    /// Submits a send of `count` bytes (None: up to the end) of the file open on descriptor
    /// `fd`, from `offset`, with sendfile(2); the driver holds its own duplicate of `fd`.
    /// Returns its future, as `submit` does.
    #[pyo3(signature = (socket, fd, offset, count, event_loop))]
    fn submit_file(
        slf: &Bound<'_, Self>,
        socket: u64,
        fd: i32,
        offset: u64,
        count: Option<u64>,
        event_loop: &Bound<'_, PyAny>,
    ) -> PyResult<Py<PyAny>> {
        let native = is_asyncio_loop(event_loop)?;
        Self::send_file(slf, socket, fd, offset, count, event_loop, native)
    }

    /// Hands the io_uring requests queued by `submit` to the kernel, then resolves whatever
    /// completions the ring already holds (reading them costs no system call, and each one
    /// reaped here is one wake-up of the loop fewer).
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        self.flush_scheduled.store(false, Ordering::Release);
        let (flushed, completions) = {
            let mut core = self.lock();
            let mut flushed = core.flush();
            if flushed.is_ok() && self.ring_watched.load(Ordering::Acquire) {
                // Not woken by the ring: its descriptor's readiness is left for the loop.
                flushed = core.reap_ring();
            }
            (flushed, Self::collect(&mut core))
        };
        resolve_all(py, &self.results, completions)?;
        flushed.map_err(to_pyerr)
    }

    /// The io_uring's descriptor, the first time the driver has one: from then on the caller
    /// watches it (readable: call `dispatch_ring`) and `fileno()` no longer reports it, so a
    /// completion wakes the loop once and is reaped from shared memory. -1 otherwise.
    fn watch_ring(&self) -> PyResult<i32> {
        if self.ring_watched.load(Ordering::Acquire) {
            return Ok(-1);
        }
        let mut core = self.lock();
        match core.ring_fd_apart().map_err(to_pyerr)? {
            Some(fd) => {
                self.ring_watched.store(true, Ordering::Release);
                Ok(fd.as_raw_fd())
            }
            None => Ok(-1),
        }
    }

    /// Processes the io_uring's completions and resolves the finished sends' futures. Given
    /// the loop, it also schedules `flush` behind the callbacks those futures scheduled: the
    /// sends their tasks submit next turn then reach the kernel in that same turn, not one
    /// turn (and one more `epoll_wait`) later.
    #[pyo3(signature = (event_loop=None))]
    fn dispatch_ring(slf: &Bound<'_, Self>, event_loop: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let (polled, completions) = {
            let mut core = this.lock();
            let polled = core.poll_ring();
            (polled, Self::collect(&mut core))
        };
        let resolved = !completions.is_empty();
        resolve_all(py, &this.results, completions)?;
        if let (true, Some(event_loop)) = (resolved, event_loop) {
            this.schedule_flush(slf, true, event_loop)?;
        }
        polled.map_err(to_pyerr)
    }

    /// How the driver's io_uring was set up: None before it has one, "defer_taskrun" with
    /// IORING_SETUP_SINGLE_ISSUER | DEFER_TASKRUN, else why not.
    #[getter]
    fn ring_setup(&self) -> Option<String> {
        self.lock().ring_defer_taskrun().map(|setup| match setup {
            Ok(()) => "defer_taskrun".to_string(),
            Err(reason) => reason,
        })
    }

    /// Lets sends from the pool's memory use io_uring registered buffers on this driver.
    fn register_pool(&self, pool: &PoolMemory) -> PyResult<()> {
        self.lock()
            .register_region(std::sync::Arc::clone(&pool.region))
            .map_err(to_pyerr)
    }

    /// Stops using the pool's memory for registered-buffer sends on this driver and gives its
    /// slot back; sends already in flight from it are not affected.
    fn unregister_pool(&self, pool: &PoolMemory) -> PyResult<()> {
        self.lock()
            .unregister_region(&pool.region)
            .map_err(to_pyerr)
    }

    /// Processes the kernel's reports and resolves every finished send's future.
    fn dispatch(&self, py: Python<'_>) -> PyResult<()> {
        let (polled, completions) = {
            let mut core = self.lock();
            let polled = core.poll();
            (polled, Self::collect(&mut core))
        };
        // Whatever finished is resolved even if polling then failed.
        resolve_all(py, &self.results, completions)?;
        polled.map_err(to_pyerr)
    }

    /// Resolves `future` with None once the socket has no send in flight.
    fn drain(&self, py: Python<'_>, socket: u64, future: Py<PyAny>) -> PyResult<()> {
        let completions = {
            let mut core = self.lock();
            core.drain(SocketId::from_raw(socket), future)
                .map_err(to_pyerr)?;
            Self::collect(&mut core)
        };
        resolve_all(py, &self.results, completions)
    }

    /// Stops sending on the socket; its descriptor closes after the last release.
    fn close(&self, py: Python<'_>, socket: u64) -> PyResult<()> {
        let completions = {
            let mut core = self.lock();
            core.close(SocketId::from_raw(socket));
            Self::collect(&mut core)
        };
        resolve_all(py, &self.results, completions)
    }

    /// For a driver whose event loop is gone (closed or collected), called by the one reaper
    /// thread when `fileno()` is readable: moves the sends on without any loop (the io_uring
    /// goes back into `fileno()`'s set), drops the finished sends' futures untouched (their
    /// loop can run no callback) and releases their buffers, which the kernel let go of. Once
    /// nothing is in flight it closes the driver's io_uring, timer and sockets. Returns the
    /// sends still in flight.
    fn reap_orphaned(&self) -> PyResult<usize> {
        let (reaped, completions, left) = {
            let mut core = self.lock();
            let reaped = core
                .rejoin_ring()
                .and_then(|()| core.reap_ring())
                .and_then(|()| core.poll());
            let completions = Self::collect(&mut core);
            let left = core.inflight_total();
            if reaped.is_ok() {
                core.shut_down();
            }
            (reaped, completions, left)
        };
        // Outside the lock: releasing an export may run a pool's callback.
        drop(completions);
        reaped.map_err(to_pyerr)?;
        Ok(left)
    }

    fn backend(&self, socket: u64) -> PyResult<&'static str> {
        let backend = self
            .lock()
            .backend(SocketId::from_raw(socket))
            .map_err(to_pyerr)?;
        Ok(backend.name())
    }

    fn fallback_reason(&self, socket: u64) -> PyResult<Option<String>> {
        self.lock()
            .fallback_reason(SocketId::from_raw(socket))
            .map_err(to_pyerr)
    }

    fn inflight(&self, socket: u64) -> PyResult<usize> {
        self.lock()
            .inflight(SocketId::from_raw(socket))
            .map_err(to_pyerr)
    }

    fn stats<'py>(&self, py: Python<'py>, socket: u64) -> PyResult<Bound<'py, PyDict>> {
        let s = self
            .lock()
            .stats(SocketId::from_raw(socket))
            .map_err(to_pyerr)?;
        let dict = PyDict::new(py);
        for (key, value) in s.counters() {
            dict.set_item(key, value)?;
        }
        Ok(dict)
    }
}
