//! `Driver::submit_file` over a real loopback TCP connection: a file's bytes between buffer
//! sends arrive in order on every backend, and bad files are refused before anything is queued.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;

mod common;

use common::backends;
use zerosend::{Completion, Driver, SocketOptions};

fn temp_file(content: &[u8]) -> std::fs::File {
    // One name per call: the tests run in parallel threads of one process.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path =
        std::env::temp_dir().join(format!("zerosend-send-file-{}-{call}", std::process::id()));
    let mut file = std::fs::File::create(&path).unwrap();
    file.write_all(content).unwrap();
    let reopened = std::fs::File::open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    reopened
}

/// Drives the driver until `expected` completions arrived, waiting on its descriptor.
fn run_until(driver: &mut Driver<u32, Vec<u8>>, expected: usize) -> Vec<(u32, usize)> {
    let mut done = Vec::new();
    while done.len() < expected {
        driver.flush().unwrap();
        let mut pollfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&driver.fd()),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pollfd, 1, 1000) };
        driver.poll().unwrap();
        for completion in driver.take_completions() {
            if let Completion::Send { token, result, .. } = completion {
                done.push((token, result.unwrap().nbytes));
            }
        }
    }
    done
}

#[test]
fn file_bytes_keep_their_place_between_buffer_sends() {
    let content: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let file = temp_file(&content);
    for backend in backends("file_bytes_keep_their_place_between_buffer_sends") {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client.set_nonblocking(true).unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            server.read_to_end(&mut got).unwrap();
            got
        });
        let mut driver = Driver::<u32, Vec<u8>>::new().unwrap();
        let options = SocketOptions {
            backend: Some(backend),
            zerocopy_threshold: 0,
        };
        let id = driver.register(client.as_fd(), &options).unwrap();
        let mut expected = Vec::new();
        for i in 0..8u32 {
            let chunk = vec![i as u8; 100_000 + i as usize];
            expected.extend_from_slice(&chunk);
            driver.submit(id, vec![chunk], true, 2 * i).unwrap();
            let offset = u64::from(i) * 300_001;
            driver
                .submit_file(id, file.as_fd(), offset, Some(400_000), 2 * i + 1)
                .unwrap();
            expected.extend_from_slice(&content[offset as usize..offset as usize + 400_000]);
        }
        let done = run_until(&mut driver, 16);
        assert_eq!(done.len(), 16);
        assert_eq!(driver.stats(id).unwrap().bytes_sendfile, 8 * 400_000);
        driver.close(id);
        drop(driver);
        drop(client);
        assert!(
            reader.join().unwrap() == expected,
            "{backend:?}: stream differs"
        );
    }
}

#[test]
fn bad_files_are_refused_before_anything_is_queued() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    client.set_nonblocking(true).unwrap();
    let mut driver = Driver::<u32, Vec<u8>>::new().unwrap();
    let id = driver
        .register(client.as_fd(), &SocketOptions::default())
        .unwrap();
    let file = temp_file(b"0123456789");
    let past_end = driver
        .submit_file(id, file.as_fd(), 4, Some(7), 1)
        .unwrap_err();
    assert!(past_end
        .error
        .to_string()
        .contains("past the end of the file"));
    let offset = driver
        .submit_file(id, file.as_fd(), 11, None, 2)
        .unwrap_err();
    assert!(offset.error.to_string().contains("past the end"));
    let dir = std::fs::File::open(std::env::temp_dir()).unwrap();
    let directory = driver.submit_file(id, dir.as_fd(), 0, None, 3).unwrap_err();
    assert_eq!(directory.error.errno(), Some(libc::EISDIR));
    let path = std::env::temp_dir().join(format!("zerosend-write-only-{}", std::process::id()));
    let write_only = std::fs::File::create(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let refused = driver
        .submit_file(id, write_only.as_fd(), 0, None, 4)
        .unwrap_err();
    assert_eq!(refused.error.errno(), Some(libc::EBADF));
    assert_eq!(driver.inflight(id).unwrap(), 0);
    assert_eq!(driver.stats(id).unwrap(), Default::default());
}
