//! Helpers shared by the integration tests.
//!
//! A test that lacks a capability cannot be marked skipped at run time in libtest, so it says so
//! instead of passing silently: it writes a `SKIPPED` line with the reason straight to stderr
//! (libtest captures only the print macros), and fails if `ZEROSEND_REQUIRE` (the same
//! comma-separated capability names the Python tests read) names the capability.
#![allow(dead_code)] // each test file uses its own part of this module

use std::io::Write;
use std::net::{TcpListener, TcpStream};

use zerosend::{Backend, Capabilities, SocketOptions};

/// Whether `ZEROSEND_REQUIRE` names `capability`.
pub fn required(capability: &str) -> bool {
    std::env::var("ZEROSEND_REQUIRE")
        .unwrap_or_default()
        .split(',')
        .any(|name| name == capability)
}

/// True if the test may go on (`unavailable` is `None`). Otherwise reports the skip of `test`
/// and returns false, or panics if the capability is required.
pub fn available(test: &str, capability: &str, unavailable: Option<String>) -> bool {
    let Some(reason) = unavailable else {
        return true;
    };
    assert!(
        !required(capability),
        "{test}: {capability} unavailable: {reason} (ZEROSEND_REQUIRE names it)"
    );
    let _ = writeln!(
        std::io::stderr().lock(),
        "SKIPPED {test}: {capability} unavailable: {reason}"
    );
    false
}

/// Every backend this kernel offers, copy first; each one missing is reported (or, required,
/// fails the test).
pub fn backends(test: &str) -> Vec<Backend> {
    let caps = Capabilities::probe();
    let mut all = vec![Backend::Copy];
    if available(test, "msg_zerocopy", caps.msg_zerocopy.err()) {
        all.push(Backend::MsgZerocopy);
    }
    if available(test, "io_uring", caps.io_uring_send_zc.err()) {
        all.push(Backend::IoUring);
    }
    all
}

/// A connected loopback TCP pair: the client non-blocking (for the driver), the server as is.
pub fn connected() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    client.set_nonblocking(true).unwrap();
    (client, server)
}

/// Options for a socket on the copy backend (every kernel has it).
pub fn copy_options() -> SocketOptions {
    SocketOptions {
        backend: Some(Backend::Copy),
        ..SocketOptions::default()
    }
}
