//! The one error type of the core. Every failure says what went wrong and, where it can, what to do.

use nix::errno::Errno;

/// Errors of the zerosend core.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// A system call failed. `errno` is the kernel's answer.
    #[error("{context}: {errno}")]
    Os { context: &'static str, errno: Errno },
    /// The requested backend cannot be used here.
    #[error("backend {backend:?} is unavailable: {reason}")]
    BackendUnavailable {
        backend: &'static str,
        reason: String,
    },
    /// The object given as a socket is not one zerosend can send on.
    #[error("unsupported socket: {0}")]
    UnsupportedSocket(String),
    /// A send argument is unusable (empty vector of buffers, too many parts, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A buffer pool could not be set up; the message names the limit involved.
    #[error("{0}")]
    Pool(String),
    /// The driver (or a socket wrapped by it) was inherited through `fork()`: it belongs to the
    /// parent, which keeps using it, so the child must not touch it.
    #[error(
        "this zerosend object was inherited through fork(): its event loop driver, io_uring and \
         pending sends belong to the parent process; in the child, wrap a socket anew on the \
         child's own event loop"
    )]
    Forked,
    /// The socket was closed through zerosend; nothing more can be sent on it.
    #[error("the zerosend socket is closed; wrap a new connected socket to send again")]
    Closed,
}

impl Error {
    pub(crate) fn os(context: &'static str, errno: Errno) -> Self {
        Error::Os { context, errno }
    }

    /// The errno behind this error, if it came from the kernel.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Os { errno, .. } => Some(*errno as i32),
            Error::BackendUnavailable { .. } => Some(libc::EOPNOTSUPP),
            Error::Closed => Some(libc::EBADF),
            Error::Pool(_) => Some(libc::ENOMEM),
            Error::UnsupportedSocket(_) | Error::InvalidArgument(_) | Error::Forked => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The errno inside an `io::Error` from a crate that reports the kernel's answer that way.
pub(crate) fn errno_of(err: &std::io::Error) -> Errno {
    Errno::from_raw(err.raw_os_error().unwrap_or(libc::EIO))
}
