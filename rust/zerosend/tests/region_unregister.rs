//! A region unregistered while sends from it still wait in a socket's queue: they go out whole,
//! from their registered slot, and a region registered next does not take that slot from them.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::Arc;

use zerosend::{Backend, Capabilities, Completion, Driver, IoBuf, Region, SocketOptions};

const PIECE: usize = 256 << 10;

/// `len` bytes of a region from `offset`; holds the region alive.
struct Slice {
    region: Arc<Region>,
    offset: usize,
    len: usize,
}

// SAFETY: the pointer stays valid and its bytes unchanged while the slice (holding the region,
// which is never written after the sends are submitted) lives.
unsafe impl IoBuf for Slice {
    fn as_ptr(&self) -> *const u8 {
        // SAFETY: offset + len lies inside the region (the test builds it so).
        unsafe { self.region.as_ptr().add(self.offset) }
    }
    fn len(&self) -> usize {
        self.len
    }
}

/// A plain buffer or a region slice.
enum Piece {
    Plain(Vec<u8>),
    Pool(Slice),
}

// SAFETY: both kinds keep their bytes valid and unchanged while they live (see above).
unsafe impl IoBuf for Piece {
    fn as_ptr(&self) -> *const u8 {
        match self {
            Piece::Plain(v) => v.as_ptr(),
            Piece::Pool(s) => s.as_ptr(),
        }
    }
    fn len(&self) -> usize {
        match self {
            Piece::Plain(v) => v.len(),
            Piece::Pool(s) => s.len,
        }
    }
}

fn filled_region(pieces: usize, seed: u8) -> Arc<Region> {
    let (region, _) = Region::new(pieces * PIECE, false).unwrap();
    for i in 0..region.len() {
        // SAFETY: inside the region, which nothing else uses yet.
        unsafe { region.as_ptr().add(i).write((i / 4096) as u8 ^ seed) };
    }
    Arc::new(region)
}

fn bytes_of(slice: &Slice) -> Vec<u8> {
    // SAFETY: the slice's bytes are valid (see the IoBuf impl).
    unsafe { std::slice::from_raw_parts(slice.as_ptr(), slice.len) }.to_vec()
}

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
fn queued_sends_keep_the_slot_of_a_region_unregistered_under_them() {
    if Capabilities::probe().io_uring_send_zc.is_err() {
        eprintln!("skipped: no io_uring SEND_ZC");
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    client.set_nonblocking(true).unwrap();
    let size: libc::c_int = 64 << 10;
    // SAFETY: a valid socket and option value for the duration of the call.
    unsafe {
        libc::setsockopt(
            client.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };

    let mut driver: Driver<usize, Piece> = Driver::new().unwrap();
    let options = SocketOptions {
        backend: Some(Backend::IoUring),
        zerocopy_threshold: 0,
    };
    let id = driver.register(client.as_fd(), &options).unwrap();
    let first = filled_region(2, 0x11);
    driver.register_region(Arc::clone(&first)).unwrap();

    let mut expected = Vec::new();
    let mut token = 0;
    let mut submit = |driver: &mut Driver<usize, Piece>, buf: Piece| {
        if let Err(rejected) = driver.submit(id, vec![buf], true, token) {
            panic!("send {token} refused: {}", rejected.error);
        }
        token += 1;
    };
    // Sends ahead that the peer, not reading yet, holds up; the region's wait behind them.
    for i in 0..8u8 {
        let piece = vec![i; PIECE];
        expected.extend_from_slice(&piece);
        submit(&mut driver, Piece::Plain(piece));
    }
    for offset in [0, PIECE] {
        let slice = Slice {
            region: Arc::clone(&first),
            offset,
            len: PIECE,
        };
        expected.extend(bytes_of(&slice));
        submit(&mut driver, Piece::Pool(slice));
    }
    driver.flush().unwrap();
    driver.unregister_region(&first).unwrap();
    // A region registered now must get a slot of its own.
    let second = filled_region(1, 0x77);
    driver.register_region(Arc::clone(&second)).unwrap();
    let slice = Slice {
        region: Arc::clone(&second),
        offset: 0,
        len: PIECE,
    };
    expected.extend(bytes_of(&slice));
    submit(&mut driver, Piece::Pool(slice));
    driver.flush().unwrap();

    let total = expected.len();
    let reader = std::thread::spawn(move || {
        let mut received = vec![0u8; total];
        server.read_exact(&mut received).unwrap();
        received
    });
    let mut done = 0;
    while done < 11 {
        wait_readable(driver.fd().as_raw_fd());
        driver.poll().unwrap();
        for completion in driver.take_completions() {
            if let Completion::Send { token, result, .. } = completion {
                result.unwrap_or_else(|e| panic!("send {token} failed: {e}"));
                done += 1;
            }
        }
    }
    let received = reader.join().unwrap();
    assert!(
        received == expected,
        "the bytes received differ from the bytes sent"
    );
    let stats = driver.stats(id).unwrap();
    assert_eq!(stats.fixed_buffer_sends, 3);
    assert_eq!(stats.errors, 0);
}
