//! The iSCSI target's READ fast path: a run of in-order READ(10)/READ(16) commands served in one
//! call, each answered by one Data-In PDU with status packed in front of its data.
//!
//! The Python target (`zerosend.iscsi`) calls this with its receive buffer and the pooled
//! transmit buffer it is filling. Anything that is not the plain case (another opcode or LUN,
//! digests, a CmdSN out of order, a residual, an error, no room left) stops the run and is left
//! to the Python code, which also owns every protocol decision this mirrors.

use std::os::fd::RawFd;

use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

const BHS_LEN: usize = 48;
const OP_SCSI_CMD: u8 = 0x01;
const OP_DATA_IN: u8 = 0x25;
const CMD_READ: u8 = 0x40;
const CMD_WRITE: u8 = 0x20;
const DATAIN_FINAL_STATUS: u8 = 0x81;
const READ10: u8 = 0x28;
const READ16: u8 = 0x88;
const NO_TAG: u32 = 0xFFFF_FFFF;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

/// RFC 1982 serial number arithmetic on 32-bit sequence numbers: a < b.
fn sn_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < (1 << 31)
}

/// A held, C-contiguous buffer export and the bytes it spans.
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
}

/// One LUN's READ fast path on one connection (see the module documentation).
#[pyclass(frozen, module = "zerosend._native")]
pub struct IscsiReadPath {
    fd: RawFd,
    lun: [u8; 8],
    block_size: u64,
    blocks: u64,
    max_len: u64,
    window: u32,
}

#[pymethods]
impl IscsiReadPath {
    /// `fd`: the image, read with pread; `lun`: the 8-byte LUN field commands must carry;
    /// `blocks` of `block_size` bytes; `max_len`: the longest read one Data-In PDU may carry;
    /// `window`: the CmdSN window (MaxCmdSN = ExpCmdSN + window - 1).
    #[new]
    fn new(
        fd: RawFd,
        lun: &[u8],
        block_size: u32,
        blocks: u64,
        max_len: u32,
        window: u32,
    ) -> PyResult<Self> {
        let lun: [u8; 8] = lun
            .try_into()
            .map_err(|_| PyValueError::new_err("lun must be the 8-byte LUN field"))?;
        if fd < 0 || block_size == 0 || window == 0 {
            return Err(PyValueError::new_err(
                "fd, block_size and window must be positive",
            ));
        }
        Ok(Self {
            fd,
            lun,
            block_size: u64::from(block_size),
            blocks,
            max_len: u64::from(max_len.min(0xFF_FFFF)), // a 24-bit DataSegmentLength
            window,
        })
    }

    /// Serves the commands at `rx[start:end]` into `out[pos:]` while they qualify.
    ///
    /// `sn` is (ExpCmdSN, StatSN, MaxCmdSN). Returns (start, pos, ExpCmdSN, StatSN, MaxCmdSN,
    /// commands, bytes read) after the run; nothing is consumed when the first PDU does not
    /// qualify.
    fn serve(
        &self,
        rx: &Bound<'_, PyAny>,
        start: usize,
        end: usize,
        out: &Bound<'_, PyAny>,
        pos: usize,
        sn: (u32, u32, u32),
    ) -> PyResult<(usize, usize, u32, u32, u32, u32, u64)> {
        let rx_export = Export::get(rx, "rx", false)?;
        let out_export = Export::get(out, "out", true)?;
        let (rx_lo, rx_hi) = rx_export.range();
        let (out_lo, out_hi) = out_export.range();
        if rx_lo < out_hi && out_lo < rx_hi {
            return Err(PyValueError::new_err("rx and out must not overlap"));
        }
        let rx_len = rx_hi - rx_lo;
        let out_len = out_hi - out_lo;
        if start > end || end > rx_len || pos > out_len {
            return Err(PyValueError::new_err("start/end/pos out of range"));
        }
        // SAFETY: both exports are held until this function returns, so each pointer and
        // length describe valid memory that the exporter keeps in place (a bytearray refuses to
        // resize, an mmap to close, while exported). The two ranges were just checked to be
        // disjoint, so the shared and the mutable slice never alias. We hold the GIL and run no
        // Python code below, so no Python code writes either buffer meanwhile. Zero-length
        // exports may carry a dangling pointer, so they become empty slices instead.
        let (rx_bytes, out_bytes): (&[u8], &mut [u8]) = unsafe {
            (
                if rx_len == 0 {
                    &[]
                } else {
                    std::slice::from_raw_parts(rx_lo as *const u8, rx_len)
                },
                if out_len == 0 {
                    &mut []
                } else {
                    std::slice::from_raw_parts_mut(out_lo as *mut u8, out_len)
                },
            )
        };
        let (mut expcmdsn, mut statsn, mut maxcmdsn) = sn;
        let (mut at, mut pos) = (start, pos);
        let (mut commands, mut total) = (0u32, 0u64);
        while end - at >= BHS_LEN {
            let bhs = &rx_bytes[at..at + BHS_LEN];
            let Some(n) = self.qualifies(bhs, expcmdsn) else {
                break;
            };
            let n_usize = n as usize;
            if out_len - pos < BHS_LEN + n_usize {
                break;
            }
            let (lba, _) = read_cdb(&bhs[32..]);
            let data = &mut out_bytes[pos + BHS_LEN..pos + BHS_LEN + n_usize];
            // A short read (the image shrank) or an error stops the run: the Python path
            // retries this command and answers with zeros or a sense code.
            if !pread_exact(self.fd, data, lba * self.block_size).unwrap_or(false) {
                break;
            }
            expcmdsn = expcmdsn.wrapping_add(1);
            let want = expcmdsn.wrapping_add(self.window - 1);
            if sn_lt(maxcmdsn, want) {
                maxcmdsn = want;
            }
            let hdr = &mut out_bytes[pos..pos + BHS_LEN];
            hdr.fill(0);
            hdr[0] = OP_DATA_IN;
            hdr[1] = DATAIN_FINAL_STATUS;
            hdr[4..8].copy_from_slice(&(n as u32).to_be_bytes()); // AHS 0, 24-bit DSL
            hdr[8..16].copy_from_slice(&self.lun);
            hdr[16..20].copy_from_slice(&bhs[16..20]); // ITT
            hdr[20..24].copy_from_slice(&NO_TAG.to_be_bytes());
            hdr[24..28].copy_from_slice(&statsn.to_be_bytes());
            hdr[28..32].copy_from_slice(&expcmdsn.to_be_bytes());
            hdr[32..36].copy_from_slice(&maxcmdsn.to_be_bytes());
            // DataSN, buffer offset and residual stay 0
            statsn = statsn.wrapping_add(1);
            at += BHS_LEN;
            pos += BHS_LEN + n_usize;
            commands += 1;
            total += n;
        }
        Ok((at, pos, expcmdsn, statsn, maxcmdsn, commands, total))
    }
}

impl IscsiReadPath {
    /// The transfer length in bytes if `bhs` is a plain in-order READ this path serves.
    fn qualifies(&self, bhs: &[u8], expcmdsn: u32) -> Option<u64> {
        if bhs[0] != OP_SCSI_CMD || bhs[1] & (CMD_READ | CMD_WRITE) != CMD_READ {
            return None;
        }
        if bhs[4..8] != [0, 0, 0, 0] || bhs[8..16] != self.lun || be32(bhs, 24) != expcmdsn {
            return None;
        }
        let cdb = &bhs[32..];
        if !matches!(cdb[0], READ10 | READ16) || cdb[1] & 0xE0 != 0 {
            return None;
        }
        let (lba, count) = read_cdb(cdb);
        let n = count.checked_mul(self.block_size)?;
        let in_range = lba.checked_add(count).is_some_and(|e| e <= self.blocks);
        if n == 0 || n != u64::from(be32(bhs, 20)) || !in_range || n > self.max_len {
            return None;
        }
        Some(n)
    }
}

/// (LBA, blocks) of a READ(10) or READ(16) CDB.
fn read_cdb(cdb: &[u8]) -> (u64, u64) {
    if cdb[0] == READ10 {
        (u64::from(be32(cdb, 2)), u64::from(be16(cdb, 7)))
    } else {
        (be64(cdb, 2), u64::from(be32(cdb, 10)))
    }
}

/// Fills `buf` from `fd` at `offset`; Ok(false) if the file ends first.
fn pread_exact(fd: RawFd, buf: &mut [u8], offset: u64) -> std::io::Result<bool> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        let at = libc::off_t::try_from(offset + done as u64)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: `rest` is a live, exclusively borrowed slice, so the kernel writes at most
        // `rest.len()` bytes into memory we own for the duration of the call.
        let got = unsafe { libc::pread(fd, rest.as_mut_ptr().cast(), rest.len(), at) };
        if got < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if got == 0 {
            return Ok(false);
        }
        done += got as usize;
    }
    Ok(true)
}
