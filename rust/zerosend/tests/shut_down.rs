//! `Driver::shut_down`, for whoever takes a driver over from an event loop that is gone: it
//! refuses while a send is unreleased (its buffer must outlive the kernel's use), and afterwards
//! every socket is closed and none can be registered.

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd};

mod common;

use common::{connected, copy_options};
use zerosend::{Driver, Error, Submitted};

#[test]
fn shut_down_waits_for_the_last_release_then_closes_every_socket() {
    let mut driver: Driver<u32, Vec<u8>> = Driver::new().unwrap();
    let (client, server) = connected();
    let id = driver.register(client.as_fd(), &copy_options()).unwrap();
    // Far more than the socket buffers take while nobody reads: it stays in flight.
    match driver.submit_now(id, vec![vec![5u8; 16 << 20]], false, 1) {
        Ok(Submitted::InFlight(_)) => {}
        other => panic!("a 16 MiB copy finished inside the call: {other:?}"),
    }
    assert_eq!(driver.inflight_total(), 1);
    assert!(!driver.shut_down(), "shut down with a send in flight");
    assert!(driver.is_registered(id));
    driver.rejoin_ring().unwrap(); // no ring apart: nothing to do, twice
    driver.rejoin_ring().unwrap();

    let mut server = server;
    let reader = std::thread::spawn(move || {
        let mut chunk = vec![0u8; 1 << 20];
        let mut total = 0;
        loop {
            match server.read(&mut chunk).unwrap_or(0) {
                0 => return total,
                n => total += n,
            }
        }
    });
    for turn in 0.. {
        assert!(turn < 100_000, "the send never completed");
        driver.poll().unwrap();
        if driver.take_completions().next().is_some() {
            break;
        }
        let mut pollfd = libc::pollfd {
            fd: driver.fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pollfd, 1, 1000) };
    }
    assert_eq!(driver.inflight_total(), 0);
    assert!(driver.shut_down());
    assert!(!driver.is_registered(id), "shut_down closes every socket");
    drop(client); // the driver's duplicate is gone too: the peer sees the end of the stream
    assert_eq!(reader.join().unwrap(), 16 << 20);
    let (again, _peer) = connected();
    assert!(matches!(
        driver.register(again.as_fd(), &copy_options()),
        Err(Error::Closed)
    ));
}
