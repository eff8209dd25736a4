//! `zerosend._native.Driver`: the core driver of one asyncio event loop.
//!
//! The Python layer registers `fileno()` with `loop.add_reader` and calls `dispatch()` when it
//! is readable. Completions resolve their asyncio futures here, in one batch per wake-up, on the
//! loop's own thread.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use pyo3::exceptions::PyValueError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use zerosend::{Backend, Completion, SocketId, SocketOptions};

use crate::buffer::{extract_buffers, PyBuf};
use crate::errors::to_pyerr;
use crate::pool::PoolMemory;
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
}

impl Driver {
    fn lock(&self) -> MutexGuard<'_, CoreDriver> {
        self.core
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn collect(core: &mut CoreDriver) -> Vec<CoreCompletion> {
        if core.has_completions() {
            core.take_completions().collect()
        } else {
            Vec::new()
        }
    }
}

/// Sets the future's result or exception unless it was cancelled meanwhile.
fn resolve(py: Python<'_>, completion: CoreCompletion) -> PyResult<()> {
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
    if future.call_method0(intern!(py, "done"))?.is_truthy()? {
        return Ok(());
    }
    match outcome {
        Some(Ok(result)) => {
            let value = Py::new(py, SendResult::from(result))?;
            future.call_method1(intern!(py, "set_result"), (value,))?;
        }
        Some(Err(err)) => {
            future.call_method1(
                intern!(py, "set_exception"),
                (to_pyerr(err).into_value(py),),
            )?;
        }
        None => {
            future.call_method1(intern!(py, "set_result"), (py.None(),))?;
        }
    }
    Ok(())
}

/// The early-release fault: cancelling `future` drops the buffers' exports at once.
#[cfg(feature = "mutants")]
fn release_exports_on_cancel(py: Python<'_>, future: &Py<PyAny>, bufs: &[PyBuf]) -> PyResult<()> {
    let exports: Vec<_> = bufs.iter().map(PyBuf::export_handle).collect();
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

fn resolve_all(py: Python<'_>, completions: Vec<CoreCompletion>) -> PyResult<()> {
    let mut first_error = None;
    for completion in completions {
        if let Err(err) = resolve(py, completion) {
            first_error.get_or_insert(err);
        }
    }
    first_error.map_or(Ok(()), Err)
}

#[pymethods]
impl Driver {
    #[new]
    fn new() -> PyResult<Self> {
        Ok(Self {
            core: Mutex::new(CoreDriver::new().map_err(to_pyerr)?),
            flush_scheduled: AtomicBool::new(false),
        })
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

    /// Submits one send (a buffer, or a list/tuple of buffers sent as one) whose completion
    /// resolves `future` with a `SendResult`. Returns True when the caller should schedule
    /// `flush` to run once this event loop turn's callbacks are done: io_uring requests are handed
    /// to the kernel together, one system call for every send of the turn.
    fn submit(
        &self,
        py: Python<'_>,
        socket: u64,
        buffers: &Bound<'_, PyAny>,
        zerocopy: bool,
        future: Py<PyAny>,
    ) -> PyResult<bool> {
        let bufs = extract_buffers(buffers)?;
        #[cfg(feature = "mutants")]
        if zerocopy && zerosend::mutant::active(zerosend::mutant::EARLY_RELEASE_ON_CANCEL) {
            release_exports_on_cancel(py, &future, &bufs)?;
        }
        let (submitted, needs_flush, completions) = {
            let mut core = self.lock();
            let submitted = core.submit(SocketId::from_raw(socket), bufs, zerocopy, future);
            (submitted, core.needs_flush(), Self::collect(&mut core))
        };
        resolve_all(py, completions)?;
        // A rejected send's buffers are released here, outside the lock.
        submitted.map_err(|rejected| to_pyerr(rejected.error))?;
        Ok(needs_flush && !self.flush_scheduled.swap(true, Ordering::AcqRel))
    }

    /// Submits a send of `count` bytes (None: up to the end) of the file open on descriptor
    /// `fd`, from `offset`, with sendfile(2); the driver holds its own duplicate of `fd`.
    /// Returns True when the caller should schedule `flush`, as `submit` does.
    #[pyo3(signature = (socket, fd, offset, count, future))]
    fn submit_file(
        &self,
        py: Python<'_>,
        socket: u64,
        fd: i32,
        offset: u64,
        count: Option<u64>,
        future: Py<PyAny>,
    ) -> PyResult<bool> {
        if fd < 0 {
            return Err(PyValueError::new_err("the file is closed (fileno() is -1)"));
        }
        // SAFETY: the caller passes the descriptor of a file it holds open for the duration of
        // this call; the driver only duplicates it.
        let file = unsafe { BorrowedFd::borrow_raw(fd) };
        let (submitted, needs_flush, completions) = {
            let mut core = self.lock();
            let submitted =
                core.submit_file(SocketId::from_raw(socket), file, offset, count, future);
            (submitted, core.needs_flush(), Self::collect(&mut core))
        };
        resolve_all(py, completions)?;
        submitted.map_err(|rejected| to_pyerr(rejected.error))?;
        Ok(needs_flush && !self.flush_scheduled.swap(true, Ordering::AcqRel))
    }

    /// Hands the io_uring requests queued by `submit` to the kernel.
    fn flush(&self) -> PyResult<()> {
        self.flush_scheduled.store(false, Ordering::Release);
        self.lock().flush().map_err(to_pyerr)
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
        resolve_all(py, completions)?;
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
        resolve_all(py, completions)
    }

    /// Stops sending on the socket; its descriptor closes after the last release.
    fn close(&self, py: Python<'_>, socket: u64) -> PyResult<()> {
        let completions = {
            let mut core = self.lock();
            core.close(SocketId::from_raw(socket));
            Self::collect(&mut core)
        };
        resolve_all(py, completions)
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
