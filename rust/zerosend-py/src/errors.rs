//! The single boundary where core errors become Python exceptions.

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use zerosend::Error;

pyo3::create_exception!(
    _native,
    BackendUnavailableError,
    PyOSError,
    "The requested zero-copy backend cannot be used on this kernel or socket; the message says why."
);

/// Converts a core error: kernel failures become the matching `OSError` subclass with `errno`
/// (`BrokenPipeError`, `ConnectionResetError`, ...), argument problems become `ValueError`, and
/// use of an object inherited through fork() becomes `RuntimeError`.
pub fn to_pyerr(err: Error) -> PyErr {
    let message = err.to_string();
    match (&err, err.errno()) {
        (Error::Forked, _) => PyRuntimeError::new_err(message),
        (Error::BackendUnavailable { .. }, Some(errno)) => {
            BackendUnavailableError::new_err((errno, message))
        }
        (_, Some(errno)) => PyOSError::new_err((errno, message)),
        (_, None) => PyValueError::new_err(message),
    }
}
