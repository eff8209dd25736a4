//! Python buffers held as in-flight send memory.

use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};

use zerosend::IoBuf;

/// A held buffer export (`Py_buffer`) of a Python object.
///
/// While this value lives the exporter keeps the memory in place: a `bytearray` refuses to
/// resize (`BufferError`), an `mmap` refuses to close, and the object cannot be freed.
pub struct PyBuf {
    buffer: Export,
    /// The exported memory, kept apart from the export so that the early-release fault can
    /// drop the export while the kernel still reads the memory.
    #[cfg(feature = "mutants")]
    memory: (usize, usize),
}

#[cfg(not(feature = "mutants"))]
type Export = PyUntypedBuffer;
/// An export that [`release_early`] can drop while the send is in flight (mutants build only).
#[cfg(feature = "mutants")]
pub type Export = std::sync::Arc<std::sync::Mutex<Option<PyUntypedBuffer>>>;

/// The early-release fault: drop the exports now, although the kernel may still read them.
#[cfg(feature = "mutants")]
pub fn release_early(exports: &[Export]) {
    for export in exports {
        drop(export.lock().map(|mut held| held.take()));
    }
}

impl PyBuf {
    fn export(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        let buffer =
            PyUntypedBuffer::get(obj).map_err(|_| {
                PyTypeError::new_err(format!(
                "expected a bytes-like object (bytes, bytearray, memoryview, mmap, array) or a \
                 list/tuple of them, not '{}'",
                obj.get_type().name().map(|n| n.to_string()).unwrap_or_default()
            ))
            })?;
        if !buffer.is_c_contiguous() {
            return Err(PyValueError::new_err(
                "the buffer is not C-contiguous (a strided memoryview slice?); pass a contiguous \
                 view or a bytes() copy",
            ));
        }
        #[cfg(feature = "mutants")]
        return Ok(Self {
            memory: (buffer.buf_ptr() as usize, buffer.len_bytes()),
            buffer: std::sync::Arc::new(std::sync::Mutex::new(Some(buffer))),
        });
        #[cfg(not(feature = "mutants"))]
        Ok(Self { buffer })
    }

    /// A handle on the export, for the early-release fault.
    #[cfg(feature = "mutants")]
    pub fn export_handle(&self) -> Export {
        std::sync::Arc::clone(&self.buffer)
    }
}

// SAFETY: `buf_ptr()` and `len_bytes()` come from a Py_buffer export that we hold until this
// value is dropped. The buffer protocol requires the exporter to keep that memory valid and in
// place while any export is held (bytearray/mmap refuse to resize or close). The Py_buffer
// struct itself is boxed inside PyUntypedBuffer, so moving this value moves no memory the
// kernel reads.
unsafe impl IoBuf for PyBuf {
    #[cfg(not(feature = "mutants"))]
    fn as_ptr(&self) -> *const u8 {
        self.buffer.buf_ptr() as *const u8
    }
    #[cfg(not(feature = "mutants"))]
    fn len(&self) -> usize {
        self.buffer.len_bytes()
    }
    // The mutants build: the same memory, remembered at export time (the early-release fault
    // breaks this contract on purpose; nothing else drops the export before this value).
    #[cfg(feature = "mutants")]
    fn as_ptr(&self) -> *const u8 {
        self.memory.0 as *const u8
    }
    #[cfg(feature = "mutants")]
    fn len(&self) -> usize {
        self.memory.1
    }
}

/// One buffer, or every buffer of a list/tuple (one vectored send).
pub fn extract_buffers(obj: &Bound<'_, PyAny>) -> PyResult<Vec<PyBuf>> {
    let mut bufs = extract_in_order(obj)?;
    if zerosend::mutant::active(zerosend::mutant::VECTORED_REVERSED) {
        bufs.reverse();
    }
    Ok(bufs)
}

fn extract_in_order(obj: &Bound<'_, PyAny>) -> PyResult<Vec<PyBuf>> {
    if let Ok(list) = obj.cast::<PyList>() {
        list.iter().map(|item| PyBuf::export(&item)).collect()
    } else if let Ok(tuple) = obj.cast::<PyTuple>() {
        tuple.iter().map(|item| PyBuf::export(&item)).collect()
    } else {
        Ok(vec![PyBuf::export(obj)?])
    }
}
