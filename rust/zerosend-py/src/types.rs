//! Small immutable result objects.

use pyo3::exceptions::PyIndexError;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

/// How a send ended: bytes sent, and whether the kernel really avoided the copy.
#[pyclass(frozen, eq, get_all, module = "zerosend._native")]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SendResult {
    /// Bytes handed to the kernel (the whole send).
    nbytes: usize,
    /// True only if the kernel transmitted from your pages without copying them.
    zerocopy: bool,
}

impl From<zerosend::SendResult> for SendResult {
    fn from(r: zerosend::SendResult) -> Self {
        Self {
            nbytes: r.nbytes,
            zerocopy: r.zerocopy,
        }
    }
}

#[pymethods]
impl SendResult {
    #[new]
    fn new(nbytes: usize, zerocopy: bool) -> Self {
        Self { nbytes, zerocopy }
    }

    fn __repr__(&self) -> String {
        let zerocopy = if self.zerocopy { "True" } else { "False" };
        format!("SendResult(nbytes={}, zerocopy={zerocopy})", self.nbytes)
    }

    // A 2-sequence, as the README writes it: `nbytes, zerocopy = result`, `result[0]`,
    // `match result: case SendResult(n, True)`.
    #[classattr]
    fn __match_args__() -> (&'static str, &'static str) {
        ("nbytes", "zerocopy")
    }

    fn __len__(&self) -> usize {
        2
    }

    fn __getitem__(&self, py: Python<'_>, index: isize) -> PyResult<Py<PyAny>> {
        match index {
            0 | -2 => Ok(self.nbytes.into_pyobject(py)?.into_any().unbind()),
            1 | -1 => Ok(pyo3::types::PyBool::new(py, self.zerocopy)
                .to_owned()
                .into_any()
                .unbind()),
            _ => Err(PyIndexError::new_err(
                "SendResult index out of range (it has 2 items)",
            )),
        }
    }

    fn __iter__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let items = PyTuple::new(
            py,
            [
                self.nbytes.into_pyobject(py)?.into_any(),
                pyo3::types::PyBool::new(py, self.zerocopy)
                    .to_owned()
                    .into_any(),
            ],
        )?;
        Ok(items.try_iter()?.into_any().unbind())
    }
}

/// What the running kernel offers for zero-copy transmit.
#[pyclass(frozen, get_all, module = "zerosend._native")]
pub struct Capabilities {
    /// Kernel release, e.g. "6.18.44".
    kernel: String,
    /// io_uring SEND_ZC and SENDMSG_ZC are usable.
    io_uring_send_zc: bool,
    /// Why not, when `io_uring_send_zc` is False.
    io_uring_send_zc_reason: Option<String>,
    /// SO_ZEROCOPY / MSG_ZEROCOPY are usable.
    msg_zerocopy: bool,
    /// Why not, when `msg_zerocopy` is False.
    msg_zerocopy_reason: Option<String>,
}

impl From<zerosend::Capabilities> for Capabilities {
    fn from(c: zerosend::Capabilities) -> Self {
        Self {
            kernel: c.kernel,
            io_uring_send_zc: c.io_uring_send_zc.is_ok(),
            io_uring_send_zc_reason: c.io_uring_send_zc.err(),
            msg_zerocopy: c.msg_zerocopy.is_ok(),
            msg_zerocopy_reason: c.msg_zerocopy.err(),
        }
    }
}

#[pymethods]
impl Capabilities {
    fn __repr__(&self) -> String {
        let show = |ok: bool, reason: &Option<String>| match (ok, reason) {
            (true, _) => "True".to_string(),
            (false, Some(r)) => format!("False ({r})"),
            (false, None) => "False".to_string(),
        };
        format!(
            "Capabilities(kernel={:?}, io_uring_send_zc={}, msg_zerocopy={})",
            self.kernel,
            show(self.io_uring_send_zc, &self.io_uring_send_zc_reason),
            show(self.msg_zerocopy, &self.msg_zerocopy_reason),
        )
    }
}
