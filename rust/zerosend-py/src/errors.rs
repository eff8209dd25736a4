//! The single boundary where core errors become Python exceptions.

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

use zerosend::Error;

/// `zerosend._errors.BackendUnavailableError`: defined in Python so that it can derive from both
/// `zerosend.ZerosendError` and `OSError`, and be the same class with or without this extension.
static BACKEND_UNAVAILABLE: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// The class raised when a requested backend cannot be used.
pub fn backend_unavailable_error(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    BACKEND_UNAVAILABLE.import(py, "zerosend._errors", "BackendUnavailableError")
}

/// Converts a core error: kernel failures become the matching `OSError` subclass with `errno`
/// (`BrokenPipeError`, `ConnectionResetError`, ...), argument problems become `ValueError`, and
/// use of an object inherited through fork() becomes `RuntimeError`.
pub fn to_pyerr(err: Error) -> PyErr {
    let message = err.to_string();
    match (&err, err.errno()) {
        (Error::Forked, _) => PyRuntimeError::new_err(message),
        (Error::BackendUnavailable { .. }, Some(errno)) => Python::attach(|py| {
            match backend_unavailable_error(py) {
                Ok(class) => PyErr::from_type(class.clone(), (errno, message)),
                // Only if the package's Python files are missing: still an OSError with errno.
                Err(_) => PyOSError::new_err((errno, message)),
            }
        }),
        (_, Some(errno)) => PyOSError::new_err((errno, message)),
        (_, None) => PyValueError::new_err(message),
    }
}
