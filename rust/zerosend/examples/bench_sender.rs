//! The pure-Rust sender of the benchmark harness (`python -m bench`): the core driver with no
//! Python in the way, so the gap between it and `send_zc` from Python is what the binding costs.
//!
//! ```text
//! bench_sender --connect HOST:PORT --size BYTES --inflight N [--seconds S] [--max-bytes B]
//!              [--backend io_uring|msg_zerocopy|copy] [--threshold BYTES]
//!              [--buffers plain|registered] [--cpu CPU]
//! ```
//!
//! It keeps `N` sends of `BYTES` each in flight on one TCP connection (a send is in flight from
//! submission until the kernel released its buffer), each from its own buffer, which is reused
//! only once it comes back with its completion. `--buffers registered` carves the buffers from
//! one locked [`Region`] registered with the driver (io_uring fixed buffers, as Python's
//! `BufferPool` does); `plain` (the default) sends from ordinary heap `Vec`s. It stops submitting after `S` seconds or `B`
//! bytes, waits for every release, shuts the write side and waits for the receiver's 8-byte
//! acknowledgement (the byte count it read). Then it prints one JSON line: elapsed time, bytes,
//! sends, its own CPU time (getrusage), peak RSS and the driver's counters.

use std::io::Read;
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use zerosend::{Backend, Completion, Driver, IoBuf, Region, SocketOptions};

/// One send buffer: heap memory, or a piece of a registered region.
enum Buffer {
    Plain(Vec<u8>),
    Registered {
        region: Arc<Region>,
        offset: usize,
        len: usize,
    },
}

// SAFETY: a Vec's heap allocation stays in place while the Vec is only moved; a region piece
// lies inside a mapping that the Arc keeps alive and that never moves.
unsafe impl IoBuf for Buffer {
    fn as_ptr(&self) -> *const u8 {
        match self {
            Buffer::Plain(vec) => vec.as_ptr(),
            // SAFETY: `offset + len` is within the region (checked where the piece is made).
            Buffer::Registered { region, offset, .. } => unsafe { region.as_ptr().add(*offset) },
        }
    }
    fn len(&self) -> usize {
        match self {
            Buffer::Plain(vec) => vec.len(),
            Buffer::Registered { len, .. } => *len,
        }
    }
}

struct Args {
    connect: String,
    size: usize,
    inflight: usize,
    seconds: f64,
    max_bytes: u64,
    backend: Backend,
    threshold: usize,
    registered: bool,
    cpu: Option<usize>,
}

fn usage(message: &str) -> ! {
    eprintln!("bench_sender: {message}");
    eprintln!(
        "usage: bench_sender --connect HOST:PORT --size BYTES --inflight N [--seconds S] \
         [--max-bytes B] [--backend io_uring|msg_zerocopy|copy] [--threshold BYTES] \
         [--buffers plain|registered] [--cpu CPU]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut args = Args {
        connect: String::new(),
        size: 0,
        inflight: 1,
        seconds: 1.0,
        max_bytes: u64::MAX,
        backend: Backend::IoUring,
        threshold: SocketOptions::default().zerocopy_threshold,
        registered: false,
        cpu: None,
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
            "--connect" => args.connect = value,
            "--size" => args.size = number(&value) as usize,
            "--inflight" => args.inflight = number(&value) as usize,
            "--seconds" => {
                args.seconds = value
                    .parse()
                    .unwrap_or_else(|_| usage(&format!("--seconds: not a number: {value}")))
            }
            "--max-bytes" => args.max_bytes = number(&value),
            "--backend" => {
                args.backend = Backend::from_name(&value)
                    .unwrap_or_else(|| usage(&format!("unknown backend {value}")))
            }
            "--threshold" => args.threshold = number(&value) as usize,
            "--buffers" => {
                args.registered = match value.as_str() {
                    "plain" => false,
                    "registered" => true,
                    _ => usage(&format!("--buffers: plain or registered, not {value}")),
                }
            }
            "--cpu" => args.cpu = Some(number(&value) as usize),
            _ => usage(&format!("unknown option {flag}")),
        }
    }
    if args.connect.is_empty() || args.size == 0 || args.inflight == 0 {
        usage("--connect, --size and --inflight are required (and non-zero)");
    }
    args
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; an all-zero value is the empty set, and CPU_SET and
    // sched_setaffinity only read and write the set we own here.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            eprintln!(
                "bench_sender: cannot pin to CPU {cpu}: {}",
                std::io::Error::last_os_error()
            );
            std::process::exit(1);
        }
    }
}

/// CPU seconds (user, system) this process used so far, and its peak RSS in KiB.
fn rusage() -> (f64, f64, i64) {
    // SAFETY: getrusage fills the zeroed struct we pass; RUSAGE_SELF covers all our threads.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let secs = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    (secs(usage.ru_utime), secs(usage.ru_stime), usage.ru_maxrss)
}

/// Blocks until the driver's descriptor is readable (or `timeout` passed).
fn wait_readable(fd: i32, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd for the duration of the call.
    let rc = unsafe { libc::poll(&mut pfd, 1, millis) };
    if rc < 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            eprintln!("bench_sender: poll: {err}");
            std::process::exit(1);
        }
    }
}

fn fail(what: &str, err: impl std::fmt::Display) -> ! {
    eprintln!("bench_sender: {what}: {err}");
    std::process::exit(1)
}

fn main() {
    let args = parse_args();
    if let Some(cpu) = args.cpu {
        pin_to_cpu(cpu);
    }
    let stream = TcpStream::connect(&args.connect)
        .unwrap_or_else(|e| fail(&format!("connect {}", args.connect), e));
    stream.set_nodelay(true).ok();
    stream
        .set_nonblocking(true)
        .unwrap_or_else(|e| fail("set_nonblocking", e));

    let mut driver: Driver<u64, Buffer> = Driver::new().unwrap_or_else(|e| fail("driver", e));
    let options = SocketOptions {
        backend: Some(args.backend),
        zerocopy_threshold: args.threshold,
    };
    let id = driver
        .register(stream.as_fd(), &options)
        .unwrap_or_else(|e| fail("register", e));
    let driver_fd = driver.fd().as_raw_fd();

    // Every buffer written once, so its pages exist before the clock starts.
    let mut free: Vec<Buffer> = if args.registered {
        let (region, _) = Region::new(args.size * args.inflight, false)
            .unwrap_or_else(|e| fail("buffer region", e));
        // SAFETY: the mapping is `len` bytes long and nothing sends from it yet.
        unsafe { std::ptr::write_bytes(region.as_ptr(), 0xa5, region.len()) };
        let region = Arc::new(region);
        driver
            .register_region(region.clone())
            .unwrap_or_else(|e| fail("register_region", e));
        (0..args.inflight)
            .map(|i| Buffer::Registered {
                region: region.clone(),
                offset: i * args.size,
                len: args.size,
            })
            .collect()
    } else {
        (0..args.inflight)
            .map(|_| Buffer::Plain(vec![0xa5; args.size]))
            .collect()
    };

    let (user0, sys0, _) = rusage();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.seconds);
    let mut sends: u64 = 0;
    let mut bytes: u64 = 0;
    let mut inflight = 0usize;
    let mut stopping = false;
    let mut done = Vec::new();
    loop {
        while !stopping {
            let Some(buf) = free.pop() else { break };
            driver
                .submit(id, vec![buf], true, sends)
                .unwrap_or_else(|rejected| fail("submit", rejected.error));
            sends += 1;
            bytes += args.size as u64;
            inflight += 1;
            if bytes >= args.max_bytes || Instant::now() >= deadline {
                stopping = true;
            }
        }
        driver.flush().unwrap_or_else(|e| fail("flush", e));
        done.extend(driver.take_completions());
        if done.is_empty() {
            if stopping && inflight == 0 {
                break;
            }
            wait_readable(driver_fd, Duration::from_secs(30));
            driver.poll().unwrap_or_else(|e| fail("poll", e));
            continue;
        }
        for completion in done.drain(..) {
            if let Completion::Send {
                result, mut bufs, ..
            } = completion
            {
                result.unwrap_or_else(|e| fail("send", e));
                inflight -= 1;
                if let Some(buf) = bufs.pop() {
                    free.push(buf);
                }
            }
        }
        if stopping && inflight == 0 {
            break;
        }
    }
    let stats = driver.stats(id).unwrap_or_else(|e| fail("stats", e));
    driver.close(id);

    // The receiver answers with the number of bytes it read once it saw our end of stream.
    stream
        .shutdown(Shutdown::Write)
        .unwrap_or_else(|e| fail("shutdown", e));
    stream
        .set_nonblocking(false)
        .unwrap_or_else(|e| fail("set_nonblocking", e));
    let mut ack = [0u8; 8];
    (&stream)
        .read_exact(&mut ack)
        .unwrap_or_else(|e| fail("reading the receiver's acknowledgement", e));
    let elapsed = start.elapsed().as_secs_f64();
    let (user1, sys1, maxrss) = rusage();
    let received = u64::from_le_bytes(ack);
    if received != bytes {
        fail(
            "byte count",
            format!("sent {bytes} bytes, the receiver read {received}"),
        );
    }
    // Every counter under its own name, as the Python binding reports them.
    let counters: Vec<String> = stats
        .counters()
        .map(|(key, value)| format!("\"{key}\": {value}"))
        .collect();
    println!(
        "{{\"elapsed\": {elapsed:.6}, \"bytes\": {bytes}, \"sends\": {sends}, \
         \"cpu_user\": {:.6}, \"cpu_sys\": {:.6}, \"maxrss_kib\": {maxrss}, \
         \"backend\": \"{}\", \"connections\": 1, \"stats\": {{{}}}}}",
        user1 - user0,
        sys1 - sys0,
        args.backend.name(),
        counters.join(", "),
    );
}
