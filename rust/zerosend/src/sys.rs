//! Thin, documented wrappers around the socket system calls zerosend needs.

use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{self, sockopt, ControlMessageOwned, MsgFlags, SockaddrLike};

use crate::error::{Error, Result};

// Constants from the kernel's uapi headers that the libc crate does not export.
/// `SO_ZEROCOPY` (include/uapi/asm-generic/socket.h; the same on x86_64 and aarch64).
const SO_ZEROCOPY: libc::c_int = 60;
/// `SO_EE_ORIGIN_ZEROCOPY` (include/uapi/linux/errqueue.h).
const SO_EE_ORIGIN_ZEROCOPY: u8 = 5;
/// `SO_EE_CODE_ZEROCOPY_COPIED` (include/uapi/linux/errqueue.h).
const SO_EE_CODE_ZEROCOPY_COPIED: u8 = 1;

/// Upper bound on iovecs per `sendmsg`; longer vectors go in several calls (stream sockets).
pub const IOV_MAX: usize = 1024;

/// What kind of transport a socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TCP over IPv4 or IPv6: a byte stream, short sends are possible.
    Tcp,
    /// UDP over IPv4 or IPv6: one send is one datagram.
    Udp,
}

/// Checks that `fd` is a connected TCP or UDP socket over IPv4/IPv6 and says which.
pub fn inspect_socket(fd: BorrowedFd<'_>) -> Result<Transport> {
    let not_socket = |e: Errno| match e {
        Errno::ENOTSOCK => Error::UnsupportedSocket("the file descriptor is not a socket".into()),
        Errno::EBADF => {
            Error::UnsupportedSocket("the socket is closed (bad file descriptor)".into())
        }
        e => Error::os("inspecting the socket", e),
    };
    let family = socket::getsockname::<socket::SockaddrStorage>(fd.as_raw_fd())
        .map_err(not_socket)?
        .family();
    let family_ok = matches!(
        family,
        Some(socket::AddressFamily::Inet) | Some(socket::AddressFamily::Inet6)
    );
    if !family_ok {
        return Err(Error::UnsupportedSocket(format!(
            "address family {family:?} is not supported; zerosend sends on AF_INET and AF_INET6 sockets"
        )));
    }
    let transport = match socket::getsockopt(&fd, sockopt::SockType).map_err(not_socket)? {
        socket::SockType::Stream => Transport::Tcp,
        socket::SockType::Datagram => Transport::Udp,
        other => {
            return Err(Error::UnsupportedSocket(format!(
                "socket type {other:?} is not supported; use SOCK_STREAM (TCP) or SOCK_DGRAM (UDP)"
            )))
        }
    };
    if transport == Transport::Tcp && socket::getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false)
    {
        return Err(Error::UnsupportedSocket(
            "the socket is listening; wrap the connected socket that accept() returned".into(),
        ));
    }
    match socket::getpeername::<socket::SockaddrStorage>(fd.as_raw_fd()) {
        Ok(_) => Ok(transport),
        Err(Errno::ENOTCONN) => Err(Error::UnsupportedSocket(
            "the socket is not connected; connect it (TCP or UDP) before wrapping".into(),
        )),
        Err(e) => Err(not_socket(e)),
    }
}

/// True if the connected peer is this host (a loopback address, or our own address), where the
/// kernel delivers by copying and zero-copy only adds work.
pub fn peer_is_local(fd: BorrowedFd<'_>) -> bool {
    let ip = |addr: socket::SockaddrStorage| -> Option<std::net::IpAddr> {
        if let Some(v4) = addr.as_sockaddr_in() {
            Some(std::net::IpAddr::V4(v4.ip()))
        } else {
            addr.as_sockaddr_in6().map(|v6| {
                let ip = v6.ip();
                ip.to_ipv4_mapped()
                    .map_or(std::net::IpAddr::V6(ip), std::net::IpAddr::V4)
            })
        }
    };
    let peer = socket::getpeername::<socket::SockaddrStorage>(fd.as_raw_fd())
        .ok()
        .and_then(ip);
    let local = socket::getsockname::<socket::SockaddrStorage>(fd.as_raw_fd())
        .ok()
        .and_then(ip);
    match peer {
        Some(peer) => peer.is_loopback() || Some(peer) == local,
        None => false,
    }
}

/// A close-on-exec duplicate of `fd`, so in-flight sends keep the socket alive even if the
/// caller closes its own descriptor, and the number cannot be reused under us.
pub fn duplicate(fd: BorrowedFd<'_>) -> Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a valid borrowed descriptor creates a new descriptor that
    // nobody else owns; we take ownership of it exactly once below.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(Error::os(
            "duplicating the socket descriptor",
            Errno::last(),
        ));
    }
    // SAFETY: `new` is a fresh descriptor returned by fcntl and owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Whether `SO_ZEROCOPY` is already on (someone used, or prepared, MSG_ZEROCOPY on this socket).
pub fn zerocopy_enabled(fd: BorrowedFd<'_>) -> std::result::Result<bool, Errno> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the option value points to a live c_int and `len` holds its size.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ZEROCOPY,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value != 0)
    } else {
        Err(Errno::last())
    }
}

/// Turns on `SO_ZEROCOPY`; without it the kernel silently ignores `MSG_ZEROCOPY`.
pub fn enable_zerocopy(fd: BorrowedFd<'_>) -> std::result::Result<(), Errno> {
    let one: libc::c_int = 1;
    // SAFETY: the option value points to a live c_int and the length matches it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ZEROCOPY,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(Errno::last())
    }
}

/// One non-blocking `sendmsg` of `iov`; `zerocopy` adds `MSG_ZEROCOPY`.
///
/// # Safety
/// Every iovec must describe readable memory. With `zerocopy`, that memory must also stay valid
/// and unmodified until the kernel's release notification for this call.
pub unsafe fn send_vectored(
    fd: RawFd,
    iov: &[libc::iovec],
    zerocopy: bool,
) -> std::result::Result<usize, Errno> {
    let mut flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    if zerocopy {
        flags |= libc::MSG_ZEROCOPY;
    }
    // SAFETY: an all-zero msghdr means no address and no control data.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = iov.as_ptr().cast_mut();
    header.msg_iovlen = iov.len();
    loop {
        // SAFETY: `header` points to `iov.len()` iovecs that the caller guarantees describe
        // readable memory (this function's contract).
        let n = unsafe { libc::sendmsg(fd, &header, flags) };
        if n >= 0 {
            return Ok(n as usize);
        }
        match Errno::last() {
            Errno::EINTR => continue,
            e => return Err(e),
        }
    }
}

/// A completion read from the error queue: numbers `[lo, hi]` were released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZerocopyCompletion {
    pub lo: u32,
    pub hi: u32,
    /// The kernel copied the data after all (loopback, veth, a device without scatter-gather).
    pub copied: bool,
}

/// What the error queue held besides zero-copy completions.
#[derive(Debug, Default)]
pub struct ErrorQueueReport {
    /// A pending socket error (for example ICMP unreachable on UDP), if one was queued.
    pub socket_error: Option<Errno>,
    /// Messages whose control data was cut short (`MSG_CTRUNC`).
    pub truncated: u64,
}

/// Drains the socket's error queue without blocking, calling `on_completion` for each
/// zero-copy completion found.
pub fn drain_error_queue(
    fd: RawFd,
    on_completion: impl FnMut(ZerocopyCompletion),
) -> std::result::Result<ErrorQueueReport, Errno> {
    let mut cmsg_space = nix::cmsg_space!(libc::sock_extended_err, libc::sockaddr_in6);
    drain_error_queue_into(fd, &mut cmsg_space, on_completion)
}

#[allow(clippy::ptr_arg)] // nix's recvmsg takes the control buffer as a Vec
fn drain_error_queue_into(
    fd: RawFd,
    cmsg_space: &mut Vec<u8>,
    mut on_completion: impl FnMut(ZerocopyCompletion),
) -> std::result::Result<ErrorQueueReport, Errno> {
    let mut report = ErrorQueueReport::default();
    loop {
        let msg = match socket::recvmsg::<()>(
            fd,
            &mut [],
            Some(cmsg_space),
            MsgFlags::MSG_ERRQUEUE | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(msg) => msg,
            Err(Errno::EAGAIN) => return Ok(report),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        };
        if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
            report.truncated += 1;
        }
        let Ok(cmsgs) = msg.cmsgs() else { continue };
        for cmsg in cmsgs {
            let err = match cmsg {
                ControlMessageOwned::Ipv4RecvErr(err, _)
                | ControlMessageOwned::Ipv6RecvErr(err, _) => err,
                _ => continue,
            };
            if err.ee_origin == SO_EE_ORIGIN_ZEROCOPY && err.ee_errno == 0 {
                on_completion(ZerocopyCompletion {
                    lo: err.ee_info,
                    hi: err.ee_data,
                    copied: err.ee_code & SO_EE_CODE_ZEROCOPY_COPIED != 0,
                });
            } else if err.ee_errno != 0 {
                report.socket_error = Some(Errno::from_raw(err.ee_errno as i32));
            }
        }
    }
}

/// The kernel release string, e.g. "6.18.44".
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// Checks that `fd` is a regular file opened for reading and returns its size, so a bad file is
/// refused before any byte of it is sent.
pub fn inspect_file(fd: BorrowedFd<'_>) -> Result<u64> {
    // SAFETY: F_GETFL on a borrowed descriptor reads its status flags and changes nothing.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(Error::os("reading the file's open flags", Errno::last()));
    }
    if flags & libc::O_ACCMODE == libc::O_WRONLY {
        return Err(Error::os(
            "send_file needs a file opened for reading; this one is write-only \
             (open it with \"rb\" or O_RDONLY)",
            Errno::EBADF,
        ));
    }
    let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat fills the stat buffer it is given for a valid descriptor.
    if unsafe { libc::fstat(fd.as_raw_fd(), stat.as_mut_ptr()) } < 0 {
        return Err(Error::os("fstat of the file", Errno::last()));
    }
    // SAFETY: fstat succeeded, so it initialised the whole struct.
    let stat = unsafe { stat.assume_init() };
    match stat.st_mode & libc::S_IFMT {
        libc::S_IFREG => Ok(stat.st_size as u64),
        libc::S_IFDIR => Err(Error::os(
            "send_file needs a regular file; this descriptor is a directory",
            Errno::EISDIR,
        )),
        _ => Err(Error::InvalidArgument(
            "send_file needs a regular file (not a pipe, socket or device); read other \
             sources into a buffer and use send_zc"
                .into(),
        )),
    }
}

/// One `sendfile(2)` of up to `count` bytes of `file` from `offset` to `socket`. The file's own
/// offset is not used or moved. Returns the bytes taken (0 at the end of the file).
pub fn send_file(
    socket: RawFd,
    file: RawFd,
    offset: u64,
    count: usize,
) -> std::result::Result<usize, Errno> {
    let mut off = offset as libc::off_t;
    // The kernel takes at most 0x7ffff000 bytes per call; the rest goes in later calls.
    let count = count.min(1 << 30);
    // SAFETY: both descriptors are owned by the caller for the duration of the call and `off`
    // is a valid off_t the kernel updates; no user memory is read or written besides it.
    let n = unsafe { libc::sendfile(socket, file, &mut off, count) };
    if n < 0 {
        Err(Errno::last())
    } else {
        Ok(n as usize)
    }
}

/// A non-blocking, close-on-exec `CLOCK_MONOTONIC` timerfd, disarmed: readable once it fires.
pub fn timer_create() -> std::result::Result<OwnedFd, Errno> {
    // SAFETY: timerfd_create takes no pointers; a non-negative result is a new descriptor.
    let fd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Arms the timer to fire once, `after` from now (replacing any earlier setting), and clears
/// an expiry not read yet.
pub fn timer_arm(fd: BorrowedFd<'_>, after: std::time::Duration) -> std::result::Result<(), Errno> {
    timer_clear(fd);
    let value = libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
        it_value: libc::timespec {
            tv_sec: after.as_secs() as libc::time_t,
            // A zero it_value would disarm: at least one nanosecond.
            tv_nsec: libc::c_long::from(after.subsec_nanos().max(1)),
        },
    };
    // SAFETY: `value` is a valid itimerspec for the call; the old value is not asked for.
    let rc = unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &value, std::ptr::null_mut()) };
    if rc < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// Reads (and so clears) the timer's expiry count, if it fired.
pub fn timer_clear(fd: BorrowedFd<'_>) {
    let mut expirations = [0u8; 8];
    // SAFETY: reads at most 8 bytes into the local array; EAGAIN (not fired) is fine.
    let _ = unsafe { libc::read(fd.as_raw_fd(), expirations.as_mut_ptr().cast(), 8) };
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;

    use super::*;

    /// A UDP socket with `IP_RECVERR` whose error queue holds the ICMP port unreachable for a
    /// datagram sent to a closed port.
    fn socket_with_queued_icmp_error() -> UdpSocket {
        let closed = UdpSocket::bind("127.0.0.1:0").unwrap();
        let target = closed.local_addr().unwrap();
        drop(closed);
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.connect(target).unwrap();
        socket::setsockopt(&socket, sockopt::Ipv4RecvErr, &true).unwrap();
        socket.send(b"ping").unwrap(); // loopback answers before send() returns
        socket
    }

    #[test]
    fn a_queued_icmp_error_is_reported() {
        let socket = socket_with_queued_icmp_error();
        let report = drain_error_queue(socket.as_raw_fd(), |_| {}).unwrap();
        assert_eq!(report.socket_error, Some(Errno::ECONNREFUSED));
        assert_eq!(report.truncated, 0);
    }

    #[test]
    fn truncated_control_data_is_counted() {
        let socket = socket_with_queued_icmp_error();
        let mut too_small = vec![0u8; 8];
        let report = drain_error_queue_into(socket.as_raw_fd(), &mut too_small, |_| {}).unwrap();
        assert_eq!(report.truncated, 1);
    }
}
