//! `InFlightSend`: the awaitable of a send still in the kernel's hands, made without
//! `loop.create_future()`.
//!
//! It is an asyncio-compatible future (`asyncio.isfuture` is true, a task awaits it through
//! `_asyncio_future_blocking`, and `gather`, `wait`, `wait_for` and `shield` take it), resolved
//! by the driver in its completion batch: no Python frame per send, and its done callbacks are
//! scheduled with `loop.call_soon(callback, future, context=...)` as asyncio's own futures do.
//! Only the driver sets its outcome; it has no public `set_result`/`set_exception`.
//!
//! Cancelling it does not stop the send: the bytes still go out whole, and the driver holds the
//! buffer until the kernel releases it (its outcome is then dropped), as with the asyncio
//! future it replaces.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use pyo3::exceptions::{PyStopIteration, PyTypeError};
use pyo3::gc::PyVisit;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyDict;
use pyo3::PyTraverseError;

/// How a send ended, as Python objects.
pub(crate) enum Outcome {
    Value(Py<PyAny>),
    Error(Py<PyAny>),
}

/// A done callback and the context it runs in.
struct Callback {
    function: Py<PyAny>,
    context: Py<PyAny>,
}

enum State {
    /// Most sends get exactly one callback: the awaiting task's wake-up.
    Pending(Vec<Callback>),
    Done(Outcome),
    /// Cancelled, with the message `cancel()` was given.
    Cancelled(Option<Py<PyAny>>),
}

/// The future of a send in flight: resolves with its `SendResult` (or its error) when the
/// kernel released the buffer.
#[pyclass(frozen, module = "zerosend._native")]
pub struct InFlightSend {
    event_loop: Py<PyAny>,
    /// asyncio's handshake: set while a task waits on it, cleared by the task.
    blocking: AtomicBool,
    // Never held while Python code runs (callbacks, `__eq__`, `call_soon`): they may call
    // back into this future.
    state: Mutex<State>,
}

static ASYNCIO: PyOnceLock<AsyncioNames> = PyOnceLock::new();

struct AsyncioNames {
    cancelled_error: Py<PyAny>,
    invalid_state_error: Py<PyAny>,
    copy_context: Py<PyAny>,
    event_loop_type: Py<PyAny>,
}

fn asyncio_names(py: Python<'_>) -> PyResult<&AsyncioNames> {
    ASYNCIO.get_or_try_init(py, || {
        let asyncio = py.import("asyncio")?;
        Ok(AsyncioNames {
            cancelled_error: asyncio.getattr("CancelledError")?.unbind(),
            invalid_state_error: asyncio.getattr("InvalidStateError")?.unbind(),
            copy_context: py.import("contextvars")?.getattr("copy_context")?.unbind(),
            event_loop_type: asyncio.getattr("AbstractEventLoop")?.unbind(),
        })
    })
}

/// True for an asyncio event loop (uvloop's included), false for another library's face (the
/// trio layer's), whose futures its own `create_future` makes.
pub(crate) fn is_asyncio_loop(event_loop: &Bound<'_, PyAny>) -> PyResult<bool> {
    let names = asyncio_names(event_loop.py())?;
    event_loop.is_instance(names.event_loop_type.bind(event_loop.py()))
}

fn cancelled_error(py: Python<'_>, msg: Option<&Py<PyAny>>) -> PyResult<PyErr> {
    let class = asyncio_names(py)?.cancelled_error.bind(py);
    let error = match msg {
        Some(msg) => class.call1((msg.clone_ref(py),))?,
        None => class.call0()?,
    };
    Ok(PyErr::from_value(error))
}

fn invalid_state(py: Python<'_>, what: &str) -> PyResult<PyErr> {
    let class = asyncio_names(py)?.invalid_state_error.bind(py);
    Ok(PyErr::from_value(class.call1((what,))?))
}

impl InFlightSend {
    pub(crate) fn new(event_loop: Py<PyAny>) -> Self {
        Self {
            event_loop,
            blocking: AtomicBool::new(false),
            state: Mutex::new(State::Pending(Vec::new())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sets the outcome (the driver's completion batch) and schedules the done callbacks.
    /// False if the future was cancelled meanwhile: the outcome is dropped.
    pub(crate) fn finish(slf: &Bound<'_, Self>, outcome: Outcome) -> PyResult<bool> {
        let callbacks = {
            let mut state = slf.get().lock();
            match &mut *state {
                State::Pending(callbacks) => {
                    let callbacks = std::mem::take(callbacks);
                    *state = State::Done(outcome);
                    callbacks
                }
                State::Done(_) | State::Cancelled(_) => return Ok(false),
            }
        };
        Self::schedule(slf, callbacks)?;
        Ok(true)
    }

    /// `loop.call_soon(callback, self, context=context)` for each; every one is tried, the
    /// first failure (a closed loop) is raised.
    fn schedule(slf: &Bound<'_, Self>, callbacks: Vec<Callback>) -> PyResult<()> {
        if callbacks.is_empty() {
            return Ok(());
        }
        let py = slf.py();
        let call_soon = slf
            .get()
            .event_loop
            .bind(py)
            .getattr(intern!(py, "call_soon"))?;
        let mut first_error = None;
        for callback in callbacks {
            let kwargs = PyDict::new(py);
            let scheduled = kwargs
                .set_item(intern!(py, "context"), callback.context)
                .and_then(|()| call_soon.call((callback.function, slf), Some(&kwargs)));
            if let Err(err) = scheduled {
                first_error.get_or_insert(err);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The state as new references, taken under the lock; everything that runs Python code
    /// (making an exception, `str()` of a value) happens after it is released.
    fn snapshot(&self, py: Python<'_>) -> Snapshot {
        match &*self.lock() {
            State::Pending(_) => Snapshot::Pending,
            State::Done(Outcome::Value(value)) => Snapshot::Value(value.clone_ref(py)),
            State::Done(Outcome::Error(error)) => Snapshot::Error(error.clone_ref(py)),
            State::Cancelled(msg) => Snapshot::Cancelled(msg.as_ref().map(|m| m.clone_ref(py))),
        }
    }
}

enum Snapshot {
    Pending,
    Value(Py<PyAny>),
    Error(Py<PyAny>),
    Cancelled(Option<Py<PyAny>>),
}

impl Snapshot {
    /// What `result()` returns or raises.
    fn result(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        match self {
            Snapshot::Pending => Err(invalid_state(py, "the send has not finished yet")?),
            Snapshot::Value(value) => Ok(value),
            Snapshot::Error(error) => Err(PyErr::from_value(error.into_bound(py))),
            Snapshot::Cancelled(msg) => Err(cancelled_error(py, msg.as_ref())?),
        }
    }
}

#[pymethods]
impl InFlightSend {
    /// asyncio's mark of a future (`asyncio.isfuture`); a task sets it back to False when it
    /// starts waiting.
    #[getter(_asyncio_future_blocking)]
    fn asyncio_future_blocking(&self) -> bool {
        self.blocking.load(Ordering::Relaxed)
    }

    #[setter(_asyncio_future_blocking)]
    fn set_asyncio_future_blocking(&self, value: bool) {
        self.blocking.store(value, Ordering::Relaxed);
    }

    fn __await__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// Yields the future itself to the awaiting task while the send is in flight (as
    /// `asyncio.Future.__await__` does); once done, ends the `await` with the result or error.
    fn __next__(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let this = slf.get();
        match this.snapshot(py) {
            Snapshot::Pending => {
                this.blocking.store(true, Ordering::Relaxed);
                Ok(slf.clone().into_any().unbind())
            }
            Snapshot::Value(value) => Err(PyStopIteration::new_err((value,))),
            other => other.result(py),
        }
    }

    fn done(&self) -> bool {
        !matches!(&*self.lock(), State::Pending(_))
    }

    fn cancelled(&self) -> bool {
        matches!(&*self.lock(), State::Cancelled(_))
    }

    /// Stops waiting for the send (the awaiting task gets `CancelledError`). The send itself
    /// still goes out whole, and its buffer stays held until the kernel releases it.
    #[pyo3(signature = (msg=None))]
    fn cancel(slf: &Bound<'_, Self>, msg: Option<Py<PyAny>>) -> PyResult<bool> {
        let callbacks = {
            let mut state = slf.get().lock();
            match &mut *state {
                State::Pending(callbacks) => {
                    let callbacks = std::mem::take(callbacks);
                    *state = State::Cancelled(msg);
                    callbacks
                }
                State::Done(_) | State::Cancelled(_) => return Ok(false),
            }
        };
        slf.get().blocking.store(false, Ordering::Relaxed);
        Self::schedule(slf, callbacks)?;
        Ok(true)
    }

    /// The `SendResult`; raises the send's error, `CancelledError` if cancelled, or
    /// `asyncio.InvalidStateError` while the send is in flight.
    fn result(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.snapshot(py).result(py)
    }

    /// The send's error, or None; raises as `result()` does while in flight or if cancelled.
    fn exception(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        match self.snapshot(py) {
            Snapshot::Value(_) => Ok(None),
            Snapshot::Error(error) => Ok(Some(error)),
            other => other.result(py).map(|_| None),
        }
    }

    /// Runs `callback(self)` with `loop.call_soon` once the future is done (at once if it is),
    /// in `context` (by default a copy of the current one, as asyncio's futures do).
    #[pyo3(signature = (callback, *, context=None))]
    fn add_done_callback(
        slf: &Bound<'_, Self>,
        callback: &Bound<'_, PyAny>,
        context: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let py = slf.py();
        if !callback.is_callable() {
            return Err(PyTypeError::new_err("add_done_callback() needs a callable"));
        }
        let context = match context {
            Some(context) => context.clone().unbind(),
            None => asyncio_names(py)?.copy_context.bind(py).call0()?.unbind(),
        };
        let entry = Callback {
            function: callback.clone().unbind(),
            context,
        };
        {
            let mut state = slf.get().lock();
            if let State::Pending(callbacks) = &mut *state {
                callbacks.push(entry);
                return Ok(());
            }
        }
        Self::schedule(slf, vec![entry])
    }

    /// Removes every registration of `callback` (compared with ==); returns how many.
    fn remove_done_callback(slf: &Bound<'_, Self>, callback: &Bound<'_, PyAny>) -> PyResult<usize> {
        let this = slf.get();
        // Compared outside the lock: `__eq__` is Python code.
        let taken = match &mut *this.lock() {
            State::Pending(callbacks) => std::mem::take(callbacks),
            State::Done(_) | State::Cancelled(_) => return Ok(0),
        };
        let mut kept = Vec::with_capacity(taken.len());
        let mut removed = 0;
        let mut compared = Ok(());
        for entry in taken {
            let equal = if compared.is_ok() {
                match entry.function.bind(callback.py()).eq(callback) {
                    Ok(equal) => equal,
                    Err(err) => {
                        compared = Err(err);
                        false
                    }
                }
            } else {
                false
            };
            if equal {
                removed += 1;
            } else {
                kept.push(entry);
            }
        }
        let finished_meanwhile = {
            let mut state = this.lock();
            match &mut *state {
                // Callbacks added meanwhile (by an `__eq__`) come after the kept ones.
                State::Pending(callbacks) => {
                    kept.append(callbacks);
                    *callbacks = kept;
                    Vec::new()
                }
                // Finished meanwhile (an `__eq__` cancelled it): the kept ones are due now.
                State::Done(_) | State::Cancelled(_) => kept,
            }
        };
        Self::schedule(slf, finished_meanwhile)?;
        compared.map(|()| removed)
    }

    fn get_loop(&self, py: Python<'_>) -> Py<PyAny> {
        self.event_loop.clone_ref(py)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        match self.snapshot(py) {
            Snapshot::Pending => "<InFlightSend pending>".to_string(),
            Snapshot::Cancelled(_) => "<InFlightSend cancelled>".to_string(),
            Snapshot::Value(value) => format!("<InFlightSend result={}>", value.bind(py)),
            Snapshot::Error(error) => format!("<InFlightSend exception={}>", error.bind(py)),
        }
    }

    // The awaiting task's wake-up refers back to this future (task -> coroutine -> future):
    // the collector must see the references to break such a cycle left by a loop that closed
    // with the send never finished.
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.event_loop)?;
        // Never blocks: the lock is not held while Python code (or the collector) runs, and a
        // state in use is skipped rather than waited for.
        if let Ok(state) = self.state.try_lock() {
            match &*state {
                State::Pending(callbacks) => {
                    for callback in callbacks {
                        visit.call(&callback.function)?;
                        visit.call(&callback.context)?;
                    }
                }
                State::Done(Outcome::Value(object) | Outcome::Error(object)) => {
                    visit.call(object)?;
                }
                State::Cancelled(msg) => visit.call(msg)?,
            }
        }
        Ok(())
    }

    fn __clear__(&self) {
        let cleared = std::mem::replace(&mut *self.lock(), State::Cancelled(None));
        drop(cleared); // after unlocking: dropping references may run finalizers
    }
}
