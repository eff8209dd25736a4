//! The iSCSI target's Rust pieces for `zerosend.iscsi`: thin wrappers over `zerosend-iscsi`.
//!
//! `IscsiReadPath.serve` runs the READ path's inner loop over the target's receive buffer into
//! the pooled transmit buffer it is filling; its static methods `encode_data_in` and
//! `encode_scsi_response` are the crate's encoders, exposed so the Python ones can be checked
//! against them byte for byte; `crc32c` is the crate's digest.

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

/// What one `IscsiReadPath.serve` call did.
#[pyclass(frozen, get_all, module = "zerosend._native")]
pub struct ReadRun {
    /// The receive buffer's new start (past the commands served).
    start: usize,
    /// The transmit buffer's new fill position.
    pos: usize,
    expcmdsn: u32,
    statsn: u32,
    maxcmdsn: u32,
    commands: u32,
    nbytes: u64,
    /// The last command read `zc_min` bytes or more: send the batch now, zero-copy.
    large: bool,
    /// Room the next command wants if the run stopped for lack of it, else 0.
    need: usize,
    /// With `send_len` > 0: the last command's data was not read; send that many bytes of the
    /// image from `send_from` after its header (from a mapping of the image).
    send_from: u64,
    send_len: u32,
}

#[pymethods]
impl ReadRun {
    fn __repr__(&self) -> String {
        format!(
            "ReadRun(start={}, pos={}, expcmdsn={}, statsn={}, maxcmdsn={}, commands={}, \
             nbytes={}, large={}, need={}, send_from={}, send_len={})",
            self.start,
            self.pos,
            self.expcmdsn,
            self.statsn,
            self.maxcmdsn,
            self.commands,
            self.nbytes,
            if self.large { "True" } else { "False" },
            self.need,
            self.send_from,
            self.send_len
        )
    }
}

/// One LUN's READ path on one connection: the inner loop of the target's READ path.
#[pyclass(frozen, module = "zerosend._native")]
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
    /// MaxCmdSN) before the run.
    fn serve(
        &self,
        rx: &Bound<'_, PyAny>,
        start: usize,
        end: usize,
        out: &Bound<'_, PyAny>,
        pos: usize,
        sn: (u32, u32, u32),
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
        let run = self
            .path
            .serve(&rx_bytes[start..end], out_bytes, pos, before);
        Ok(ReadRun {
            start: start + run.consumed,
            pos: run.pos,
            expcmdsn: run.sn.expcmdsn,
            statsn: run.sn.statsn,
            maxcmdsn: run.sn.maxcmdsn,
            commands: run.commands,
            nbytes: run.bytes,
            large: run.large,
            need: run.need,
            send_from: run.send_from,
            send_len: run.send_len,
        })
    }

    /// A whole Data-In header (48 bytes).
    #[staticmethod]
    #[allow(clippy::too_many_arguments)]
    fn encode_data_in<'py>(
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

    /// A whole SCSI Response header (48 bytes).
    #[staticmethod]
    #[allow(clippy::too_many_arguments)]
    fn encode_scsi_response<'py>(
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
}

/// CRC32C (Castagnoli) of a bytes-like object, continuing from `value` (0 to start).
#[pyfunction]
#[pyo3(signature = (data, value = 0))]
fn crc32c(data: &Bound<'_, PyAny>, value: u32) -> PyResult<u32> {
    let data = Export::get(data, "crc32c() data", false)?;
    Ok(zerosend_iscsi::digest::crc32c(value, data.bytes()))
}

/// Adds the iSCSI pieces to `zerosend._native`: `IscsiReadPath` (whose `serve` returns a
/// `ReadRun`, and whose static methods are the Rust encoders) and `crc32c`. The iSCSI target
/// also runs without them (the pure-Python install), so they stay behind these two names.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<IscsiReadPath>()?;
    m.add_function(wrap_pyfunction!(crc32c, m)?)?;
    Ok(())
}
