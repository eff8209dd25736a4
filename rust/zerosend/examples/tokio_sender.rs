//! Zero-copy sends from tokio with [`ZeroCopySender`]: `N` buffers kept in flight on one TCP
//! connection, each reused only once the kernel released it and handed it back.
//!
//! ```text
//! cargo run --example tokio_sender                      # a self-contained run over loopback
//! tokio_sender --connect HOST:PORT --size BYTES --inflight N --max-bytes B
//!              [--backend io_uring|msg_zerocopy|copy] [--threshold BYTES]
//! ```
//!
//! With `--connect` it speaks the protocol of the benchmark's receiver (`python -m
//! bench.receiver`), as `bench_sender` does: it shuts its write side after the last release and
//! checks the receiver's 8-byte acknowledgement (the byte count it read). It prints one JSON
//! line. `bench_sender` drives the core `Driver` by hand; this is the same work through the
//! tokio API, on the thread's shared driver.

use std::collections::VecDeque;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use zerosend::{Backend, DrainOutcome, SocketOptions, SocketStats, ZeroCopySender};

/// What one run did.
pub struct Run {
    pub bytes: u64,
    pub sends: u64,
    pub seconds: f64,
    pub outcome: DrainOutcome,
    pub backend: Backend,
    pub stats: SocketStats,
}

/// Sends `total` bytes (rounded up to whole buffers) in buffers of `size` bytes, `inflight` of
/// them at a time. Must run inside a `tokio::task::LocalSet`.
pub async fn send_all(
    stream: &TcpStream,
    options: &SocketOptions,
    size: usize,
    inflight: usize,
    total: u64,
) -> zerosend::Result<Run> {
    let sender = ZeroCopySender::<Vec<u8>>::new(stream, options)?;
    let mut free: Vec<Vec<u8>> = (0..inflight).map(|i| vec![i as u8; size]).collect();
    let mut in_flight = VecDeque::with_capacity(inflight);
    let start = Instant::now();
    let (mut bytes, mut sends) = (0u64, 0u64);
    while bytes < total {
        let buf = match free.pop() {
            Some(buf) => buf,
            // All buffers are out: wait for the oldest send's release and reuse its buffer.
            None => {
                let oldest = in_flight.pop_front().expect("a send is in flight");
                let (result, buf) = oldest.await;
                result?;
                buf
            }
        };
        in_flight.push_back(sender.send_zc(buf));
        bytes += size as u64;
        sends += 1;
    }
    for send in in_flight {
        send.await.0?;
    }
    // Every send was released; the drain says how they went (bytes the kernel did not copy).
    let outcome = sender.drain().await?;
    Ok(Run {
        bytes,
        sends,
        seconds: start.elapsed().as_secs_f64(),
        outcome,
        backend: sender.backend(),
        stats: sender.stats(),
    })
}

struct Args {
    connect: Option<String>,
    size: usize,
    inflight: usize,
    max_bytes: u64,
    options: SocketOptions,
}

fn usage(message: &str) -> ! {
    eprintln!("tokio_sender: {message}");
    eprintln!(
        "usage: tokio_sender [--connect HOST:PORT] [--size BYTES] [--inflight N] \
         [--max-bytes B] [--backend io_uring|msg_zerocopy|copy] [--threshold BYTES]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut args = Args {
        connect: None,
        size: 1 << 20,
        inflight: 8,
        max_bytes: 256 << 20,
        options: SocketOptions::default(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        let number = |v: &str| -> u64 {
            v.parse()
                .unwrap_or_else(|_| usage(&format!("{flag}: not a number: {v}")))
        };
        match flag.as_str() {
            "--connect" => args.connect = Some(value),
            "--size" => args.size = number(&value) as usize,
            "--inflight" => args.inflight = number(&value) as usize,
            "--max-bytes" => args.max_bytes = number(&value),
            "--backend" => {
                args.options.backend = Some(
                    Backend::from_name(&value)
                        .unwrap_or_else(|| usage(&format!("--backend: unknown backend {value}"))),
                )
            }
            "--threshold" => args.options.zerocopy_threshold = number(&value) as usize,
            _ => usage(&format!("unknown option {flag}")),
        }
    }
    if args.size == 0 || args.inflight == 0 {
        usage("--size and --inflight must be non-zero");
    }
    args
}

fn fail(what: &str, err: impl std::fmt::Display) -> ! {
    eprintln!("tokio_sender: {what}: {err}");
    std::process::exit(1)
}

async fn run(args: Args) {
    let (stream, receiver) = match &args.connect {
        Some(address) => {
            let stream = TcpStream::connect(address)
                .await
                .unwrap_or_else(|e| fail(&format!("connect {address}"), e));
            (stream, None)
        }
        None => {
            // Self-contained: a loopback receiver that counts what it reads.
            let listener = TcpListener::bind("127.0.0.1:0")
                .await
                .unwrap_or_else(|e| fail("listen", e));
            let address = listener.local_addr().unwrap_or_else(|e| fail("listen", e));
            let stream = TcpStream::connect(address)
                .await
                .unwrap_or_else(|e| fail("connect", e));
            let (mut peer, _) = listener
                .accept()
                .await
                .unwrap_or_else(|e| fail("accept", e));
            let receiver = tokio::spawn(async move {
                let mut chunk = vec![0u8; 1 << 20];
                let mut count = 0u64;
                loop {
                    match peer.read(&mut chunk).await {
                        Ok(0) => break,
                        Ok(n) => count += n as u64,
                        Err(e) => fail("receive", e),
                    }
                }
                peer.write_all(&count.to_le_bytes())
                    .await
                    .unwrap_or_else(|e| fail("acknowledge", e));
            });
            (stream, Some(receiver))
        }
    };
    stream.set_nodelay(true).ok();
    let run = send_all(
        &stream,
        &args.options,
        args.size,
        args.inflight,
        args.max_bytes,
    )
    .await
    .unwrap_or_else(|e| fail("send", e));
    // The receiver answers with the number of bytes it read once it saw our end of stream.
    let mut stream = stream;
    stream
        .shutdown()
        .await
        .unwrap_or_else(|e| fail("shutdown", e));
    let mut ack = [0u8; 8];
    stream
        .read_exact(&mut ack)
        .await
        .unwrap_or_else(|e| fail("reading the receiver's acknowledgement", e));
    if let Some(receiver) = receiver {
        receiver.await.unwrap_or_else(|e| fail("receiver", e));
    }
    let received = u64::from_le_bytes(ack);
    if received != run.bytes {
        fail(
            "byte count",
            format!("sent {} bytes, the receiver read {received}", run.bytes),
        );
    }
    let counters: Vec<String> = run
        .stats
        .counters()
        .map(|(key, value)| format!("\"{key}\": {value}"))
        .collect();
    println!(
        "{{\"elapsed\": {:.6}, \"bytes\": {}, \"sends\": {}, \"bytes_zerocopy\": {}, \
         \"backend\": \"{}\", \"stats\": {{{}}}}}",
        run.seconds,
        run.bytes,
        run.sends,
        run.outcome.bytes_zerocopy,
        run.backend.name(),
        counters.join(", "),
    );
}

fn main() {
    let args = parse_args();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail("tokio runtime", e));
    // The senders of this thread share its driver, which lives on this thread only.
    tokio::task::LocalSet::new().block_on(&runtime, run(args));
}
