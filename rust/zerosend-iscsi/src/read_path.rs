//! The READ path's inner loop: a run of plain, in-order READ(10)/READ(16) commands, each read
//! from the medium straight into the transmit buffer behind the Data-In header (with status)
//! written in front of it, so a batch of reads becomes one contiguous region and one send.
//!
//! "Plain" means: a non-immediate SCSI Command for this LUN with the Read bit only, no AHS or
//! data segment, CmdSN equal to ExpCmdSN, no RDPROTECT, a transfer length equal to the
//! Expected Data Transfer Length, inside the LUN, not empty and at most `max_len` bytes (one
//! Data-In PDU). The run stops at the first command that is not plain, at one past MaxCmdSN (the
//! window is the caller's: the run never raises MaxCmdSN, as every command it answers is still
//! unsent when it ends), at one that does not fit in the buffer (`ReadRun::need` then says how
//! much room it wants), at a read that fails, comes up short or would wait for the disk
//! (`FdMedium` reads only what the page cache holds), and right after a read of `zc_min` bytes or
//! more (worth a zero-copy send of its own). Whatever stops the run is left to the caller's general path, which answers every
//! case this loop does not take, errors included.
//!
//! A read of `refer_min` bytes or more is not read at all: its header is written and the run
//! ends with `ReadRun::send_from`/`send_len`, for a caller that sends those bytes of the medium
//! straight from its own mapping of it (zero-copy from the page cache).

use std::os::fd::RawFd;

use crate::bhs::{
    ReadCdb, ScsiCommand, BHS_LEN, CMD_READ, CMD_WRITE, DATAIN_STATUS, F_FINAL, OP_SCSI_CMD,
};
use crate::encode::DataIn;
use crate::serial::sn_lt;

/// Where a LUN's blocks are read from.
pub trait Medium {
    /// Fills `buf` from byte `offset`; `Ok(false)` if the medium ends first.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<bool>;
}

impl Medium for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<bool> {
        let Some(src) = usize::try_from(offset)
            .ok()
            .and_then(|at| self.get(at..at.checked_add(buf.len())?))
        else {
            return Ok(false);
        };
        buf.copy_from_slice(src);
        Ok(true)
    }
}

impl Medium for Vec<u8> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<bool> {
        self.as_slice().read_exact_at(buf, offset)
    }
}

/// An open file or block device, read with `preadv2(RWF_NOWAIT)`: only what the page cache
/// already holds, so the loop never waits for a disk (a read that would block fails with
/// `EAGAIN`, and the caller reads it where waiting is harmless). The descriptor is borrowed: its
/// owner keeps it open for as long as the path is used.
#[derive(Debug, Clone, Copy)]
pub struct FdMedium(pub RawFd);

impl Medium for FdMedium {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<bool> {
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let at = libc::off_t::try_from(offset + done as u64)
                .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
            let iov = libc::iovec {
                iov_base: rest.as_mut_ptr().cast(),
                iov_len: rest.len(),
            };
            // The system call itself, not libc's wrapper: glibc gained preadv2 in 2.26, after
            // the oldest glibc the wheels support. On 64-bit targets the offset is one
            // register (pos_l); pos_h is ignored.
            let (count, high): (libc::c_long, libc::c_long) = (1, 0);
            // SAFETY: `iov` points at `rest`, a live, exclusively borrowed slice, so the kernel
            // writes at most `rest.len()` bytes into memory we own for the duration of the call.
            let got = unsafe {
                libc::syscall(
                    libc::SYS_preadv2,
                    libc::c_long::from(self.0),
                    &iov as *const libc::iovec,
                    count,
                    libc::c_long::from(at),
                    high,
                    libc::c_long::from(libc::RWF_NOWAIT),
                )
            };
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
}

/// The connection's sequence numbers the run reads and moves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeqNumbers {
    pub expcmdsn: u32,
    pub statsn: u32,
    pub maxcmdsn: u32,
}

/// What one run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadRun {
    /// Bytes of the receive buffer consumed (48 per command served).
    pub consumed: usize,
    /// The transmit buffer's fill position after the run.
    pub pos: usize,
    pub sn: SeqNumbers,
    pub commands: u32,
    /// Data bytes read.
    pub bytes: u64,
    /// The last command served read `zc_min` bytes or more.
    pub large: bool,
    /// Room (header and data) the next command wants if the run stopped for lack of it, else 0.
    pub need: usize,
    /// With `send_len` > 0: the last command's data was not read; the caller sends `send_len`
    /// bytes of the medium from byte `send_from`, right after the header.
    pub send_from: u64,
    pub send_len: u32,
}

/// What the reads of one LUN may be on one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimits {
    /// The longest read one Data-In PDU may carry (capped at the 24-bit DataSegmentLength).
    pub max_len: u32,
    /// Reads this long end the run: they are worth a zero-copy send of their own.
    pub zc_min: u32,
    /// Reads this long are left for the caller to send from its own mapping (`u32::MAX`: none).
    pub refer_min: u32,
}

/// One LUN's READ path on one connection.
#[derive(Debug, Clone)]
pub struct ReadPath<M> {
    medium: M,
    lun: [u8; 8],
    block_size: u64,
    blocks: u64,
    limits: ReadLimits,
}

/// Why a `ReadPath` cannot be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidReadPath(pub &'static str);

impl std::fmt::Display for InvalidReadPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for InvalidReadPath {}

impl<M: Medium> ReadPath<M> {
    /// `lun`: the 8-byte LUN field commands must carry; `blocks` of `block_size` bytes.
    pub fn new(
        medium: M,
        lun: [u8; 8],
        block_size: u32,
        blocks: u64,
        limits: ReadLimits,
    ) -> Result<Self, InvalidReadPath> {
        if block_size == 0 {
            return Err(InvalidReadPath("block_size must be positive"));
        }
        let max_len = limits.max_len.min(0xFF_FFFF);
        Ok(Self {
            medium,
            lun,
            block_size: u64::from(block_size),
            blocks,
            limits: ReadLimits { max_len, ..limits },
        })
    }

    /// Serves the commands at the start of `rx` into `out[pos..]` while they are plain (see
    /// the module documentation).
    pub fn serve(&self, rx: &[u8], out: &mut [u8], pos: usize, sn: SeqNumbers) -> ReadRun {
        self.serve_unless(rx, out, pos, sn, |_| false)
    }

    /// `serve`, stopping also at a command whose ITT `busy` says belongs to a task in progress
    /// (RFC 7143 11.17.1: the general path rejects it, and that task carries on).
    pub fn serve_unless(
        &self,
        rx: &[u8],
        out: &mut [u8],
        pos: usize,
        mut sn: SeqNumbers,
        busy: impl Fn(u32) -> bool,
    ) -> ReadRun {
        let mut run = ReadRun {
            pos,
            sn,
            ..ReadRun::default()
        };
        let mut at = 0;
        while rx.len() - at >= BHS_LEN && !sn_lt(sn.maxcmdsn, sn.expcmdsn) {
            let Some((itt, lba, n)) = self.plain(&rx[at..at + BHS_LEN], sn.expcmdsn) else {
                break;
            };
            if busy(itt) {
                break;
            }
            let refer = n >= u64::from(self.limits.refer_min);
            let len = if refer { 0 } else { n as usize }; // at most 2^24 - 1
            let pos = run.pos;
            if out.len().saturating_sub(pos) < BHS_LEN + len {
                run.need = BHS_LEN + len;
                break;
            }
            let (hdr, data) = out[pos..pos + BHS_LEN + len].split_at_mut(BHS_LEN);
            let offset = lba * self.block_size;
            if !refer && !self.medium.read_exact_at(data, offset).unwrap_or(false) {
                break;
            }
            let statsn = sn.statsn;
            sn.statsn = statsn.wrapping_add(1);
            sn.expcmdsn = sn.expcmdsn.wrapping_add(1);
            let header = DataIn {
                flags: F_FINAL | DATAIN_STATUS,
                data_len: n as u32,
                lun: self.lun,
                itt,
                statsn,
                expcmdsn: sn.expcmdsn,
                maxcmdsn: sn.maxcmdsn,
                ..DataIn::default()
            };
            header.encode(hdr.try_into().expect("a 48-byte header"));
            at += BHS_LEN;
            run.consumed = at;
            run.pos = pos + BHS_LEN + len;
            run.sn = sn;
            run.commands += 1;
            run.bytes += n;
            if refer {
                (run.send_from, run.send_len) = (offset, n as u32);
            }
            run.large = n >= u64::from(self.limits.zc_min);
            if refer || run.large {
                break;
            }
        }
        run
    }

    /// (ITT, LBA, bytes) if `bhs` is a plain READ this path serves now.
    fn plain(&self, bhs: &[u8], expcmdsn: u32) -> Option<(u32, u64, u64)> {
        let cmd = ScsiCommand::parse(bhs)?;
        if cmd.opcode_byte != OP_SCSI_CMD || cmd.flags & (CMD_READ | CMD_WRITE) != CMD_READ {
            return None;
        }
        if cmd.ahs_len != 0 || cmd.data_len != 0 || cmd.lun != &self.lun || cmd.cmdsn != expcmdsn {
            return None;
        }
        let read = ReadCdb::parse(cmd.cdb)?;
        if read.flags & 0xE0 != 0 {
            return None;
        }
        let n = read.blocks.checked_mul(self.block_size)?;
        let inside = read
            .lba
            .checked_add(read.blocks)
            .is_some_and(|end| end <= self.blocks);
        if n == 0 || n != u64::from(cmd.edtl) || !inside || n > u64::from(self.limits.max_len) {
            return None;
        }
        Some((cmd.itt, read.lba, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bhs::tests::{command, read10, read16};

    const BS: u32 = 512;

    fn image(blocks: usize) -> Vec<u8> {
        (0..blocks * BS as usize)
            .map(|i| (i / 3 % 251) as u8)
            .collect()
    }

    fn limits(max_len: u32) -> ReadLimits {
        ReadLimits {
            max_len,
            zc_min: 10240,
            refer_min: u32::MAX,
        }
    }

    fn path(medium: Vec<u8>, max_len: u32) -> ReadPath<Vec<u8>> {
        let blocks = (medium.len() / BS as usize) as u64;
        ReadPath::new(medium, [0; 8], BS, blocks, limits(max_len)).unwrap()
    }

    fn sn(expcmdsn: u32, statsn: u32, maxcmdsn: u32) -> SeqNumbers {
        SeqNumbers {
            expcmdsn,
            statsn,
            maxcmdsn,
        }
    }

    #[test]
    fn serves_a_run_of_reads_with_headers_in_front_of_their_data() {
        let img = image(64);
        let p = path(img.clone(), 8192);
        let mut rx = Vec::new();
        rx.extend_from_slice(&command(0xC1, 0, 10, 1024, 5, &read10(3, 2)));
        rx.extend_from_slice(&command(0xC1, 0, 11, 512, 6, &read16(60, 1)));
        let mut out = vec![0u8; 4096];
        let run = p.serve(&rx, &mut out, 100, sn(5, 40, 132));
        assert_eq!(run.commands, 2);
        assert_eq!(run.consumed, 96);
        assert_eq!(run.bytes, 1536);
        assert_eq!(run.pos, 100 + 48 + 1024 + 48 + 512);
        assert_eq!(run.sn, sn(7, 42, 132));
        assert!(!run.large && run.need == 0);
        let mut want = [0u8; 48];
        DataIn {
            flags: 0x81,
            data_len: 1024,
            itt: 10,
            statsn: 40,
            expcmdsn: 6,
            maxcmdsn: 132,
            ..DataIn::default()
        }
        .encode(&mut want);
        assert_eq!(&out[100..148], &want);
        assert_eq!(&out[148..1172], &img[3 * 512..5 * 512]);
        assert_eq!(out[1172], 0x25);
        assert_eq!(&out[1172 + 24..1172 + 28], &41u32.to_be_bytes());
        assert_eq!(&out[1220..1732], &img[60 * 512..61 * 512]);
    }

    #[test]
    fn stops_at_the_first_command_that_is_not_plain() {
        let p = path(image(64), 8192);
        let good = command(0xC1, 0, 1, 512, 1, &read10(0, 1));
        let cases: Vec<(&str, [u8; 48])> = vec![
            ("immediate", {
                let mut b = good;
                b[0] |= 0x40;
                b
            }),
            ("write bit", command(0xE1, 0, 1, 512, 1, &read10(0, 1))),
            ("other LUN", command(0xC1, 1, 1, 512, 1, &read10(0, 1))),
            ("CmdSN ahead", command(0xC1, 0, 1, 512, 2, &read10(0, 1))),
            ("residual", command(0xC1, 0, 1, 1024, 1, &read10(0, 1))),
            ("past the end", command(0xC1, 0, 1, 1024, 1, &read10(63, 2))),
            ("empty", command(0xC1, 0, 1, 0, 1, &read10(0, 0))),
            ("too long", command(0xC1, 0, 1, 16384, 1, &read10(0, 32))),
            ("RDPROTECT", {
                let mut b = good;
                b[33] = 0x20;
                b
            }),
            ("READ(12)", {
                let mut b = good;
                b[32] = 0xA8;
                b
            }),
            ("data segment", {
                let mut b = good;
                b[7] = 4;
                b
            }),
        ];
        for (what, bhs) in cases {
            let mut out = vec![0u8; 4096];
            let run = p.serve(&bhs, &mut out, 0, sn(1, 1, 128));
            assert_eq!(run.commands, 0, "{what}");
            assert_eq!(
                (run.consumed, run.pos, run.sn),
                (0, 0, sn(1, 1, 128)),
                "{what}"
            );
            assert!(out.iter().all(|&b| b == 0), "{what} wrote to the buffer");
        }
        let run = p.serve(&good, &mut [0u8; 4096], 0, sn(1, 1, 128));
        assert_eq!(run.commands, 1);
    }

    #[test]
    fn asks_for_room_when_the_buffer_is_full() {
        let p = path(image(64), 8192);
        let rx = command(0xC1, 0, 1, 2048, 9, &read10(0, 4));
        let run = p.serve(&rx, &mut [0u8; 2000], 0, sn(9, 0, 200));
        assert_eq!((run.commands, run.need, run.consumed), (0, 48 + 2048, 0));
        let run = p.serve(&rx, &mut [], 0, sn(9, 0, 200));
        assert_eq!(run.need, 48 + 2048);
    }

    #[test]
    fn a_large_read_ends_the_run() {
        let p = path(image(128), 65536);
        let mut rx = Vec::new();
        rx.extend_from_slice(&command(0xC1, 0, 1, 512, 1, &read10(0, 1)));
        rx.extend_from_slice(&command(0xC1, 0, 2, 10240, 2, &read10(1, 20)));
        rx.extend_from_slice(&command(0xC1, 0, 3, 512, 3, &read10(0, 1)));
        let mut out = vec![0u8; 65536];
        let run = p.serve(&rx, &mut out, 0, sn(1, 0, 128));
        assert_eq!(
            (run.commands, run.consumed, run.bytes),
            (2, 96, 512 + 10240)
        );
        assert!(run.large);
    }

    #[test]
    fn a_read_past_refer_min_is_left_to_the_caller() {
        let lim = ReadLimits {
            refer_min: 10240,
            ..limits(65536)
        };
        let p = ReadPath::new(image(128), [0; 8], BS, 128, lim).unwrap();
        let mut rx = Vec::new();
        rx.extend_from_slice(&command(0xC1, 0, 1, 512, 1, &read10(0, 1)));
        rx.extend_from_slice(&command(0xC1, 0, 2, 10240, 2, &read10(4, 20)));
        let mut out = vec![0u8; 1000];
        let run = p.serve(&rx, &mut out, 0, sn(1, 0, 128));
        // the small one read, the large one only its header: 48 + 512 + 48 bytes of room
        assert_eq!(
            (run.commands, run.pos, run.bytes),
            (2, 48 + 512 + 48, 512 + 10240)
        );
        assert_eq!((run.send_from, run.send_len), (4 * 512, 10240));
        assert!(run.large);
        assert_eq!(&out[560..564], &[0x25, 0x81, 0, 0]);
        assert_eq!(&out[564..568], &10240u32.to_be_bytes());
        // a full buffer asks for header room only
        let run = p.serve(&rx[48..], &mut out, 980, sn(2, 1, 129));
        assert_eq!((run.commands, run.need), (0, 48));
    }

    #[test]
    fn a_short_medium_stops_the_run_without_answering() {
        // The LUN claims 64 blocks but the medium has 8: the read past 8 is left to the caller.
        let p = ReadPath::new(image(8), [0; 8], BS, 64, limits(8192)).unwrap();
        let rx = command(0xC1, 0, 1, 512, 1, &read10(20, 1));
        let run = p.serve(&rx, &mut [0u8; 1024], 0, sn(1, 0, 128));
        assert_eq!((run.commands, run.consumed, run.pos), (0, 0, 0));
    }

    #[test]
    fn the_run_stops_at_the_window_and_leaves_maxcmdsn_alone() {
        let p = path(image(8), 8192);
        let mut rx = Vec::new();
        for (itt, cmdsn) in [(1, 0xFFFF_FFFE), (2, 0xFFFF_FFFF), (3, 0)] {
            rx.extend_from_slice(&command(0xC1, 0, itt, 512, cmdsn, &read10(0, 1)));
        }
        // MaxCmdSN 0xFFFF_FFFF: two commands fit, across the serial wrap the third is outside.
        let sn0 = sn(0xFFFF_FFFE, 7, 0xFFFF_FFFF);
        let run = p.serve(&rx, &mut [0u8; 4096], 0, sn0);
        assert_eq!((run.commands, run.consumed), (2, 96));
        assert_eq!(run.sn, sn(0, 9, 0xFFFF_FFFF));
        // a closed window (MaxCmdSN = ExpCmdSN - 1) serves nothing
        let run = p.serve(&rx[96..], &mut [0u8; 4096], 0, run.sn);
        assert_eq!((run.commands, run.consumed), (0, 0));
    }

    #[test]
    fn reads_a_real_file_through_its_descriptor() {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let img = image(16);
        let name = format!("zerosend-iscsi-read-path-{}", std::process::id());
        let file_path = std::env::temp_dir().join(name);
        let mut file = std::fs::File::create(&file_path).unwrap();
        file.write_all(&img).unwrap();
        let file = std::fs::File::open(&file_path).unwrap();
        std::fs::remove_file(&file_path).unwrap();
        let p = ReadPath::new(FdMedium(file.as_raw_fd()), [0; 8], BS, 16, limits(8192)).unwrap();
        let rx = command(0xC1, 0, 1, 1024, 1, &read10(5, 2));
        let mut out = vec![0u8; 2048];
        let run = p.serve(&rx, &mut out, 0, sn(1, 0, 128));
        assert_eq!(run.commands, 1);
        assert_eq!(&out[48..48 + 1024], &img[5 * 512..7 * 512]);
    }

    #[test]
    fn stops_at_a_read_whose_itt_is_in_progress() {
        let p = path(image(8), 4096);
        let mut rx = command(0xC1, 0, 7, 512, 1, &read10(0, 1)).to_vec();
        rx.extend_from_slice(&command(0xC1, 0, 9, 512, 2, &read10(1, 1)));
        let run = p.serve_unless(&rx, &mut [0u8; 4096], 0, sn(1, 0, 128), |itt| itt == 9);
        assert_eq!((run.commands, run.consumed), (1, 48));
        let run = p.serve_unless(&rx, &mut [0u8; 4096], 0, sn(1, 0, 128), |itt| itt == 7);
        assert_eq!(run.commands, 0);
    }
}
