//! One driver, thousands of sockets with io_uring sends in flight: every send completes.
//!
//! Each io_uring send posts two completions, so this many sends outgrow the completion queue
//! several times over; the driver must hold sends back until it has room and never strand one.

use std::net::UdpSocket;
use std::os::fd::{AsFd, AsRawFd};

use nix::sys::resource::{getrlimit, setrlimit, Resource};
mod common;

use common::available;
use zerosend::{Backend, Capabilities, Completion, Driver, SocketOptions};

/// Sockets wrapped at once; each costs the test one descriptor (its own is closed once the
/// driver holds a duplicate).
const SOCKETS: usize = 10_000;
const SENDS_PER_SOCKET: usize = 3;

fn wait_readable(fd: i32) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let rc = unsafe { libc::poll(&mut pfd, 1, 60_000) };
    assert!(rc > 0, "no completion within a minute: a send is stranded");
}

#[test]
fn ten_thousand_sockets_with_io_uring_sends_in_flight_all_complete() {
    let test = "ten_thousand_sockets_with_io_uring_sends_in_flight_all_complete";
    if !available(
        test,
        "io_uring",
        Capabilities::probe().io_uring_send_zc.err(),
    ) {
        return; // reported as skipped
    }
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let needed = SOCKETS as u64 + 1024;
    // Root may raise the hard limit too; elsewhere the hard limit is what there is.
    let raised = setrlimit(Resource::RLIMIT_NOFILE, needed.max(soft), needed.max(hard));
    let unavailable = raised.err().map(|err| {
        format!("RLIMIT_NOFILE (hard limit {hard}) cannot be raised to {needed}: {err}")
    });
    if !available(test, "nofile", unavailable) {
        return; // reported as skipped
    }

    let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut driver: Driver<usize, Vec<u8>> = Driver::new().unwrap();
    let options = SocketOptions {
        backend: Some(Backend::IoUring),
        zerocopy_threshold: 0,
    };
    let mut ids = Vec::with_capacity(SOCKETS);
    for _ in 0..SOCKETS {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.connect(receiver.local_addr().unwrap()).unwrap();
        socket.set_nonblocking(true).unwrap();
        ids.push(driver.register(socket.as_fd(), &options).unwrap());
        // `socket` closes here; the driver's duplicate keeps it open.
    }
    let mut token = 0;
    for &id in &ids {
        for _ in 0..SENDS_PER_SOCKET {
            if driver
                .submit(id, vec![vec![7u8; 4096]], true, token)
                .is_err()
            {
                panic!("send {token} rejected");
            }
            token += 1;
        }
    }
    driver.flush().unwrap();

    let mut done = vec![false; token];
    let mut remaining = token;
    while remaining > 0 {
        if !driver.has_completions() {
            wait_readable(driver.fd().as_raw_fd());
            driver.poll().unwrap();
        }
        for completion in driver.take_completions() {
            if let Completion::Send { token, result, .. } = completion {
                assert_eq!(result.unwrap().nbytes, 4096);
                assert!(!done[token], "send {token} completed twice");
                done[token] = true;
                remaining -= 1;
            }
        }
    }
    for &id in &ids {
        assert_eq!(driver.inflight(id).unwrap(), 0);
        assert_eq!(driver.stats(id).unwrap().sends, SENDS_PER_SOCKET as u64);
    }
}
