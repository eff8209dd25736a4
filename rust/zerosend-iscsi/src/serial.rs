//! Serial number arithmetic (RFC 1982) on iSCSI's 32-bit sequence numbers (RFC 7143 4.2.2.1).

/// `a < b` in serial number arithmetic: `b` lies less than half the number space after `a`.
pub fn sn_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < (1 << 31)
}

#[cfg(test)]
mod tests {
    use super::sn_lt;

    #[test]
    fn orders_plain_numbers() {
        assert!(sn_lt(1, 2));
        assert!(!sn_lt(2, 1));
        assert!(!sn_lt(7, 7));
    }

    #[test]
    fn orders_across_the_wrap() {
        assert!(sn_lt(0xFFFF_FFFF, 0));
        assert!(sn_lt(0xFFFF_FFF0, 5));
        assert!(!sn_lt(5, 0xFFFF_FFF0));
    }

    #[test]
    fn half_the_space_apart_is_not_less() {
        // RFC 1982 leaves a distance of exactly 2^31 undefined; we call it "not less" both ways.
        assert!(!sn_lt(0, 1 << 31));
        assert!(!sn_lt(1 << 31, 0));
        assert!(sn_lt(0, (1 << 31) - 1));
    }
}
