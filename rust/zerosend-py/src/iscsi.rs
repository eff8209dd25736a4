//! The iSCSI target's Rust pieces, thin wrappers over `zerosend-iscsi`, in a module of their
//! own: `zerosend.iscsi._native`. It shares the core's shared object (one build, one wheel) but
//! not its namespace: `zerosend._native` lists nothing of iSCSI, and the target reaches these
//! pieces through `zerosend.iscsi._accel` only.
//!
//! `IscsiReadPath.serve` runs the READ path's inner loop over the target's receive buffer into
//! the pooled transmit buffer it is filling; `crc32c` is the crate's digest. `_encode_data_in`
//! and `_encode_scsi_response` are the crate's encoders, for the tests that check the Python
//! ones against them byte for byte (the production READ path never calls them).

use std::os::fd::RawFd;

use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use zerosend_iscsi::{DataIn, FdMedium, ReadLimits, ReadPath, ScsiResponse, SeqNumbers};

/// A held, C-contiguous buffer export.
struct Export {
    buffer: PyUntypedBuffer,
}

impl Export {
    fn get(obj: &Bound<'_, PyAny>, what: &str, writable: bool) -> PyResult<Self> {
        let buffer = PyUntypedBuffer::get(obj)?;
        if !buffer.is_c_contiguous() {
            return Err(PyValueError::new_err(format!(
                "{what} must be C-contiguous"
            )));
        }
        if writable && buffer.readonly() {
            return Err(PyValueError::new_err(format!("{what} must be writable")));
        }
        Ok(Self { buffer })
    }

    fn range(&self) -> (usize, usize) {
        let start = self.buffer.buf_ptr() as usize;
        (start, start + self.buffer.len_bytes())
    }

    /// The exported bytes.
    fn bytes(&self) -> &[u8] {
        let (start, end) = self.range();
        if start == end {
            return &[]; // a zero-length export may carry a dangling pointer
        }
        // SAFETY: the export is held for as long as `self` (and so the returned borrow) lives,
        // so the pointer and length describe valid memory the exporter keeps in place (a
        // bytearray refuses to resize, an mmap to close, while exported). Callers hold the GIL
        // and run no Python code while they use the slice, so no Python code writes it.
        unsafe { std::slice::from_raw_parts(start as *const u8, end - start) }
    }

    /// The exported bytes, writable. `other` is an export the caller reads at the same time.
    fn bytes_mut_apart_from(&mut self, other: &Export) -> PyResult<&mut [u8]> {
        let (lo, hi) = self.range();
        let (other_lo, other_hi) = other.range();
        if lo < other_hi && other_lo < hi {
            return Err(PyValueError::new_err("the two buffers must not overlap"));
        }
        if lo == hi {
            return Ok(&mut []);
        }
        // SAFETY: as in `bytes`, the held export keeps the memory valid and in place for the
        // borrow of `self`; `get` checked it is writable. The range was just checked to be
        // disjoint from `other`'s, so this mutable slice never aliases the shared one the caller
        // reads alongside it, and `&mut self` rules out a second mutable slice of this export.
        Ok(unsafe { std::slice::from_raw_parts_mut(lo as *mut u8, hi - lo) })
    }
}

/// What one `IscsiReadPath.serve` call did, in the order of the target's `_accel.RUN_FIELDS`:
/// (start, pos, expcmdsn, statsn, maxcmdsn, commands, nbytes, large, need, send_from,
/// send_len). `start`: the receive buffer's new start (past the commands served); `pos`: the
/// transmit buffer's new fill position; `large`: the last command read `zc_min` bytes or more
/// (send the batch now, zero-copy); `need`: room the next command wants if the run stopped for
/// lack of it, else 0; with `send_len` > 0 the last command's data was not read: send that many
/// bytes of the image from `send_from` after its header (from a mapping of the image). A plain
/// tuple, the same shape the Python loop returns.
type ReadRun = (usize, usize, u32, u32, u32, u32, u64, bool, usize, u64, u32);

/// One LUN's READ path on one connection: the inner loop of the target's READ path.
#[pyclass(frozen, module = "zerosend.iscsi._native")]
pub struct IscsiReadPath {
    path: ReadPath<FdMedium>,
}

#[pymethods]
impl IscsiReadPath {
    /// `fd`: the image, read with pread (the caller keeps it open); `lun`: the 8-byte LUN field;
    /// `blocks` of `block_size` bytes; `max_len`: the longest read one Data-In PDU may carry;
    /// `zc_min`: reads this long end a run; `refer_min`: reads this long are not read but left
    /// to the caller (`ReadRun.send_from`). A run serves commands up to MaxCmdSN and leaves
    /// MaxCmdSN as it was.
    #[new]
    #[allow(clippy::too_many_arguments)]
    fn new(
        fd: RawFd,
        lun: &[u8],
        block_size: u32,
        blocks: u64,
        max_len: u32,
        zc_min: u32,
        refer_min: u32,
    ) -> PyResult<Self> {
        let lun: [u8; 8] = lun
            .try_into()
            .map_err(|_| PyValueError::new_err("lun must be the 8-byte LUN field"))?;
        if fd < 0 {
            return Err(PyValueError::new_err("fd must be an open descriptor"));
        }
        let limits = ReadLimits {
            max_len,
            zc_min,
            refer_min,
        };
        let path = ReadPath::new(FdMedium(fd), lun, block_size, blocks, limits)
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(Self { path })
    }

    /// Serves the plain READs at `rx[start:end]` into `out[pos:]`; `sn` is (ExpCmdSN, StatSN,
    /// MaxCmdSN) before the run. `busy`: containers of the ITTs of tasks in progress; the run
    /// stops at a command that reuses one of them (the general path rejects it).
    #[pyo3(signature = (rx, start, end, out, pos, sn, busy=None))]
    #[allow(clippy::too_many_arguments)]
    fn serve(
        &self,
        rx: &Bound<'_, PyAny>,
        start: usize,
        end: usize,
        out: &Bound<'_, PyAny>,
        pos: usize,
        sn: (u32, u32, u32),
        busy: Option<Vec<Bound<'_, PyAny>>>,
    ) -> PyResult<ReadRun> {
        let rx = Export::get(rx, "rx", false)?;
        let mut out = Export::get(out, "out", true)?;
        let rx_bytes = rx.bytes();
        let out_bytes = out.bytes_mut_apart_from(&rx)?;
        if start > end || end > rx_bytes.len() || pos > out_bytes.len() {
            return Err(PyValueError::new_err("start/end/pos out of range"));
        }
        let (expcmdsn, statsn, maxcmdsn) = sn;
        let before = SeqNumbers {
            expcmdsn,
            statsn,
            maxcmdsn,
        };
        let busy = busy.unwrap_or_default();
        // A container that cannot answer counts as busy: the general path then decides.
        let in_progress = |itt: u32| busy.iter().any(|tasks| tasks.contains(itt).unwrap_or(true));
        let run =
            self.path
                .serve_unless(&rx_bytes[start..end], out_bytes, pos, before, in_progress);
        Ok((
            start + run.consumed,
            run.pos,
            run.sn.expcmdsn,
            run.sn.statsn,
            run.sn.maxcmdsn,
            run.commands,
            run.bytes,
            run.large,
            run.need,
            run.send_from,
            run.send_len,
        ))
    }
}

/// CRC32C (Castagnoli) of a bytes-like object, continuing from `value` (0 to start).
#[pyfunction]
#[pyo3(signature = (data, value = 0))]
fn crc32c(data: &Bound<'_, PyAny>, value: u32) -> PyResult<u32> {
    let data = Export::get(data, "crc32c() data", false)?;
    Ok(zerosend_iscsi::digest::crc32c(value, data.bytes()))
}

/// For tests: a whole Data-In header (48 bytes), from the crate's encoder.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn _encode_data_in<'py>(
    py: Python<'py>,
    flags: u8,
    status: u8,
    data_len: u32,
    lun: &[u8],
    itt: u32,
    statsn: u32,
    expcmdsn: u32,
    maxcmdsn: u32,
    datasn: u32,
    offset: u32,
    residual: u32,
) -> PyResult<Bound<'py, PyBytes>> {
    let lun: [u8; 8] = lun
        .try_into()
        .map_err(|_| PyValueError::new_err("lun must be the 8-byte LUN field"))?;
    let mut h = [0u8; zerosend_iscsi::BHS_LEN];
    DataIn {
        flags,
        status,
        data_len,
        lun,
        itt,
        statsn,
        expcmdsn,
        maxcmdsn,
        datasn,
        offset,
        residual,
    }
    .encode(&mut h);
    Ok(PyBytes::new(py, &h))
}

/// For tests: a whole SCSI Response header (48 bytes), from the crate's encoder.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn _encode_scsi_response<'py>(
    py: Python<'py>,
    flags: u8,
    status: u8,
    data_len: u32,
    itt: u32,
    statsn: u32,
    expcmdsn: u32,
    maxcmdsn: u32,
    expdatasn: u32,
    residual: u32,
) -> Bound<'py, PyBytes> {
    let mut h = [0u8; zerosend_iscsi::BHS_LEN];
    ScsiResponse {
        flags,
        status,
        data_len,
        itt,
        statsn,
        expcmdsn,
        maxcmdsn,
        expdatasn,
        residual,
    }
    .encode(&mut h);
    PyBytes::new(py, &h)
}

/// The deliberate fault this mutants build has on (`ZEROSEND_MUTANT`), for the target's faults
/// that live in Python (`zerosend.iscsi._accel.fault_on`); absent from release builds.
#[cfg(feature = "mutants")]
#[pyfunction]
fn _mutant() -> Option<&'static str> {
    zerosend::mutant::chosen()
}

/// The name the target imports these pieces by.
const MODULE: &str = "zerosend.iscsi._native";

/// Builds `zerosend.iscsi._native` and puts it in `sys.modules`, so that the target's
/// `from . import _native` finds it once the core's extension is loaded; `zerosend._native`
/// itself gains nothing. The target also runs without it (the pure-Python install), through
/// `zerosend.iscsi._accel`.
pub fn register(core: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = core.py();
    let m = PyModule::new(py, MODULE)?;
    m.add_class::<IscsiReadPath>()?;
    m.add_function(wrap_pyfunction!(crc32c, &m)?)?;
    m.add_function(wrap_pyfunction!(_encode_data_in, &m)?)?;
    m.add_function(wrap_pyfunction!(_encode_scsi_response, &m)?)?;
    #[cfg(feature = "mutants")]
    m.add_function(wrap_pyfunction!(_mutant, &m)?)?;
    py.import("sys")?.getattr("modules")?.set_item(MODULE, m)?;
    Ok(())
}
