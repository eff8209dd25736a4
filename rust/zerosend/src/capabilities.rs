//! Run-time probing of what this kernel offers for zero-copy transmit, with the reason for each "no".

use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};

use io_uring::{cqueue, opcode, types, IoUring, Probe};
use nix::errno::Errno;
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType};

use crate::error::errno_of;
use crate::ring::SEND_ZC_REPORT_USAGE;
use crate::sys;

/// What the running kernel supports. Each `Err` holds a sentence saying why not.
#[derive(Debug, Clone)]
pub struct Capabilities {
    /// Kernel release, e.g. "6.18.44".
    pub kernel: String,
    /// io_uring with `IORING_OP_SEND_ZC` and `IORING_OP_SENDMSG_ZC` (Linux 6.0/6.1) that can
    /// report whether a send was copied (`IORING_SEND_ZC_REPORT_USAGE`, Linux 6.2).
    pub io_uring_send_zc: Result<(), String>,
    /// `SO_ZEROCOPY` + `MSG_ZEROCOPY` on TCP sockets (Linux 4.14).
    pub msg_zerocopy: Result<(), String>,
}

impl Capabilities {
    /// Probes the kernel now (cheap: one ring and one socket, both closed at once).
    pub fn probe() -> Self {
        Self {
            kernel: sys::kernel_release(),
            io_uring_send_zc: probe_io_uring(),
            msg_zerocopy: probe_msg_zerocopy(),
        }
    }
}

/// Reads `kernel.io_uring_disabled` (0 = allowed, 1 = only for `io_uring_group`, 2 = off).
fn io_uring_disabled_sysctl() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

fn probe_io_uring() -> Result<(), String> {
    let mut ring = match IoUring::new(4) {
        Ok(ring) => ring,
        Err(err) => {
            let errno = errno_of(&err);
            return Err(match (errno, io_uring_disabled_sysctl()) {
                (_, Some(2)) => "io_uring is disabled by the sysctl kernel.io_uring_disabled=2 \
                                 (set it to 0 to allow it)"
                    .to_string(),
                (Errno::EPERM, Some(1)) => "io_uring is restricted by kernel.io_uring_disabled=1 to \
                                            members of kernel.io_uring_group (set it to 0, or join that group)"
                    .to_string(),
                (Errno::ENOSYS, _) => "io_uring_setup is not available: the kernel is built without \
                                       io_uring or a seccomp filter blocks it"
                    .to_string(),
                (Errno::EPERM, _) => "io_uring_setup was refused (EPERM): a seccomp filter or container \
                                      policy blocks io_uring"
                    .to_string(),
                (Errno::ENOMEM, _) => "io_uring_setup failed with ENOMEM: RLIMIT_MEMLOCK is too low for \
                                       the ring (raise it with ulimit -l)"
                    .to_string(),
                (e, _) => format!("io_uring_setup failed: {e} ({})", e.desc()),
            });
        }
    };
    let mut probe = Probe::new();
    if let Err(err) = ring.submitter().register_probe(&mut probe) {
        return Err(format!(
            "io_uring opcode probing failed ({err}); the kernel is older than 5.6"
        ));
    }
    if !probe.is_supported(opcode::SendZc::CODE) {
        return Err(format!(
            "io_uring has no IORING_OP_SEND_ZC on kernel {} (needs Linux 6.0 or newer)",
            sys::kernel_release()
        ));
    }
    if !probe.is_supported(opcode::SendMsgZc::CODE) {
        return Err(format!(
            "io_uring has no IORING_OP_SENDMSG_ZC on kernel {} (needs Linux 6.1 or newer)",
            sys::kernel_release()
        ));
    }
    probe_report_usage(&mut ring)
}

/// Whether SEND_ZC takes `IORING_SEND_ZC_REPORT_USAGE` (Linux 6.2; early 6.1 kernels refuse
/// it), without which a send's result could not say whether the kernel copied it. Sends one
/// byte on an unconnected UDP socket: a kernel that knows the flag fails the send itself
/// (EDESTADDRREQ), one that does not rejects the request (EINVAL).
fn probe_report_usage(ring: &mut IoUring) -> Result<(), String> {
    static BYTE: [u8; 1] = [0];
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| format!("could not create a UDP socket to probe io_uring SEND_ZC: {e}"))?;
    let entry = opcode::SendZc::new(types::Fd(socket.as_raw_fd()), BYTE.as_ptr(), 1)
        .zc_flags(SEND_ZC_REPORT_USAGE)
        .build();
    // SAFETY: the request reads one byte of a static, and the socket outlives it: both of its
    // completions are awaited below before the socket is closed.
    unsafe { ring.submission().push(&entry) }
        .map_err(|_| "the io_uring probe ring was full".to_string())?;
    let probed = |e: std::io::Error| format!("probing io_uring SEND_ZC failed: {e}");
    ring.submit_and_wait(1).map_err(probed)?;
    let Some(cqe) = ring.completion().next() else {
        return Err("probing io_uring SEND_ZC gave no completion".into());
    };
    if cqueue::more(cqe.flags()) {
        ring.submit_and_wait(1).map_err(probed)?; // the notification: the send is over
    }
    if cqe.result() == -libc::EINVAL {
        return Err(format!(
            "io_uring SEND_ZC on kernel {} does not take IORING_SEND_ZC_REPORT_USAGE (needs \
             Linux 6.2 or newer), so it could not tell zero-copy sends from copied ones",
            sys::kernel_release()
        ));
    }
    Ok(())
}

fn probe_msg_zerocopy() -> Result<(), String> {
    let sock = socket::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("could not create a TCP socket to probe SO_ZEROCOPY: {e}"))?;
    sys::enable_zerocopy(sock.as_fd()).map_err(|e| match e {
        Errno::ENOPROTOOPT | Errno::EINVAL => format!(
            "setsockopt(SO_ZEROCOPY) is unknown to kernel {} (MSG_ZEROCOPY needs Linux 4.14 or newer)",
            sys::kernel_release()
        ),
        e => format!("setsockopt(SO_ZEROCOPY) failed: {e} ({})", e.desc()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_kernel_reports_send_zc_usage() {
        let mut ring = IoUring::new(4).unwrap();
        assert_eq!(probe_report_usage(&mut ring), Ok(()));
    }
}
