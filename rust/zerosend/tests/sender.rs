//! `ZeroCopySender` on a tokio runtime, over real loopback TCP and UDP sockets.

use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream, UdpSocket};

mod common;

use common::backends;
use zerosend::{Backend, SocketOptions, ZeroCopySender};

fn options(backend: Backend) -> SocketOptions {
    SocketOptions {
        backend: Some(backend),
        ..SocketOptions::default()
    }
}

async fn connected_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap())
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

// One driver per thread: senders live inside a LocalSet.
#[tokio::test]
async fn sends_arrive_whole_in_order_and_buffers_come_back() {
    tokio::task::LocalSet::new()
        .run_until(async {
            for backend in backends("sends_arrive_whole_in_order_and_buffers_come_back") {
                let (client, mut server) = connected_pair().await;
                let sender = ZeroCopySender::<Vec<u8>>::new(&client, &options(backend)).unwrap();
                assert_eq!(sender.backend(), backend);
                let sizes = [1usize, 4095, 10_240, 65_537, 1 << 20, 8 << 20];
                let expected: Vec<u8> = sizes
                    .iter()
                    .enumerate()
                    .flat_map(|(i, &n)| pattern(n, i as u8))
                    .collect();
                let reader = tokio::spawn(async move {
                    let mut got = Vec::new();
                    server.read_to_end(&mut got).await.unwrap();
                    got
                });
                // All submitted before any is awaited: many in flight, order kept.
                let futures: Vec<_> = sizes
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| sender.send_zc(pattern(n, i as u8)))
                    .collect();
                for (future, (i, &n)) in futures.into_iter().zip(sizes.iter().enumerate()) {
                    let (result, buf) = future.await;
                    let result = result.unwrap();
                    assert_eq!(result.nbytes, n);
                    // Loopback copies on delivery, and the result says so.
                    assert!(!result.zerocopy);
                    assert_eq!(buf, pattern(n, i as u8), "the buffer comes back intact");
                }
                assert_eq!(sender.inflight(), 0);
                let stats = sender.stats();
                assert_eq!(stats.sends, sizes.len() as u64);
                drop(sender);
                drop(client);
                let got = tokio::time::timeout(Duration::from_secs(30), reader)
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(got.len(), expected.len(), "{backend:?}");
                assert!(got == expected, "{backend:?}: bytes differ");
            }
        })
        .await
}

// One driver per thread: senders live inside a LocalSet.
#[tokio::test]
async fn dropping_the_future_does_not_cancel_the_send() {
    tokio::task::LocalSet::new()
        .run_until(async {
            for backend in backends("dropping_the_future_does_not_cancel_the_send") {
                let (client, mut server) = connected_pair().await;
                let sender = ZeroCopySender::<Vec<u8>>::new(&client, &options(backend)).unwrap();
                let data = pattern(16 << 20, 9);
                drop(sender.send_zc(data.clone()));
                let reader = tokio::spawn(async move {
                    let mut got = vec![0u8; 16 << 20];
                    server.read_exact(&mut got).await.unwrap();
                    got
                });
                tokio::time::timeout(Duration::from_secs(30), sender.drain())
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(sender.inflight(), 0);
                let got = reader.await.unwrap();
                assert!(got == data, "{backend:?}");
            }
        })
        .await
}

// One driver per thread: senders live inside a LocalSet.
#[tokio::test]
async fn a_reset_peer_fails_the_send_with_its_errno() {
    tokio::task::LocalSet::new()
        .run_until(async {
            for backend in backends("a_reset_peer_fails_the_send_with_its_errno") {
                let (client, server) = connected_pair().await;
                let sender = ZeroCopySender::<Vec<u8>>::new(&client, &options(backend)).unwrap();
                server.set_zero_linger().unwrap();
                drop(server);
                tokio::time::sleep(Duration::from_millis(20)).await;
                let mut failed = None;
                for _ in 0..64 {
                    let (result, _) = tokio::time::timeout(
                        Duration::from_secs(30),
                        sender.send_zc(vec![1u8; 1 << 20]),
                    )
                    .await
                    .unwrap();
                    if let Err(err) = result {
                        failed = Some(err);
                        break;
                    }
                }
                let err = failed.expect("sending into a reset connection must fail");
                assert!(
                    matches!(err.errno(), Some(libc::ECONNRESET) | Some(libc::EPIPE)),
                    "{backend:?}: {err}"
                );
            }
        })
        .await
}

// One driver per thread: senders live inside a LocalSet.
#[tokio::test]
async fn udp_datagrams() {
    tokio::task::LocalSet::new()
        .run_until(async {
            for backend in backends("udp_datagrams") {
                let receiver = UdpSocket::bind("127.0.0.1:0").await.unwrap();
                let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
                socket
                    .connect(receiver.local_addr().unwrap())
                    .await
                    .unwrap();
                let sender = ZeroCopySender::<Vec<u8>>::new(&socket, &options(backend)).unwrap();
                for n in [1usize, 1400, 20_000, 60_000] {
                    let (result, _) = sender.send_zc(pattern(n, 3)).await;
                    assert_eq!(result.unwrap().nbytes, n);
                    let mut buf = vec![0u8; 65_536];
                    let got = receiver.recv(&mut buf).await.unwrap();
                    assert_eq!(&buf[..got], &pattern(n, 3)[..], "{backend:?}");
                }
            }
        })
        .await
}

// One driver per thread: senders live inside a LocalSet.
#[tokio::test]
async fn dropping_the_sender_lets_its_sends_finish() {
    tokio::task::LocalSet::new()
        .run_until(async {
            for backend in backends("dropping_the_sender_lets_its_sends_finish") {
                let (client, mut server) = connected_pair().await;
                let sender = ZeroCopySender::<Vec<u8>>::new(&client, &options(backend)).unwrap();
                let futures: Vec<_> = (0..32u8)
                    .map(|i| sender.send_zc(pattern(1 << 20, i)))
                    .collect();
                drop(sender);
                drop(client);
                let reader = tokio::spawn(async move {
                    let mut got = Vec::new();
                    server.read_to_end(&mut got).await.unwrap();
                    got
                });
                for (i, future) in futures.into_iter().enumerate() {
                    let (result, buf) = tokio::time::timeout(Duration::from_secs(30), future)
                        .await
                        .unwrap_or_else(|_| panic!("{backend:?}: send {i} never finished"));
                    assert_eq!(result.unwrap().nbytes, 1 << 20);
                    assert_eq!(buf.len(), 1 << 20);
                }
                let got = reader.await.unwrap();
                let expected: Vec<u8> = (0..32u8).flat_map(|i| pattern(1 << 20, i)).collect();
                assert!(got == expected, "{backend:?}: the peer must get every byte");
            }
        })
        .await
}
