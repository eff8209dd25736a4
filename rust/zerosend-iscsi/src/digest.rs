//! CRC32C (Castagnoli), the iSCSI header and data digest (RFC 7143 12.1), computed by the
//! `crc32c` crate (SSE 4.2 or ARMv8 CRC instructions where the CPU has them).

/// Continues the CRC32C `value` (0 to start) over `data`.
pub fn crc32c(value: u32, data: &[u8]) -> u32 {
    crc32c::crc32c_append(value, data)
}

#[cfg(test)]
mod tests {
    use super::crc32c;

    #[test]
    fn check_value() {
        assert_eq!(crc32c(0, b"123456789"), 0xe306_9283);
    }

    #[test]
    fn rfc3720_vectors() {
        // RFC 3720 B.4: 32 bytes of zeros, of 0xff, ascending and descending bytes.
        assert_eq!(crc32c(0, &[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(0, &[0xffu8; 32]), 0x62a8_ab43);
        let ascending: Vec<u8> = (0u8..32).collect();
        assert_eq!(crc32c(0, &ascending), 0x46dd_794e);
        let descending: Vec<u8> = (0u8..32).rev().collect();
        assert_eq!(crc32c(0, &descending), 0x113f_db5c);
    }

    #[test]
    fn continues_across_pieces() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let whole = crc32c(0, &data);
        assert_eq!(crc32c(crc32c(0, &data[..333]), &data[333..]), whole);
    }
}
