//! `zerosend._native`: the thin PyO3 layer over the `zerosend` core crate.

mod buffer;
mod completed;
mod driver;
mod errors;
mod future;
mod iscsi;
mod pool;
mod send_methods;
mod types;

use pyo3::prelude::*;
use pyo3::types::PyTuple;

/// Probes the running kernel now.
#[pyfunction]
fn capabilities() -> types::Capabilities {
    zerosend::Capabilities::probe().into()
}

/// The deliberate fault this mutants build has on (`ZEROSEND_MUTANT`), for the faults that live
/// in Python (`zerosend._mutant`); absent from release builds.
#[cfg(feature = "mutants")]
#[pyfunction]
fn _mutant() -> Option<&'static str> {
    zerosend::mutant::chosen()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<driver::Driver>()?;
    m.add_class::<types::SendResult>()?;
    m.add_class::<completed::CompletedSend>()?;
    m.add_class::<future::InFlightSend>()?;
    m.add_class::<send_methods::Sender>()?;
    m.add_class::<send_methods::FileSender>()?;
    m.add_class::<types::Capabilities>()?;
    m.add_class::<pool::PoolMemory>()?;
    m.add_class::<pool::PoolBuffer>()?;
    iscsi::register(m)?;
    m.add_function(wrap_pyfunction!(capabilities, m)?)?;
    #[cfg(feature = "mutants")]
    m.add_function(wrap_pyfunction!(_mutant, m)?)?;
    // The vocabulary the core defines, so that Python never spells it out a second time.
    let backends: Vec<&str> = zerosend::Backend::ALL.iter().map(|b| b.name()).collect();
    m.add("BACKENDS", PyTuple::new(m.py(), backends)?)?;
    m.add(
        "STATS_KEYS",
        PyTuple::new(m.py(), zerosend::SocketStats::KEYS)?,
    )?;
    m.add(
        "BackendUnavailableError",
        errors::backend_unavailable_error(m.py())?,
    )?;
    Ok(())
}
