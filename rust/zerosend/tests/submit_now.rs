//! `Driver::submit_now` over a real loopback TCP connection: a copy the kernel takes whole comes
//! back done (and queues no completion), a send that must wait stays in flight under the token
//! given with `set_token`; and a ring watched apart (`ring_fd_apart`, `poll_ring`) still
//! completes every send.

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, RawFd};

mod common;

use common::{available, backends, connected};
use zerosend::{Backend, Capabilities, Completion, Driver, SocketOptions, Submitted};

fn wait_readable(fd: RawFd) {
    let mut pollfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pollfd, 1, 1000) };
}

#[test]
fn a_copy_taken_whole_is_done_at_once_and_one_that_waits_keeps_its_new_token() {
    for backend in
        backends("a_copy_taken_whole_is_done_at_once_and_one_that_waits_keeps_its_new_token")
    {
        let (client, mut server) = connected();
        let mut driver: Driver<u32, Vec<u8>> = Driver::new().unwrap();
        let options = SocketOptions {
            backend: Some(backend),
            ..SocketOptions::default()
        };
        let id = driver.register(client.as_fd(), &options).unwrap();
        match driver.submit_now(id, vec![b"small".to_vec()], true, 1) {
            Ok(Submitted::Done { token, result, .. }) => {
                assert_eq!(token, 1);
                assert_eq!(result.unwrap().nbytes, 5);
            }
            other => panic!("{backend:?}: a small copy was not done at once: {other:?}"),
        }
        assert!(
            !driver.has_completions(),
            "{backend:?}: a done send also queued a completion"
        );
        assert_eq!(driver.stats(id).unwrap().sends, 1);
        // Far more than the socket buffer takes while nobody reads: it has to wait.
        let big = vec![7u8; 32 << 20];
        let pending = match driver.submit_now(id, vec![big], false, 2) {
            Ok(Submitted::InFlight(pending)) => pending,
            other => panic!("{backend:?}: a 32 MiB copy finished inside the call: {other:?}"),
        };
        assert_eq!(driver.set_token(pending, 3), Ok(2));
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            server.read_to_end(&mut all).unwrap();
            all.len()
        });
        let mut tokens = Vec::new();
        for turn in 0.. {
            if !tokens.is_empty() {
                break;
            }
            assert!(
                turn < 10_000,
                "{backend:?}: the waiting send never completed"
            );
            driver.flush().unwrap();
            wait_readable(driver.fd().as_raw_fd());
            driver.poll().unwrap();
            for completion in driver.take_completions() {
                if let Completion::Send { token, result, .. } = completion {
                    assert_eq!(result.unwrap().nbytes, 32 << 20);
                    tokens.push(token);
                }
            }
        }
        assert_eq!(
            tokens,
            [3],
            "{backend:?}: the completion lost its new token"
        );
        assert_eq!(
            driver.set_token(pending, 4),
            Err(4),
            "a finished send took a token"
        );
        driver.close(id);
        drop(client);
        assert_eq!(reader.join().unwrap(), 5 + (32 << 20));
    }
}

#[test]
fn a_ring_watched_apart_completes_every_send() {
    let test = "a_ring_watched_apart_completes_every_send";
    if !available(
        test,
        "io_uring",
        Capabilities::probe().io_uring_send_zc.err(),
    ) {
        return; // reported as skipped: no io_uring, no ring to watch apart
    }
    let (client, mut server) = connected();
    let mut driver: Driver<u32, Vec<u8>> = Driver::new().unwrap();
    let options = SocketOptions {
        backend: Some(Backend::IoUring),
        zerocopy_threshold: 0,
    };
    let id = driver.register(client.as_fd(), &options).unwrap();
    let ring = driver
        .ring_fd_apart()
        .unwrap()
        .expect("an io_uring socket has a ring")
        .as_raw_fd();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        server.read_to_end(&mut all).unwrap();
        all
    });
    let sends = 200u32;
    for i in 0..sends {
        driver
            .submit(id, vec![vec![i as u8; 65536]], true, i)
            .unwrap();
    }
    let mut done = 0;
    for turn in 0.. {
        if done == sends {
            break;
        }
        assert!(
            turn < 10_000,
            "{done} of {sends} sends completed; the rest were stranded"
        );
        driver.flush().unwrap();
        wait_readable(ring);
        driver.poll_ring().unwrap();
        for completion in driver.take_completions() {
            if let Completion::Send { result, .. } = completion {
                assert_eq!(result.unwrap().nbytes, 65536);
                done += 1;
            }
        }
    }
    driver.close(id);
    drop(client);
    let received = reader.join().unwrap();
    let expected: Vec<u8> = (0..sends).flat_map(|i| vec![i as u8; 65536]).collect();
    assert!(
        received == expected,
        "bytes arrived out of order or incomplete"
    );
}
