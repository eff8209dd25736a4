//! `zerosend._native`: the thin PyO3 layer over the `zerosend` core crate.

mod buffer;
mod driver;
mod errors;
mod iscsi;
mod pool;
mod types;

use pyo3::buffer::PyUntypedBuffer;
use pyo3::prelude::*;

/// Probes the running kernel now.
#[pyfunction]
fn capabilities() -> types::Capabilities {
    zerosend::Capabilities::probe().into()
}

/// CRC32C (Castagnoli) of a bytes-like object, continuing from `value` (0 to start).
#[pyfunction]
#[pyo3(signature = (data, value = 0))]
fn crc32c(py: Python<'_>, data: &Bound<'_, PyAny>, value: u32) -> PyResult<u32> {
    let buffer = PyUntypedBuffer::get(data)?;
    if !buffer.is_c_contiguous() {
        return Err(pyo3::exceptions::PyValueError::new_err(
            "crc32c() needs a C-contiguous buffer",
        ));
    }
    // SAFETY: the export is held for the whole computation, so the pointer and length describe
    // valid memory; we hold the GIL, so Python code cannot resize the exporter meanwhile (it
    // refuses while exported anyway). A zero-length buffer may have a dangling pointer, so it is
    // not turned into a slice.
    let bytes = unsafe {
        if buffer.len_bytes() == 0 {
            &[][..]
        } else {
            std::slice::from_raw_parts(buffer.buf_ptr() as *const u8, buffer.len_bytes())
        }
    };
    let crc = zerosend::crc32c::crc32c(value, bytes);
    buffer.release(py);
    Ok(crc)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<driver::Driver>()?;
    m.add_class::<types::SendResult>()?;
    m.add_class::<types::Capabilities>()?;
    m.add_class::<pool::PoolMemory>()?;
    m.add_class::<pool::PoolBuffer>()?;
    m.add_class::<iscsi::IscsiReadPath>()?;
    m.add_function(wrap_pyfunction!(capabilities, m)?)?;
    m.add_function(wrap_pyfunction!(crc32c, m)?)?;
    m.add(
        "BackendUnavailableError",
        m.py().get_type::<errors::BackendUnavailableError>(),
    )?;
    Ok(())
}
