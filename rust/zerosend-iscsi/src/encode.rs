//! Encoders of the two PDUs that answer a SCSI command: Data-In (RFC 7143 11.7) and SCSI
//! Response (11.4). Each writes a whole 48-byte header, sequence numbers included.

use crate::bhs::{BHS_LEN, F_FINAL, NO_TAG, OP_DATA_IN, OP_SCSI_RSP};

fn put32(h: &mut [u8], at: usize, value: u32) {
    h[at..at + 4].copy_from_slice(&value.to_be_bytes());
}

/// The opcode, flags and 24-bit DataSegmentLength every header starts with (TotalAHSLength 0).
fn start(h: &mut [u8; BHS_LEN], opcode: u8, flags: u8, data_len: u32) {
    h.fill(0);
    h[0] = opcode;
    h[1] = flags;
    put32(h, 4, data_len & 0xFF_FFFF);
}

/// A Data-In header. `statsn` is sent only with the S bit (`DATAIN_STATUS` in `flags`); it is
/// reserved (zero) otherwise.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DataIn {
    pub flags: u8,
    pub status: u8,
    pub data_len: u32,
    pub lun: [u8; 8],
    pub itt: u32,
    pub statsn: u32,
    pub expcmdsn: u32,
    pub maxcmdsn: u32,
    pub datasn: u32,
    pub offset: u32,
    pub residual: u32,
}

impl DataIn {
    pub fn encode(&self, h: &mut [u8; BHS_LEN]) {
        start(h, OP_DATA_IN, self.flags, self.data_len);
        h[3] = self.status;
        h[8..16].copy_from_slice(&self.lun);
        put32(h, 16, self.itt);
        put32(h, 20, NO_TAG);
        let statsn = if self.flags & crate::bhs::DATAIN_STATUS != 0 {
            self.statsn
        } else {
            0
        };
        put32(h, 24, statsn);
        put32(h, 28, self.expcmdsn);
        put32(h, 32, self.maxcmdsn);
        put32(h, 36, self.datasn);
        put32(h, 40, self.offset);
        put32(h, 44, self.residual);
    }
}

/// A SCSI Response header for a command completed at the target (response 0); the Final bit
/// is always set, `flags` adds the residual bits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScsiResponse {
    pub flags: u8,
    pub status: u8,
    pub data_len: u32,
    pub itt: u32,
    pub statsn: u32,
    pub expcmdsn: u32,
    pub maxcmdsn: u32,
    pub expdatasn: u32,
    pub residual: u32,
}

impl ScsiResponse {
    pub fn encode(&self, h: &mut [u8; BHS_LEN]) {
        start(h, OP_SCSI_RSP, F_FINAL | self.flags, self.data_len);
        h[3] = self.status;
        put32(h, 16, self.itt);
        put32(h, 24, self.statsn);
        put32(h, 28, self.expcmdsn);
        put32(h, 32, self.maxcmdsn);
        put32(h, 36, self.expdatasn);
        put32(h, 44, self.residual);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_in_with_status_byte_by_byte() {
        let mut h = [0xAAu8; 48];
        DataIn {
            flags: 0x85,
            status: 0x02,
            data_len: 0x01_0203,
            lun: [0, 1, 0, 0, 0, 0, 0, 0],
            itt: 0x1111_2222,
            statsn: 7,
            expcmdsn: 8,
            maxcmdsn: 9,
            datasn: 10,
            offset: 0x4000,
            residual: 512,
        }
        .encode(&mut h);
        let want: [u8; 48] = [
            0x25, 0x85, 0, 0x02, 0, 0x01, 0x02, 0x03, // opcode, flags, status, AHS+DSL
            0, 1, 0, 0, 0, 0, 0, 0, // LUN
            0x11, 0x11, 0x22, 0x22, 0xFF, 0xFF, 0xFF, 0xFF, // ITT, TTT
            0, 0, 0, 7, 0, 0, 0, 8, 0, 0, 0, 9, // StatSN, ExpCmdSN, MaxCmdSN
            0, 0, 0, 10, 0, 0, 0x40, 0, 0, 0, 2, 0, // DataSN, offset, residual
        ];
        assert_eq!(h, want);
    }

    #[test]
    fn data_in_without_status_leaves_statsn_reserved() {
        let mut h = [0u8; 48];
        DataIn {
            flags: 0x80,
            statsn: 99,
            expcmdsn: 1,
            ..Default::default()
        }
        .encode(&mut h);
        assert_eq!(&h[24..28], &[0, 0, 0, 0]);
        assert_eq!(&h[28..32], &[0, 0, 0, 1]);
    }

    #[test]
    fn scsi_response_byte_by_byte() {
        let mut h = [0xAAu8; 48];
        ScsiResponse {
            flags: 0x02,
            status: 0x02,
            data_len: 20,
            itt: 0x0A0B_0C0D,
            statsn: 0xFFFF_FFFF,
            expcmdsn: 3,
            maxcmdsn: 130,
            expdatasn: 4,
            residual: 1024,
        }
        .encode(&mut h);
        let want: [u8; 48] = [
            0x21, 0x82, 0, 0x02, 0, 0, 0, 20, // opcode, F + underflow, response, status, DSL
            0, 0, 0, 0, 0, 0, 0, 0, // reserved
            0x0A, 0x0B, 0x0C, 0x0D, 0, 0, 0, 0, // ITT, SNACK tag
            0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 3, 0, 0, 0, 130, // StatSN, ExpCmdSN, MaxCmdSN
            0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 4, 0, // ExpDataSN, bidi residual, residual
        ];
        assert_eq!(h, want);
    }
}
