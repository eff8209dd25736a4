//! `CompletedSend`: what a send that finished inside its call returns instead of a future.
//!
//! A copying send the kernel takes whole (below the zero-copy threshold, or the copy backend) is
//! over before `send_zc` returns. Making an asyncio future for it, resolving it and awaiting it
//! costs more than the `sendmsg` itself on small sends, so such a send returns this immutable
//! object instead: awaiting it returns (or raises) at once, without yielding to the loop, and it
//! has the methods of a done `asyncio.Future` (`done`, `result`, `exception`,
//! `add_done_callback`, ...), so `asyncio.gather`, `asyncio.wait` and callbacks take it as one.

use pyo3::exceptions::{PyStopIteration, PyTypeError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::future::Outcome;

/// The outcome of a send that finished inside the call that submitted it.
#[pyclass(frozen, module = "zerosend._native")]
pub struct CompletedSend {
    event_loop: Py<PyAny>,
    /// The `SendResult`, or the exception the send failed with.
    outcome: Outcome,
}

impl CompletedSend {
    pub fn value(event_loop: Py<PyAny>, value: Py<PyAny>) -> Self {
        Self {
            event_loop,
            outcome: Outcome::Value(value),
        }
    }

    pub fn error(event_loop: Py<PyAny>, error: Py<PyAny>) -> Self {
        Self {
            event_loop,
            outcome: Outcome::Error(error),
        }
    }

    /// True if this belongs to `event_loop`.
    pub fn on_loop(&self, event_loop: &Bound<'_, PyAny>) -> bool {
        self.event_loop.is(event_loop)
    }
}

#[pymethods]
impl CompletedSend {
    /// asyncio recognizes a future by this attribute (`asyncio.isfuture`).
    #[classattr]
    fn _asyncio_future_blocking() -> bool {
        false
    }

    fn __await__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// Ends the `await` at once: the result as StopIteration's value, or the send's error.
    fn __next__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        match &self.outcome {
            Outcome::Value(value) => Err(PyStopIteration::new_err((value.clone_ref(py),))),
            Outcome::Error(error) => Err(PyErr::from_value(error.bind(py).clone())),
        }
    }

    fn done(&self) -> bool {
        true
    }

    fn cancelled(&self) -> bool {
        false
    }

    /// A finished send cannot be cancelled (as for a done future).
    #[pyo3(signature = (msg=None))]
    fn cancel(&self, msg: Option<Py<PyAny>>) -> bool {
        let _ = msg;
        false
    }

    fn result(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        match &self.outcome {
            Outcome::Value(value) => Ok(value.clone_ref(py)),
            Outcome::Error(error) => Err(PyErr::from_value(error.bind(py).clone())),
        }
    }

    fn exception(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        match &self.outcome {
            Outcome::Value(_) => None,
            Outcome::Error(error) => Some(error.clone_ref(py)),
        }
    }

    /// Schedules `callback(self)` on the event loop, as a done future does.
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
        let kwargs = PyDict::new(py);
        if let Some(context) = context {
            kwargs.set_item(intern!(py, "context"), context)?;
        }
        slf.get().event_loop.bind(py).call_method(
            intern!(py, "call_soon"),
            (callback, slf),
            Some(&kwargs),
        )?;
        Ok(())
    }

    /// Nothing is pending on a finished send: no callback to remove.
    fn remove_done_callback(&self, callback: &Bound<'_, PyAny>) -> usize {
        let _ = callback;
        0
    }

    fn get_loop(&self, py: Python<'_>) -> Py<PyAny> {
        self.event_loop.clone_ref(py)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        match &self.outcome {
            Outcome::Value(value) => format!("<CompletedSend result={}>", value.bind(py)),
            Outcome::Error(error) => format!("<CompletedSend exception={}>", error.bind(py)),
        }
    }
}
