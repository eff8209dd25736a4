//! The send methods of one `zerosend.Socket` (`send_zc`, `send`, `send_file`): callables bound
//! to its driver, socket and loop, so a send runs no Python frame of zerosend's.

use pyo3::intern;
use pyo3::prelude::*;

use crate::driver::Driver;
use crate::future::is_asyncio_loop;

/// A bound send method of one `zerosend.Socket` (its `send_zc` or `send`): `send(buf)`
/// submits `buf` (a bytes-like object, or a list/tuple of them sent as one) now and returns
/// its awaitable, as `Driver.submit` does.
#[pyclass(frozen, module = "zerosend._native")]
pub struct Sender {
    driver: Py<Driver>,
    socket: u64,
    event_loop: Py<PyAny>,
    zerocopy: bool,
    /// The loop is asyncio's: sends get native futures.
    native: bool,
}

impl Sender {
    pub(crate) fn new(
        driver: &Bound<'_, Driver>,
        socket: u64,
        event_loop: &Bound<'_, PyAny>,
        zerocopy: bool,
    ) -> PyResult<Self> {
        Ok(Self {
            driver: driver.clone().unbind(),
            socket,
            event_loop: event_loop.clone().unbind(),
            zerocopy,
            native: is_asyncio_loop(event_loop)?,
        })
    }
}

#[pymethods]
impl Sender {
    #[pyo3(signature = (buf, /))]
    fn __call__(&self, py: Python<'_>, buf: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        Driver::send(
            self.driver.bind(py),
            self.socket,
            buf,
            self.zerocopy,
            self.event_loop.bind(py),
            self.native,
        )
    }

    fn __repr__(&self) -> String {
        let name = if self.zerocopy { "send_zc" } else { "send" };
        format!("<zerosend {name} of socket handle {}>", self.socket)
    }
}

/// The bound `send_file` of one `zerosend.Socket`: `send_file(file, offset=0, count=None)`
/// submits a sendfile(2) send now and returns its awaitable, as `Driver.submit_file` does.
#[pyclass(frozen, module = "zerosend._native")]
pub struct FileSender {
    driver: Py<Driver>,
    socket: u64,
    event_loop: Py<PyAny>,
    native: bool,
    /// Checks unusual arguments and raises the error naming the bad one (see `file_sender`).
    check: Py<PyAny>,
}

/// A non-negative int (not a bool), the common case of an offset or count.
fn plain_byte_count(value: &Bound<'_, PyAny>) -> bool {
    value.is_exact_instance_of::<pyo3::types::PyInt>() && value.extract::<u64>().is_ok()
}

impl FileSender {
    pub(crate) fn new(
        driver: &Bound<'_, Driver>,
        socket: u64,
        event_loop: &Bound<'_, PyAny>,
        check: Py<PyAny>,
    ) -> PyResult<Self> {
        Ok(Self {
            driver: driver.clone().unbind(),
            socket,
            event_loop: event_loop.clone().unbind(),
            native: is_asyncio_loop(event_loop)?,
            check,
        })
    }

    /// The descriptor of `file` on the common path: an int, or a file whose `fileno()`
    /// returns one; None for anything else (the check then words the error).
    fn plain_descriptor<'py>(file: &Bound<'py, PyAny>) -> Option<Bound<'py, PyAny>> {
        if file.is_exact_instance_of::<pyo3::types::PyInt>() {
            return Some(file.clone());
        }
        let py = file.py();
        let fd = file.call_method0(intern!(py, "fileno")).ok()?;
        fd.is_exact_instance_of::<pyo3::types::PyInt>()
            .then_some(fd)
    }
}

#[pymethods]
impl FileSender {
    #[pyo3(signature = (file, offset=None, count=None))]
    fn __call__(
        &self,
        py: Python<'_>,
        file: &Bound<'_, PyAny>,
        offset: Option<&Bound<'_, PyAny>>,
        count: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let zero = 0_u64.into_pyobject(py)?.into_any();
        let offset = offset.unwrap_or(&zero);
        let plain = Self::plain_descriptor(file)
            .filter(|_| plain_byte_count(offset) && count.map_or(true, plain_byte_count));
        let fd = match plain {
            Some(fd) => fd,
            None => self.check.bind(py).call1((file, offset, count))?,
        };
        Driver::send_file(
            self.driver.bind(py),
            self.socket,
            fd.extract()?,
            offset.extract()?,
            count.map(|count| count.extract()).transpose()?,
            self.event_loop.bind(py),
            self.native,
        )
    }

    fn __repr__(&self) -> String {
        format!("<zerosend send_file of socket handle {}>", self.socket)
    }
}
