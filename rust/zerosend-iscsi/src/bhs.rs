//! The Basic Header Segment (RFC 7143 11.2): the 48 bytes every PDU starts with, and the parts
//! of a SCSI Command header the READ path needs.

/// Length of a Basic Header Segment.
pub const BHS_LEN: usize = 48;
/// Opcode of a SCSI Command (initiator to target).
pub const OP_SCSI_CMD: u8 = 0x01;
/// Opcode of a SCSI Data-In (target to initiator).
pub const OP_DATA_IN: u8 = 0x25;
/// Opcode of a SCSI Response.
pub const OP_SCSI_RSP: u8 = 0x21;
/// The Final bit, in byte 1 of most PDUs.
pub const F_FINAL: u8 = 0x80;
/// SCSI Command flag: the command reads (expects Data-In).
pub const CMD_READ: u8 = 0x40;
/// SCSI Command flag: the command writes (sends Data-Out).
pub const CMD_WRITE: u8 = 0x20;
/// Data-In flag: this PDU carries the command's status.
pub const DATAIN_STATUS: u8 = 0x01;
/// The reserved tag value (no Target Transfer Tag).
pub const NO_TAG: u32 = 0xFFFF_FFFF;
/// SCSI operation codes of the READs the READ path serves.
pub const READ10: u8 = 0x28;
pub const READ16: u8 = 0x88;

pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

/// A SCSI Command header (RFC 7143 11.3), the fields a target reads before dispatching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScsiCommand<'a> {
    /// Byte 0 whole: the opcode with the Immediate bit (0x40).
    pub opcode_byte: u8,
    /// Byte 1: Final, Read, Write and the task attributes.
    pub flags: u8,
    /// TotalAHSLength in bytes.
    pub ahs_len: usize,
    /// DataSegmentLength.
    pub data_len: usize,
    /// The 8-byte LUN field, as sent.
    pub lun: &'a [u8; 8],
    pub itt: u32,
    /// Expected Data Transfer Length.
    pub edtl: u32,
    pub cmdsn: u32,
    pub exp_statsn: u32,
    /// The first 16 bytes of the CDB.
    pub cdb: &'a [u8; 16],
}

impl<'a> ScsiCommand<'a> {
    /// Parses `bhs` (at least 48 bytes) as a SCSI Command; `None` for any other opcode.
    pub fn parse(bhs: &'a [u8]) -> Option<Self> {
        let bhs: &[u8; BHS_LEN] = bhs.get(..BHS_LEN)?.try_into().ok()?;
        if bhs[0] & 0x3F != OP_SCSI_CMD {
            return None;
        }
        Some(Self {
            opcode_byte: bhs[0],
            flags: bhs[1],
            ahs_len: usize::from(bhs[4]) * 4,
            data_len: (usize::from(bhs[5]) << 16)
                | (usize::from(bhs[6]) << 8)
                | usize::from(bhs[7]),
            lun: bhs[8..16].try_into().ok()?,
            itt: be32(bhs, 16),
            edtl: be32(bhs, 20),
            cmdsn: be32(bhs, 24),
            exp_statsn: be32(bhs, 28),
            cdb: bhs[32..48].try_into().ok()?,
        })
    }

    pub fn immediate(&self) -> bool {
        self.opcode_byte & 0x40 != 0
    }
}

/// A READ(10) or READ(16) CDB decoded: the blocks it asks for and its byte-1 flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadCdb {
    pub lba: u64,
    pub blocks: u64,
    /// RDPROTECT (0xE0), DPO, FUA.
    pub flags: u8,
}

impl ReadCdb {
    /// `None` unless `cdb` is a READ(10) or READ(16).
    pub fn parse(cdb: &[u8; 16]) -> Option<Self> {
        match cdb[0] {
            READ10 => Some(Self {
                lba: u64::from(be32(cdb, 2)),
                blocks: u64::from(be16(cdb, 7)),
                flags: cdb[1],
            }),
            READ16 => Some(Self {
                lba: be64(cdb, 2),
                blocks: u64::from(be32(cdb, 10)),
                flags: cdb[1],
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A SCSI Command BHS as an initiator sends it.
    pub(crate) fn command(
        flags: u8,
        lun: u8,
        itt: u32,
        edtl: u32,
        cmdsn: u32,
        cdb: &[u8],
    ) -> [u8; 48] {
        let mut b = [0u8; 48];
        b[0] = OP_SCSI_CMD;
        b[1] = flags;
        b[9] = lun;
        b[16..20].copy_from_slice(&itt.to_be_bytes());
        b[20..24].copy_from_slice(&edtl.to_be_bytes());
        b[24..28].copy_from_slice(&cmdsn.to_be_bytes());
        b[28..32].copy_from_slice(&0x55u32.to_be_bytes());
        b[32..32 + cdb.len()].copy_from_slice(cdb);
        b
    }

    pub(crate) fn read10(lba: u32, blocks: u16) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[0] = READ10;
        c[2..6].copy_from_slice(&lba.to_be_bytes());
        c[7..9].copy_from_slice(&blocks.to_be_bytes());
        c
    }

    pub(crate) fn read16(lba: u64, blocks: u32) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = READ16;
        c[2..10].copy_from_slice(&lba.to_be_bytes());
        c[10..14].copy_from_slice(&blocks.to_be_bytes());
        c
    }

    #[test]
    fn parses_every_field_of_a_scsi_command() {
        let mut b = command(0xC1, 3, 0x1234_5678, 4096, 77, &read10(9, 8));
        b[0] |= 0x40;
        b[4] = 2;
        b[5..8].copy_from_slice(&[0x01, 0x02, 0x03]);
        let c = ScsiCommand::parse(&b).unwrap();
        assert!(c.immediate());
        assert_eq!(c.flags, 0xC1);
        assert_eq!(c.ahs_len, 8);
        assert_eq!(c.data_len, 0x01_0203);
        assert_eq!(c.lun, &[0, 3, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            (c.itt, c.edtl, c.cmdsn, c.exp_statsn),
            (0x1234_5678, 4096, 77, 0x55)
        );
        assert_eq!(c.cdb[0], READ10);
    }

    #[test]
    fn other_opcodes_and_short_input_are_not_commands() {
        let mut b = command(0x80, 0, 1, 0, 1, &[0]);
        b[0] = 0x05; // Data-Out
        assert_eq!(ScsiCommand::parse(&b), None);
        assert_eq!(ScsiCommand::parse(&b[..47]), None);
    }

    #[test]
    fn decodes_read10_and_read16() {
        let mut cdb = [0u8; 16];
        cdb[..10].copy_from_slice(&read10(0xDEAD_BEEF, 0xFFFF));
        cdb[1] = 0x08;
        assert_eq!(
            ReadCdb::parse(&cdb),
            Some(ReadCdb {
                lba: 0xDEAD_BEEF,
                blocks: 0xFFFF,
                flags: 0x08
            })
        );
        let cdb = read16(0x0102_0304_0506_0708, 0x0A0B_0C0D);
        assert_eq!(
            ReadCdb::parse(&cdb),
            Some(ReadCdb {
                lba: 0x0102_0304_0506_0708,
                blocks: 0x0A0B_0C0D,
                flags: 0
            })
        );
        let mut write = cdb;
        write[0] = 0x8A;
        assert_eq!(ReadCdb::parse(&write), None);
    }
}
