//! `zerosend._native`: the thin PyO3 layer over the `zerosend` core crate.

mod buffer;
mod driver;
mod errors;
mod iscsi;
mod pool;
mod types;

use pyo3::prelude::*;

/// Probes the running kernel now.
#[pyfunction]
fn capabilities() -> types::Capabilities {
    zerosend::Capabilities::probe().into()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<driver::Driver>()?;
    m.add_class::<types::SendResult>()?;
    m.add_class::<types::Capabilities>()?;
    m.add_class::<pool::PoolMemory>()?;
    m.add_class::<pool::PoolBuffer>()?;
    iscsi::register(m)?;
    m.add_function(wrap_pyfunction!(capabilities, m)?)?;
    m.add(
        "BackendUnavailableError",
        m.py().get_type::<errors::BackendUnavailableError>(),
    )?;
    Ok(())
}
