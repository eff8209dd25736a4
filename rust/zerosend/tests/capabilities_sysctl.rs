//! With io_uring switched off by `kernel.io_uring_disabled`, the probe says so and names the
//! sysctl (the reason a user reads in `python -m zerosend`). The sysctl is global: the original
//! value is kept in the same marker file the Python suite uses, so a killed run is repaired at
//! the next test session, and it is put back when the test ends.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use zerosend::Capabilities;

const SYSCTL: &str = "/proc/sys/kernel/io_uring_disabled";

/// Sets the sysctl for the guard's life.
struct Disabled {
    original: String,
    marker: PathBuf,
}

impl Disabled {
    fn set(value: &str) -> Option<Self> {
        let path = Path::new(SYSCTL);
        let reason = if !path.exists() {
            Some("this kernel has no kernel.io_uring_disabled sysctl (Linux 6.6+)".to_string())
        } else if fs::write(path, fs::read_to_string(path).ok()?.trim()).is_err() {
            Some("changing kernel.io_uring_disabled needs root".to_string())
        } else {
            None
        };
        if !common::available("io_uring_disabled_is_named", "sysctl", reason) {
            return None;
        }
        let original = fs::read_to_string(path).unwrap().trim().to_string();
        let markers = std::env::temp_dir().join("zerosend-test-sysctls");
        fs::create_dir_all(&markers).unwrap();
        let marker = markers.join("kernel.io_uring_disabled");
        fs::write(&marker, &original).unwrap();
        fs::write(path, value).unwrap();
        Some(Self { original, marker })
    }
}

impl Drop for Disabled {
    fn drop(&mut self) {
        let _ = fs::write(SYSCTL, &self.original);
        let _ = fs::remove_file(&self.marker);
    }
}

#[test]
fn io_uring_disabled_is_named() {
    let before = Capabilities::probe().io_uring_send_zc;
    let Some(disabled) = Disabled::set("2") else {
        return;
    };
    let caps = Capabilities::probe();
    drop(disabled);
    let reason = caps
        .io_uring_send_zc
        .expect_err("io_uring is off, the probe must say so");
    assert!(
        reason.contains("kernel.io_uring_disabled=2"),
        "the reason names the sysctl: {reason}"
    );
    // The sysctl is back: the probe says what it said before.
    assert_eq!(Capabilities::probe().io_uring_send_zc, before);
}
