//! Handles kept past what they named: a socket handle whose slot now holds another socket, and a
//! pending send whose slot now holds another send, must name nothing (an error, or the token
//! handed back), never the newer socket or send.

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd};

mod common;

use common::{connected, copy_options};
use zerosend::{Completion, Driver, Error, Submitted};

#[test]
fn a_stale_socket_handle_names_nothing_after_its_slot_is_reused() {
    let mut driver: Driver<u32, Vec<u8>> = Driver::new().unwrap();
    let (first, _first_peer) = connected();
    let old = driver.register(first.as_fd(), &copy_options()).unwrap();
    driver.close(old); // nothing in flight: the slot is free at once
    assert!(!driver.is_registered(old));

    let (second, mut second_peer) = connected();
    let new = driver.register(second.as_fd(), &copy_options()).unwrap();
    assert_ne!(old, new);
    assert_eq!(
        old.to_raw() as u32,
        new.to_raw() as u32,
        "the slot is reused"
    );

    assert!(!driver.is_registered(old));
    assert!(matches!(driver.backend(old), Err(Error::Closed)));
    assert!(matches!(driver.stats(old), Err(Error::Closed)));
    let rejected = driver
        .submit(old, vec![b"lost".to_vec()], false, 1)
        .expect_err("a stale handle must not send on the socket now in its slot");
    assert!(matches!(rejected.error, Error::Closed));
    assert_eq!((rejected.token, rejected.bufs), (1, vec![b"lost".to_vec()]));
    driver.close(old); // closing through a stale handle leaves the new socket alone
    assert!(driver.is_registered(new));

    match driver.submit_now(new, vec![b"kept".to_vec()], false, 2) {
        Ok(Submitted::Done { result, .. }) => assert_eq!(result.unwrap().nbytes, 4),
        other => panic!("the new socket's send did not go: {other:?}"),
    }
    assert_eq!(driver.stats(new).unwrap().sends, 1);
    driver.close(new);
    drop(second);
    let mut got = Vec::new();
    second_peer.read_to_end(&mut got).unwrap();
    assert_eq!(
        got, b"kept",
        "only the new socket's own send reached its peer"
    );
}

#[test]
fn a_stale_pending_send_cannot_take_the_token_of_the_send_now_in_its_slot() {
    let mut driver: Driver<u32, Vec<u8>> = Driver::new().unwrap();
    let (client, mut server) = connected();
    let id = driver.register(client.as_fd(), &copy_options()).unwrap();
    // Far more than the socket buffers take while nobody reads: it stays in flight.
    let big = vec![7u8; 16 << 20];
    let old = match driver.submit_now(id, vec![big], false, 1) {
        Ok(Submitted::InFlight(pending)) => pending,
        other => panic!("a 16 MiB copy finished inside the call: {other:?}"),
    };
    let reader = std::thread::spawn(move || {
        let mut chunk = vec![0u8; 1 << 20];
        while server.read(&mut chunk).unwrap_or(0) > 0 {}
    });
    let mut finished = Vec::new();
    for turn in 0.. {
        assert!(turn < 100_000, "the send never completed");
        driver.poll().unwrap();
        finished.extend(driver.take_completions().filter_map(|c| match c {
            Completion::Send { token, .. } => Some(token),
            Completion::Drained { .. } => None,
        }));
        if !finished.is_empty() {
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
    assert_eq!(finished, vec![1]);

    // The next send takes the finished one's slot; it must stay in flight so its token could be
    // replaced (it waits behind nothing, so make it wait for the peer: the reader is still on).
    let new = match driver.submit_now(id, vec![vec![8u8; 16 << 20]], false, 2) {
        Ok(Submitted::InFlight(pending)) => pending,
        Ok(Submitted::Done { .. }) => {
            // The kernel took it whole: nothing in flight to confuse; the stale handle still
            // must not find anything.
            assert_eq!(driver.set_token(old, 9), Err(9));
            driver.close(id);
            drop(client);
            reader.join().unwrap();
            return;
        }
        Err(rejected) => panic!("the second send was rejected: {:?}", rejected.error),
    };
    assert_ne!(old, new);
    assert_eq!(
        driver.set_token(old, 9),
        Err(9),
        "a stale pending send took over the token of the send now in its slot"
    );
    assert_eq!(driver.set_token(new, 3), Ok(2));
    driver.close(id);
    // The driver finishes the send once the peer read it all, then closes its duplicate.
    drop(client);
    for turn in 0.. {
        assert!(turn < 100_000, "the second send never completed");
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
    assert!(!driver.is_registered(id));
    reader.join().unwrap();
}
