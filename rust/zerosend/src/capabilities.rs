//! Run-time probing of what this kernel offers for zero-copy transmit, with the reason for each "no".

use std::os::fd::AsFd;

use io_uring::{opcode, IoUring, Probe};
use nix::errno::Errno;
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType};

use crate::error::errno_of;
use crate::sys;

/// What the running kernel supports. Each `Err` holds a sentence saying why not.
#[derive(Debug, Clone)]
pub struct Capabilities {
    /// Kernel release, e.g. "6.18.44".
    pub kernel: String,
    /// io_uring with `IORING_OP_SEND_ZC` and `IORING_OP_SENDMSG_ZC` (Linux 6.0/6.1).
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
    let ring = match IoUring::new(4) {
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
