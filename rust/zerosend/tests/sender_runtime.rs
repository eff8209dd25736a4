//! `ZeroCopySender` on a tokio runtime: one driver per thread shared by its sockets, sends that
//! resolve at the kernel's release with real errors, drains with real outcomes, and dropped
//! senders whose sends finish without leaking or freeing anything early. Real loopback sockets.
//!
//! One concept, the sender's contract on one runtime, checked property by property with the
//! same small helpers (a listener, a peer that reads late, descriptor counts).
//!
//! The tests count the process's io_uring descriptors, so they run one at a time (capability
//! probes, which open a ring for a moment, included).

use std::cell::RefCell;
use std::future::Future;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Mutex;
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

mod common;

use common::{available, backends};
use zerosend::{Backend, Capabilities, IoBuf, SocketOptions, ZeroCopySender};

/// A hang guard only: far beyond anything a loaded machine needs.
const HANG_GUARD: Duration = Duration::from_secs(60);

static SERIAL: Mutex<()> = Mutex::new(());

/// Held for a whole test: no other test opens or closes a ring meanwhile.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `test` on a current-thread runtime inside a LocalSet.
fn run_local<F: Future>(test: F) -> F::Output {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&runtime, test)
}

fn options(backend: Backend) -> SocketOptions {
    SocketOptions {
        backend: Some(backend),
        zerocopy_threshold: 0,
    }
}

/// The process's open io_uring instances (descriptors naming one).
fn io_uring_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy() == "anon_inode:[io_uring]")
        .count()
}

/// Waits (yielding to the runtime) until `done` holds; panics past the hang guard.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < HANG_GUARD, "hang guard: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn ioctl_count(fd: RawFd, request: libc::Ioctl) -> usize {
    let mut count: libc::c_int = 0;
    // SAFETY: TIOCOUTQ and FIONREAD write one int through the pointer, which points at ours.
    let rc = unsafe { libc::ioctl(fd, request, &mut count) };
    assert_eq!(rc, 0, "ioctl: {}", std::io::Error::last_os_error());
    count as usize
}

/// Bytes the kernel still holds for the socket: unsent or unacknowledged.
fn outq(fd: RawFd) -> usize {
    ioctl_count(fd, libc::TIOCOUTQ)
}

/// Bytes waiting to be read on the socket.
fn inq(fd: RawFd) -> usize {
    ioctl_count(fd, libc::FIONREAD)
}

async fn connected_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = listener.accept().await.unwrap();
    (client, server)
}

/// A connection whose receiver does not read: once its receive buffer (the default size, so its
/// window stays above a segment and reading reopens it at once) is full, what the sender sends
/// stays queued in the sender's kernel, accepted but not released.
async fn stalled_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpSocket::new_v4().unwrap();
    client.set_send_buffer_size(4 << 20).unwrap();
    let client = client
        .connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = listener.accept().await.unwrap();
    (client, server)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn io_uring_available(test: &str) -> bool {
    available(
        test,
        "io_uring",
        Capabilities::probe().io_uring_send_zc.err(),
    )
}

#[test]
fn many_sockets_on_one_thread_share_one_driver_and_one_ring() {
    let _serial = serial();
    let test = "many_sockets_on_one_thread_share_one_driver_and_one_ring";
    if !io_uring_available(test) {
        return;
    }
    const SOCKETS: usize = 200;
    const SIZE: usize = 64 << 10;
    raise_nofile(8 * SOCKETS as u64);
    run_local(async {
        let before = io_uring_fds();
        let mut pairs = Vec::new();
        for _ in 0..SOCKETS {
            pairs.push(connected_pair().await);
        }
        let mut senders = Vec::new();
        let mut readers = Vec::new();
        let mut with_one = None;
        for (i, (client, mut server)) in pairs.into_iter().enumerate() {
            let sender = ZeroCopySender::<Vec<u8>>::new(&client, &options(Backend::IoUring))
                .expect("register");
            assert_eq!(sender.backend(), Backend::IoUring);
            with_one.get_or_insert_with(io_uring_fds);
            readers.push(tokio::spawn(async move {
                let mut got = vec![0u8; 2 * SIZE];
                server.read_exact(&mut got).await.unwrap();
                got
            }));
            senders.push((i, client, sender));
        }
        let with_one = with_one.unwrap();
        assert!(with_one > before, "the first sender made the thread's ring");
        assert_eq!(
            io_uring_fds(),
            with_one,
            "{SOCKETS} sockets on one thread must share the ring the first one made"
        );
        let setup = senders[0].2.ring_setup().expect("the ring exists");
        if let Err(reason) = &setup {
            // Without DEFER_TASKRUN the sharing is the same; say why it is missing.
            available(test, "defer_taskrun", Some(reason.clone()));
        }

        // Two sends in flight on every socket at once, all through the one ring.
        let futures: Vec<_> = senders
            .iter()
            .flat_map(|(i, _, sender)| {
                [
                    sender.send_zc(pattern(SIZE, *i as u8)),
                    sender.send_zc(pattern(SIZE, !(*i as u8))),
                ]
            })
            .collect();
        for future in futures {
            let (result, buf) = tokio::time::timeout(HANG_GUARD, future)
                .await
                .expect("hang guard: a send never resolved");
            assert_eq!(result.unwrap().nbytes, SIZE);
            assert_eq!(buf.len(), SIZE);
        }
        for ((i, _, sender), reader) in senders.iter().zip(readers) {
            let outcome = sender.drain().await.unwrap();
            assert_eq!(outcome.sends, 2);
            assert_eq!(outcome.bytes, 2 * SIZE as u64);
            let got = reader.await.unwrap();
            assert!(got[..SIZE] == pattern(SIZE, *i as u8), "socket {i}");
            assert!(got[SIZE..] == pattern(SIZE, !(*i as u8)), "socket {i}");
        }
        assert_eq!(io_uring_fds(), with_one);
        drop(senders);
        // With no sender left the thread's driver ends, and its ring with it.
        until("the driver closes its ring", || io_uring_fds() == before).await;
    });
}

fn raise_nofile(want: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the one rlimit struct we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        if limit.rlim_cur < want {
            limit.rlim_cur = want.min(limit.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
        }
    }
}

/// Polls `future` once: Some(output) if it is ready.
async fn poll_once<F: Future + Unpin>(future: &mut F) -> Option<F::Output> {
    std::future::poll_fn(|cx| match Pin::new(&mut *future).poll(cx) {
        Poll::Ready(output) => Poll::Ready(Some(output)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

#[test]
fn a_send_resolves_only_when_the_kernel_released_its_buffer() {
    let _serial = serial();
    let test = "a_send_resolves_only_when_the_kernel_released_its_buffer";
    for backend in backends(test) {
        if backend == Backend::Copy {
            continue; // a copy is released when the kernel accepted it
        }
        run_local(async {
            const SIZE: usize = 1 << 20;
            let (client, mut server) = stalled_pair().await;
            let fd = client.as_raw_fd();
            let sender = ZeroCopySender::<Vec<u8>>::new(&client, &options(backend)).unwrap();
            let mut future = sender.send_zc(pattern(SIZE, 5));
            // Accepted: every byte is in the kernel, most of it queued behind the receiver's
            // closed window.
            until("the kernel accepts the send", || {
                outq(fd) + inq(server.as_raw_fd()) >= SIZE
            })
            .await;
            assert!(outq(fd) > 0, "{backend:?}: the send must be held back");
            // Let the driver reap whatever the kernel reported for it. Not a timed assertion:
            // a slow machine can only make this check pass wrongly, never fail wrongly.
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                assert!(
                    poll_once(&mut future).await.is_none(),
                    "{backend:?}: resolved while the kernel still held {} bytes",
                    outq(fd)
                );
            }
            assert_eq!(sender.inflight(), 1);
            // The receiver reads: the window opens, the bytes go and are acknowledged, and the
            // kernel releases the pages.
            let mut got = vec![0u8; SIZE];
            let reading = tokio::spawn(async move {
                server.read_exact(&mut got).await.unwrap();
                (server, got)
            });
            let (result, buf) = tokio::time::timeout(HANG_GUARD, future)
                .await
                .expect("hang guard: the send never resolved");
            assert_eq!(outq(fd), 0, "{backend:?}: resolved before the release");
            assert_eq!(result.unwrap().nbytes, SIZE);
            assert_eq!(buf, pattern(SIZE, 5), "the buffer comes back to the caller");
            let (_server, got) = reading.await.unwrap();
            assert!(got == pattern(SIZE, 5));
        });
    }
}

#[test]
fn a_reset_peer_fails_sends_and_drain_with_its_error_kind() {
    let _serial = serial();
    let test = "a_reset_peer_fails_sends_and_drain_with_its_error_kind";
    for backend in backends(test) {
        run_local(async {
            let (client, server) = connected_pair().await;
            let sender = ZeroCopySender::<Vec<u8>>::new(&client, &options(backend)).unwrap();
            let (first, _) = sender.send_zc(vec![1u8; 4096]).await;
            assert_eq!(first.unwrap().nbytes, 4096);
            assert_eq!(sender.drain().await.unwrap().sends, 1);
            server.set_zero_linger().unwrap();
            drop(server); // sends a reset
            let mut failed = None;
            let mut sent = 0;
            for _ in 0..64 {
                let (result, buf) =
                    tokio::time::timeout(HANG_GUARD, sender.send_zc(vec![2; 1 << 20]))
                        .await
                        .expect("hang guard");
                assert_eq!(
                    buf.len(),
                    1 << 20,
                    "a failed send hands its buffer back too"
                );
                match result {
                    Ok(_) => sent += 1,
                    Err(err) => {
                        failed = Some(err);
                        break;
                    }
                }
            }
            let err = failed.expect("sending into a reset connection must fail");
            let kind = |err: &zerosend::Error| {
                std::io::Error::from_raw_os_error(err.errno().expect("an errno")).kind()
            };
            assert!(
                matches!(
                    kind(&err),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                ),
                "{backend:?}: {err}"
            );
            // The stream stays broken: the next send fails the same way, without being sent.
            let (again, _) = sender.send_zc(vec![3; 10]).await;
            assert_eq!(kind(&again.unwrap_err()), kind(&err));
            // The drain reports the failure, not a made-up success...
            let drained = sender.drain().await.expect_err("the stream broke");
            assert_eq!(drained.errno(), err.errno(), "{backend:?}: {drained}");
            // ... once: the next drain covers only what came after.
            let (_, _) = sender.send_zc(vec![4; 10]).await;
            assert!(
                sender.drain().await.is_err(),
                "a later failed send is reported too"
            );
            assert_eq!(sender.drain().await.unwrap().sends, 0);
            let _ = sent;
        });
    }
}

#[test]
fn drain_reports_what_the_sends_since_the_last_drain_did() {
    let _serial = serial();
    let test = "drain_reports_what_the_sends_since_the_last_drain_did";
    for backend in backends(test) {
        run_local(async {
            let (client, mut server) = connected_pair().await;
            let sender = ZeroCopySender::<Vec<u8>>::new(
                &client,
                &SocketOptions {
                    backend: Some(backend),
                    zerocopy_threshold: 10_000,
                },
            )
            .unwrap();
            let reader = tokio::spawn(async move {
                let mut got = Vec::new();
                server.read_to_end(&mut got).await.unwrap();
                got
            });
            assert_eq!(
                sender.drain().await.unwrap(),
                zerosend::DrainOutcome::default(),
                "nothing sent yet"
            );
            // Futures dropped at once: the drain alone tells how they went.
            let sizes = [1usize, 9_999, 10_000, 65_536, 3 << 20];
            for (i, &n) in sizes.iter().enumerate() {
                drop(sender.send_zc(pattern(n, i as u8)));
            }
            drop(sender.send(pattern(777, 9)));
            let outcome = tokio::time::timeout(HANG_GUARD, sender.drain())
                .await
                .expect("hang guard")
                .unwrap();
            assert_eq!(sender.inflight(), 0, "drained means released");
            let total: usize = sizes.iter().sum::<usize>() + 777;
            assert_eq!(outcome.sends, sizes.len() as u64 + 1, "{backend:?}");
            assert_eq!(outcome.bytes, total as u64, "{backend:?}");
            assert_eq!(outcome.errors, 0);
            // Loopback copies on delivery, and the outcome says so.
            assert_eq!(outcome.bytes_zerocopy, 0, "{backend:?}");
            assert_eq!(sender.stats().sends, sizes.len() as u64 + 1);
            // The next drain covers only the sends after this one.
            let (_, _) = sender.send_zc(pattern(20_000, 1)).await;
            let next = sender.drain().await.unwrap();
            assert_eq!((next.sends, next.bytes), (1, 20_000));
            drop(sender);
            drop(client);
            let got = tokio::time::timeout(HANG_GUARD, reader)
                .await
                .expect("hang guard")
                .unwrap();
            assert_eq!(got.len(), total + 20_000, "{backend:?}");
        });
    }
}

/// A send buffer that records, when dropped, how many bytes its socket's kernel side still
/// held: the bytes of the sends after it at most, if it was released first.
struct Watched {
    data: Vec<u8>,
    index: usize,
    socket: Rc<OwnedFd>,
    drops: Rc<RefCell<Vec<(usize, usize)>>>,
}

// SAFETY: the bytes live in the Vec's heap allocation, which does not move when the Watched
// value moves and is never resized while it is held.
unsafe impl IoBuf for Watched {
    fn as_ptr(&self) -> *const u8 {
        self.data.as_ptr()
    }
    fn len(&self) -> usize {
        self.data.len()
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        let held = outq(self.socket.as_raw_fd());
        self.drops.borrow_mut().push((self.index, held));
    }
}

#[test]
fn a_dropped_sender_frees_each_buffer_after_its_release_and_not_before() {
    let _serial = serial();
    let test = "a_dropped_sender_frees_each_buffer_after_its_release_and_not_before";
    for backend in backends(test) {
        if backend == Backend::Copy {
            continue; // a copy is released when the kernel accepted it
        }
        run_local(async {
            const SENDS: usize = 8;
            const SIZE: usize = 256 << 10;
            let before = io_uring_fds();
            let (client, mut server) = stalled_pair().await;
            // Our own view of the socket, to ask the kernel what it still holds.
            let socket = Rc::new(client.as_fd().try_clone_to_owned().unwrap());
            let drops = Rc::new(RefCell::new(Vec::new()));
            let sender = ZeroCopySender::<Watched>::new(&client, &options(backend)).unwrap();
            for index in 0..SENDS {
                drop(sender.send_zc(Watched {
                    data: pattern(SIZE, index as u8),
                    index,
                    socket: socket.clone(),
                    drops: drops.clone(),
                }));
            }
            until("the kernel accepts the sends", || {
                outq(socket.as_raw_fd()) + inq(server.as_raw_fd()) >= SENDS * SIZE
            })
            .await;
            drop(sender);
            drop(client);
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(
                drops.borrow().is_empty(),
                "{backend:?}: buffers freed while the kernel held them: {:?}",
                drops.borrow()
            );
            // The receiver reads everything: every send is released and its buffer freed.
            let mut got = vec![0u8; SENDS * SIZE];
            server.read_exact(&mut got).await.unwrap();
            let expected: Vec<u8> = (0..SENDS).flat_map(|i| pattern(SIZE, i as u8)).collect();
            assert!(got == expected, "{backend:?}: bytes differ");
            until("every buffer is freed (none leaked)", || {
                drops.borrow().len() == SENDS
            })
            .await;
            for &(index, held) in drops.borrow().iter() {
                let later = (SENDS - 1 - index) * SIZE;
                assert!(
                    held <= later,
                    "{backend:?}: send {index} freed while the kernel held {held} bytes \
                     (its successors have {later})"
                );
            }
            // The thread's driver ends with its last send, ring and all.
            until("the driver closes its ring", || io_uring_fds() == before).await;
        });
    }
}

/// The example beside the benchmark sender, compiled in here so its sending loop is tested.
#[allow(dead_code)]
#[path = "../examples/tokio_sender.rs"]
mod example;

#[test]
fn the_tokio_example_keeps_buffers_in_flight_and_drains() {
    let _serial = serial();
    let test = "the_tokio_example_keeps_buffers_in_flight_and_drains";
    for backend in backends(test) {
        run_local(async {
            const TOTAL: u64 = 8 << 20;
            let (client, mut server) = connected_pair().await;
            let reader = tokio::spawn(async move {
                let mut got = Vec::new();
                server.read_to_end(&mut got).await.unwrap();
                got.len() as u64
            });
            let run = tokio::time::timeout(
                HANG_GUARD,
                example::send_all(&client, &options(backend), 256 << 10, 4, TOTAL),
            )
            .await
            .expect("hang guard")
            .unwrap();
            assert_eq!(run.backend, backend);
            assert_eq!((run.bytes, run.sends), (TOTAL, 32));
            assert_eq!((run.outcome.sends, run.outcome.bytes), (32, TOTAL));
            assert_eq!(run.stats.sends, 32);
            drop(client);
            assert_eq!(reader.await.unwrap(), TOTAL, "{backend:?}");
        });
    }
}

/// Runs in a fork child: the sender's driver belongs to the parent, so the drain and a send
/// must fail at once with the fork error (not hang, not pretend). Returns the exit code.
fn forked_child_checks(sender: &ZeroCopySender<Vec<u8>>) -> i32 {
    struct Noop;
    impl std::task::Wake for Noop {
        fn wake(self: std::sync::Arc<Self>) {}
    }
    let waker = std::task::Waker::from(std::sync::Arc::new(Noop));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut drain = std::pin::pin!(sender.drain());
    if !matches!(
        drain.as_mut().poll(&mut cx),
        Poll::Ready(Err(zerosend::Error::Forked))
    ) {
        return 1;
    }
    let mut send = sender.send_zc(vec![2; 10]);
    match Pin::new(&mut send).poll(&mut cx) {
        Poll::Ready((Err(zerosend::Error::Forked), buf)) if buf == vec![2; 10] => 0,
        _ => 2,
    }
}

#[test]
fn in_a_fork_child_drain_and_sends_report_the_fork_error() {
    let _serial = serial();
    run_local(async {
        let (client, mut server) = connected_pair().await;
        let sender = ZeroCopySender::<Vec<u8>>::new(&client, &options(Backend::Copy)).unwrap();
        let (first, _) = sender.send_zc(vec![1; 1000]).await;
        assert_eq!(first.unwrap().nbytes, 1000);
        // SAFETY: the child only polls two futures by hand (no runtime, no locks taken) and
        // leaves with _exit, running no destructor of the parent's objects.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            let code = forked_child_checks(&sender);
            // SAFETY: ends the child at once, as after any fork.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child, writing its status into `status`.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(waited, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the child saw a drain or send that did not fail with the fork error (status {status})"
        );
        // The parent's sender goes on.
        let (again, _) = sender.send_zc(vec![3; 500]).await;
        assert_eq!(again.unwrap().nbytes, 500);
        assert_eq!(sender.drain().await.unwrap().sends, 2);
        drop(sender);
        drop(client);
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 1500);
    });
}

#[test]
fn each_runtime_thread_has_its_own_driver() {
    let test = "each_runtime_thread_has_its_own_driver";
    let _serial = serial();
    if !io_uring_available(test) {
        return;
    }
    const SOCKETS: usize = 10;
    let before = io_uring_fds();
    // Both threads hold their senders between the two waits; the first thread measures alone.
    let first_done = std::sync::Arc::new(std::sync::Barrier::new(2));
    let both_done = std::sync::Arc::new(std::sync::Barrier::new(3));
    let measured = std::sync::Arc::new(std::sync::Barrier::new(3));
    let threads: Vec<_> = (0..2)
        .map(|n| {
            let (first_done, both_done) = (first_done.clone(), both_done.clone());
            let measured = measured.clone();
            std::thread::spawn(move || {
                if n == 1 {
                    first_done.wait();
                }
                run_local(async move {
                    let mut held = Vec::new();
                    let mut with_one = None;
                    for _ in 0..SOCKETS {
                        let (client, server) = connected_pair().await;
                        let sender =
                            ZeroCopySender::<Vec<u8>>::new(&client, &options(Backend::IoUring))
                                .unwrap();
                        let (sent, _) = sender.send_zc(vec![n as u8; 1000]).await;
                        assert_eq!(sent.unwrap().nbytes, 1000);
                        held.push((sender, client, server));
                        with_one.get_or_insert_with(io_uring_fds);
                    }
                    let per_driver = io_uring_fds() - before;
                    // Checked after the barriers: a panic here would leave the others waiting.
                    let shared = io_uring_fds() == with_one.unwrap();
                    if n == 0 {
                        first_done.wait();
                    }
                    both_done.wait();
                    measured.wait();
                    drop(held);
                    (per_driver, shared)
                })
            })
        })
        .collect();
    both_done.wait();
    let with_both = io_uring_fds();
    measured.wait();
    let counts: Vec<(usize, bool)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let (per_driver, shared) = counts[0];
    assert!(
        shared,
        "the thread's senders share the ring its first one made"
    );
    assert!(per_driver >= 1, "the first thread's senders made a ring");
    assert_eq!(
        with_both - before,
        2 * per_driver,
        "two runtime threads, two drivers ({SOCKETS} sockets each)"
    );
}

#[test]
fn outside_a_runtime_new_says_what_it_needs() {
    let _serial = serial();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.connect(socket.local_addr().unwrap()).unwrap();
    let err = ZeroCopySender::<Vec<u8>>::new(&socket, &SocketOptions::default())
        .err()
        .expect("no runtime, no sender");
    let message = err.to_string();
    assert!(
        message.contains("tokio runtime") && message.contains("LocalSet"),
        "{message}"
    );
}
