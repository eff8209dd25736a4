"""A pure-Python stand-in for the ``zerosend._native`` extension, used where it cannot load.

One concept, one module: it is the extension's twin, name for name (``__all__`` equals the stub's,
a test holds them so), and what replaces one module stays one module: the driver, its results
and its pool memory share the send records and the loop's reader, as they do in Rust.

On another OS, on an architecture without a wheel, or in an install built without Rust,
``import zerosend`` still works: this module implements the extension's interface
(``_native.pyi``) with plain copying ``sendmsg`` calls, and ``wrap()``, ``Socket`` and
``BufferPool`` run unchanged on top of it. The contract stays the same: sends are submitted in
call order, go out whole and in order, and resolve once the kernel has taken all their bytes;
the buffer export is held until then. Nothing is zero-copy here: every result says
``zerocopy=False``, and ``capabilities()`` and ``Socket.fallback_reason`` say why.

Needs an event loop whose ``add_reader`` accepts a selector's descriptor (epoll or kqueue: Linux,
macOS, the BSDs).
"""

from __future__ import annotations

import asyncio
import errno
import importlib.util
import mmap
import os
import platform
import selectors
import socket
import stat
import sys
from collections import deque
from collections.abc import Callable, Generator, Iterator
from types import ModuleType
from typing import Any, final

from . import _errors, _mutant

try:
    import fcntl
except ImportError:  # not POSIX (Windows): the one check that needs it is skipped
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "BACKENDS",
    "STATS_KEYS",
    "BackendUnavailableError",
    "Capabilities",
    "CompletedSend",
    "Driver",
    "PoolBuffer",
    "PoolMemory",
    "SendResult",
    "capabilities",
]

# os.sysconf is POSIX-only.
_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in getattr(os, "sysconf_names", {}) else 1024
_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)
#: The extension's vocabulary, the same names in the same order (a test holds them equal).
BACKENDS = ("io_uring", "msg_zerocopy", "copy")
STATS_KEYS = (
    "sends",
    "bytes_zerocopy",
    "bytes_copied",
    "bytes_copied_by_kernel",
    "bytes_copied_below_threshold",
    "bytes_copied_requested",
    "bytes_copied_backend",
    "bytes_copied_ring_full",
    "bytes_sendfile",
    "notifications",
    "out_of_order_notifications",
    "short_sends",
    "eagain_waits",
    "enobufs_waits",
    "zerocopy_refusals",
    "fixed_buffer_sends",
    "ring_full_sends",
    "errors",
    "queued_errors",
    "truncated_control_messages",
)

_FORKED = (
    "this zerosend object was inherited through fork(): its event loop driver and pending "
    "sends belong to the parent process; in the child, wrap a socket anew on the child's own "
    "event loop"
)

#: Why the extension is not there; set by :func:`stand_in_for_native`.
_why_no_native = "the zerosend._native extension is not loaded"


# Deliberate faults of a mutants build (``_mutant``); always False in a release build
_SHORT_SEND_RESOLVES = _mutant.on("fallback_short_send_resolves")
_BATCH_REORDERED = _mutant.on("fallback_batch_reordered")
_CLAIMS_ZEROCOPY = _mutant.on("fallback_claims_zerocopy")
_STREAM_SURVIVES_FAILURE = _mutant.on("fallback_stream_survives_failure")


def stand_in_for_native(error: ImportError) -> ModuleType:
    """Records why the extension did not load and makes this module ``zerosend._native``."""
    global _why_no_native
    where = f"{sys.platform}, {platform.machine() or 'unknown machine'}"
    if _extension_missing(error):
        # Python words a missing extension as "cannot import name '_native' from partially
        # initialized module 'zerosend' (most likely due to a circular import)": it is no bug.
        what = f"is not installed (this install has no build of it for {where})"
    else:
        what = f"could not be loaded on {where} ({type(error).__name__}: {error})"
    _why_no_native = (
        f"the native extension zerosend._native {what}, so zerosend sends by copy from pure "
        f"Python; zero-copy needs Linux and a wheel for this platform, or a source build with Rust"
    )
    module = sys.modules[__name__]
    sys.modules[f"{__package__}._native"] = module
    return module


def _extension_missing(error: ImportError) -> bool:
    """True if no file of the extension is there (rather than one that failed to load)."""
    if isinstance(error, ModuleNotFoundError):
        return True
    try:
        return importlib.util.find_spec(f"{__package__}._native") is None
    except (ImportError, ValueError):
        return False


BackendUnavailableError = _errors.BackendUnavailableError


@final
class CompletedSend:
    """The outcome of a send that finished inside its call: awaiting it returns (or raises) at
    once, and it has the methods of a done ``asyncio.Future``."""

    __slots__ = ("_error", "_loop", "_value")
    _asyncio_future_blocking = False

    def __init__(self, event_loop: Any, value: Any, error: BaseException | None) -> None:
        self._loop, self._value, self._error = event_loop, value, error

    def __await__(self) -> Generator[Any, None, Any]:
        return self.result()
        yield  # a generator that never suspends

    __iter__ = __await__

    def done(self) -> bool:
        return True

    def cancelled(self) -> bool:
        return False

    def cancel(self, msg: Any = None) -> bool:
        return False

    def result(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value

    def exception(self) -> BaseException | None:
        return self._error

    def add_done_callback(self, callback: Callable[[Any], object], *, context: Any = None) -> None:
        if context is None:
            self._loop.call_soon(callback, self)
        else:
            self._loop.call_soon(callback, self, context=context)

    def remove_done_callback(self, callback: Callable[[Any], object]) -> int:
        return 0

    def get_loop(self) -> Any:
        return self._loop


@final
class SendResult:
    """How a send ended: bytes sent, and whether the kernel really avoided the copy."""

    __slots__ = ("_nbytes", "_zerocopy")
    _nbytes: int
    _zerocopy: bool

    def __new__(cls, nbytes: int, zerocopy: bool) -> SendResult:
        self = object.__new__(cls)
        self._nbytes = nbytes
        self._zerocopy = zerocopy
        return self

    @property
    def nbytes(self) -> int:
        return self._nbytes

    @property
    def zerocopy(self) -> bool:
        return self._zerocopy

    def __eq__(self, value: object, /) -> bool:
        if not isinstance(value, SendResult):
            return NotImplemented
        return (self._nbytes, self._zerocopy) == (value._nbytes, value._zerocopy)

    __hash__ = None  # type: ignore[assignment]
    __match_args__ = ("nbytes", "zerocopy")

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int | bool:
        return (self._nbytes, self._zerocopy)[index]

    def __iter__(self) -> Iterator[int]:
        return iter((self._nbytes, self._zerocopy))

    def __repr__(self) -> str:
        return f"SendResult(nbytes={self._nbytes}, zerocopy={self._zerocopy})"


@final
class Capabilities:
    """What the running kernel offers for zero-copy transmit, with reasons for each False."""

    __slots__ = ("_kernel",)

    def __init__(self, kernel: str) -> None:
        self._kernel = kernel

    @property
    def kernel(self) -> str:
        return self._kernel

    @property
    def io_uring_send_zc(self) -> bool:
        return False

    @property
    def io_uring_send_zc_reason(self) -> str | None:
        return _why_no_native

    @property
    def msg_zerocopy(self) -> bool:
        return False

    @property
    def msg_zerocopy_reason(self) -> str | None:
        return _why_no_native

    def __repr__(self) -> str:
        return (
            f'Capabilities(kernel="{self._kernel}", io_uring_send_zc=False ({_why_no_native}), '
            f"msg_zerocopy=False ({_why_no_native}))"
        )


def capabilities() -> Capabilities:
    """Probe the running kernel now."""
    return Capabilities(platform.release())


def _closed() -> OSError:
    return OSError(
        errno.EBADF, "the zerosend socket is closed; wrap a new connected socket to send again"
    )


def _readable_file_size(fd: int) -> int:
    """The size of a regular file open for reading; raises what the native driver raises."""
    if fcntl is not None and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY:
        raise OSError(
            errno.EBADF,
            "send_file needs a file opened for reading; this one is write-only "
            '(open it with "rb" or O_RDONLY)',
        )
    status = os.fstat(fd)
    if stat.S_ISDIR(status.st_mode):
        raise OSError(
            errno.EISDIR, "send_file needs a regular file; this descriptor is a directory"
        )
    if not stat.S_ISREG(status.st_mode):
        raise ValueError(
            "invalid argument: send_file needs a regular file (not a pipe, socket or device); "
            "read other sources into a buffer and use send_zc"
        )
    return status.st_size


def _unsupported(detail: str) -> ValueError:
    return ValueError(f"unsupported socket: {detail}")


def _export(obj: Any) -> memoryview:
    """A flat byte view holding ``obj``'s buffer export until it is released."""
    try:
        view = memoryview(obj)
    except TypeError:
        raise TypeError(
            "expected a bytes-like object (bytes, bytearray, memoryview, mmap, array) or a "
            f"list/tuple of them, not '{type(obj).__name__}'"
        ) from None
    if not view.c_contiguous:
        view.release()
        raise ValueError(
            "the buffer is not C-contiguous (a strided memoryview slice?); pass a contiguous "
            "view or a bytes() copy"
        )
    if view.format == "B" and view.ndim == 1:
        return view
    flat = view.cast("B")  # shares the export, which lives until `flat` is released
    view.release()
    return flat


def _export_all(obj: Any) -> list[memoryview]:
    items = obj if isinstance(obj, list | tuple) else (obj,)
    views: list[memoryview] = []
    try:
        for item in items:
            views.append(_export(item))
    except BaseException:
        _release(views)
        raise
    return views


def _release(views: list[memoryview]) -> None:
    for view in views:
        view.release()


class _Send:
    """One submitted send: its held buffers and how much of them the kernel has taken."""

    __slots__ = ("file", "future", "offset", "requested", "total", "views", "written")

    def __init__(self, future: asyncio.Future[Any], views: list[memoryview], requested: bool):
        self.future = future
        self.views = views
        self.requested = requested
        self.total = sum(view.nbytes for view in views)
        self.written = 0
        # A send_file: our duplicate of the file's descriptor and where its bytes start.
        self.file: int | None = None
        self.offset = 0

    def append_remaining(self, iov: list[memoryview]) -> None:
        skip = self.written
        for view in self.views:
            if len(iov) >= _IOV_MAX:
                return
            if skip >= view.nbytes:
                skip -= view.nbytes
                continue
            iov.append(view[skip:] if skip else view)
            skip = 0


# Sockets wrapped in this process, by identity (st_dev, st_ino): one wrapper per socket. A system
# that gives sockets no inode number (st_ino 0) leaves them unidentified and unchecked.
_claimed: set[tuple[int, int] | None] = set()


class _Entry:
    """A registered socket: our duplicate of it, its queue of sends and its counters."""

    __slots__ = (
        "closing",
        "drain_waiters",
        "failed",
        "fallback_reason",
        "handle",
        "inflight",
        "key",
        "queue",
        "sock",
        "stats",
        "udp",
        "want_write",
    )

    def __init__(
        self, handle: int, sock: socket.socket, key: tuple[int, int] | None, reason: str | None
    ) -> None:
        self.handle = handle
        self.sock = sock
        self.key = key
        self.udp = sock.type == socket.SOCK_DGRAM
        self.fallback_reason = reason
        self.queue: deque[_Send] = deque()
        self.inflight = 0
        self.failed: tuple[int, str] | None = None
        self.drain_waiters: list[asyncio.Future[Any]] = []
        self.closing = False
        self.want_write = False
        self.stats = dict.fromkeys(STATS_KEYS, 0)


def _inspect(fd: int) -> socket.socket:
    """A non-blocking duplicate of ``fd`` if zerosend can send on it; else ValueError."""
    try:
        duplicate = os.dup(fd)
    except OSError as e:
        if e.errno == errno.EBADF:
            raise _unsupported("the socket is closed (bad file descriptor)") from None
        raise
    try:
        sock = socket.socket(fileno=duplicate)
    except OSError as e:
        os.close(duplicate)
        if e.errno == errno.ENOTSOCK:
            raise _unsupported("the file descriptor is not a socket") from None
        raise
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            raise _unsupported(
                f"address family {sock.family.name} is not supported; zerosend sends on "
                "AF_INET and AF_INET6 sockets"
            )
        if sock.type not in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            raise _unsupported(
                f"socket type {sock.type.name} is not supported; use SOCK_STREAM (TCP) or "
                "SOCK_DGRAM (UDP)"
            )
        listening = hasattr(socket, "SO_ACCEPTCONN") and sock.type == socket.SOCK_STREAM
        if listening and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise _unsupported(
                "the socket is listening; wrap the connected socket that accept() returned"
            )
        try:
            sock.getpeername()
        except OSError as e:
            if e.errno != errno.ENOTCONN:
                raise
            raise _unsupported(
                "the socket is not connected; connect it (TCP or UDP) before wrapping"
            ) from None
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


@final
class Driver:
    """The core driver of one event loop (use zerosend.wrap, not this class).

    Sends go out with copying ``sendmsg`` calls as soon as they are submitted; a socket whose
    buffer is full waits for room in this driver's selector, whose descriptor the event loop
    watches (``fileno``/``dispatch``), so a wake-up writes every socket that has room.
    """

    def __init__(self, defer_taskrun: bool = False) -> None:
        # defer_taskrun: an io_uring setting; there is no io_uring here.
        self._selector = selectors.DefaultSelector()
        self._entries: dict[int, _Entry] = {}
        self._next_handle = 1
        self._pid = os.getpid()

    @property
    def forked(self) -> bool:
        """True in a process that inherited this driver through fork(): it belongs to the parent
        (the selector's epoll set is shared with it), so the child must not touch it."""
        return os.getpid() != self._pid

    def _check_not_forked(self) -> None:
        if self.forked:
            raise RuntimeError(_FORKED)

    def fileno(self) -> int:
        self._check_not_forked()
        return self._selector.fileno()

    def register(self, fd: int, backend: str | None, zerocopy_threshold: int) -> int:
        # zerocopy_threshold has nothing to decide here: every send copies.
        self._check_not_forked()
        if backend not in (None, "auto", *BACKENDS):
            raise ValueError(
                f'unknown backend "{backend}"; use "auto" or one of {", ".join(BACKENDS)}'
            )
        if fd < 0:
            raise ValueError("the socket is closed (fileno() is -1)")
        sock = _inspect(fd)
        try:
            stat = os.fstat(sock.fileno())
            key = (stat.st_dev, stat.st_ino) if stat.st_ino else None
            if key is not None and key in _claimed:
                raise _unsupported(
                    "this socket is already wrapped by zerosend (possibly with sends still in "
                    "flight); send through that wrapper, or aclose() it first"
                )
            if backend in ("io_uring", "msg_zerocopy"):
                raise BackendUnavailableError(
                    errno.EOPNOTSUPP, f'backend "{backend}" is unavailable: {_why_no_native}'
                )
        except BaseException:
            sock.close()
            raise
        if key is not None:
            _claimed.add(key)
        handle = self._next_handle
        self._next_handle += 1
        reason = None if backend == "copy" else _why_no_native
        self._entries[handle] = _Entry(handle, sock, key, reason)
        return handle

    def _entry(self, handle: int) -> _Entry:
        self._check_not_forked()
        entry = self._entries.get(handle)
        if entry is None or entry.closing:
            raise _closed()
        return entry

    def submit(self, socket: int, buffers: Any, zerocopy: bool, event_loop: Any) -> Any:
        """Submits one send; returns its future of ``event_loop`` (done if written at once)."""
        views = _export_all(buffers)
        try:
            entry = self._entry(socket)
            if entry.udp and len(views) > _IOV_MAX:
                raise ValueError(
                    f"invalid argument: a datagram can be gathered from at most {_IOV_MAX} "
                    f"buffers, got {len(views)}"
                )
        except BaseException:
            _release(views)
            raise
        future = event_loop.create_future()
        if entry.failed is not None:
            # The stream already broke: this send fails like the ones before it.
            _release(views)
            _count_failed_send(entry)
            _resolve(future, None, entry.failed)
            return _completed_in_call(event_loop, future)
        entry.inflight += 1
        entry.queue.append(_Send(future, views, requested=not zerocopy))
        if len(entry.queue) == 1:
            self._pump(entry)
        return _completed_in_call(event_loop, future)

    def flush(self) -> None:
        """Nothing to flush: sends are written when submitted."""
        self._check_not_forked()

    def submit_file(
        self, socket: int, fd: int, offset: int, count: int | None, event_loop: Any
    ) -> Any:
        if fd < 0:
            raise ValueError("the file is closed (fileno() is -1)")
        entry = self._entry(socket)
        if entry.udp:
            raise ValueError(
                "invalid argument: send_file needs a TCP socket; on UDP, read the file into a "
                "buffer and send it as datagrams with send_zc"
            )
        size = _readable_file_size(fd)
        if offset > size:
            raise ValueError(
                f"invalid argument: offset {offset} is past the end of the file ({size} bytes)"
            )
        if count is None:
            count = size - offset
        if count > size - offset:
            raise ValueError(
                f"invalid argument: offset {offset} + count {count} is past the end of the file "
                f"({size} bytes); pass count=None to send up to the end"
            )
        future = event_loop.create_future()
        if entry.failed is not None:
            _count_failed_send(entry)
            _resolve(future, None, entry.failed)
            return future
        send = _Send(future, [], requested=True)
        send.file, send.offset, send.total = os.dup(fd), offset, count
        entry.inflight += 1
        entry.queue.append(send)
        if len(entry.queue) == 1:
            self._pump(entry)
        return future

    def watch_ring(self) -> int:
        """No io_uring here: nothing for the loop to watch besides ``fileno()``."""
        self._check_not_forked()
        return -1

    def dispatch_ring(self, event_loop: Any = None) -> None:
        """No io_uring here: never called (``watch_ring`` gave no descriptor)."""
        self._check_not_forked()

    @property
    def ring_setup(self) -> str | None:
        """No io_uring here."""
        return None

    def register_pool(self, pool: PoolMemory) -> None:
        """Nothing to register: pool buffers are sent like any buffer here."""
        self._check_not_forked()

    def unregister_pool(self, pool: PoolMemory) -> None:
        """Nothing was registered."""
        self._check_not_forked()

    def dispatch(self) -> None:
        self._check_not_forked()
        for key, _ in self._selector.select(0):
            self._pump(key.data)

    def drain(self, socket: int, future: Any) -> None:
        self._check_not_forked()
        entry = self._entries.get(socket)
        if entry is None or entry.inflight == 0:
            _resolve(future, None, None)
        else:
            entry.drain_waiters.append(future)

    def close(self, socket: int) -> None:
        if self.forked:
            return  # the parent's: touching its selector would change the parent's epoll set
        entry = self._entries.get(socket)
        if entry is None or entry.closing:
            return
        entry.closing = True
        if entry.inflight == 0:
            self._remove(entry)

    def backend(self, socket: int) -> str:
        self._entry(socket)
        return "copy"

    def fallback_reason(self, socket: int) -> str | None:
        return self._entry(socket).fallback_reason

    def inflight(self, socket: int) -> int:
        return self._entry(socket).inflight

    def stats(self, socket: int) -> dict[str, int]:
        return dict(self._entry(socket).stats)

    def _pump(self, entry: _Entry) -> None:
        """Writes the head of the socket's queue until it is empty or the kernel says wait."""
        while entry.queue:
            if entry.queue[0].file is not None:
                if not self._write_file(entry, entry.queue[0]):
                    return
                continue
            iov: list[memoryview] = []
            if entry.udp:
                entry.queue[0].append_remaining(iov)  # one send, one datagram
            else:
                # Sends queued behind each other on a stream go in one sendmsg.
                for send in entry.queue:
                    if send.file is not None:
                        break
                    send.append_remaining(iov)
                    if len(iov) >= _IOV_MAX:
                        break
                if not iov:
                    self._advance(entry, 0)  # empty sends: done without a system call
                    continue
                if _BATCH_REORDERED:
                    iov.reverse()
            try:
                n = entry.sock.sendmsg(iov, (), _NOSIGNAL)
            except BlockingIOError:
                self._wait_writable(entry)
                return
            except OSError as e:
                self._send_failed(entry, e.errno or errno.EIO)
                continue
            finally:
                iov.clear()  # drop the slices, so finished sends can release their exports
            if n == 0 and not entry.udp:
                # A stream that accepts nothing without an error: wait for room as for EAGAIN.
                self._wait_writable(entry)
                return
            self._advance(entry, n)
        if entry.want_write:
            entry.want_write = False
            self._selector.unregister(entry.sock)

    def _write_file(self, entry: _Entry, send: _Send) -> bool:
        """One sendfile of the file send at the head; False when the socket must wait."""
        assert send.file is not None
        remaining = send.total - send.written
        if remaining == 0:
            self._advance(entry, 0)
            return True
        offset = send.offset + send.written
        try:
            n = os.sendfile(entry.sock.fileno(), send.file, offset, min(remaining, 1 << 30))
        except BlockingIOError:
            self._wait_writable(entry)
            return False
        except OSError as e:
            self._send_failed(entry, e.errno or errno.EIO)
            return True
        if n == 0:
            # The file was truncated after send_file checked its size: the stream is torn.
            self._send_failed(entry, errno.EIO)
            return True
        self._advance(entry, n)
        return True

    def _wait_writable(self, entry: _Entry) -> None:
        entry.stats["eagain_waits"] += 1
        if not entry.want_write:
            entry.want_write = True
            self._selector.register(entry.sock, selectors.EVENT_WRITE, entry)

    def _advance(self, entry: _Entry, n: int) -> None:
        """Credits ``n`` accepted bytes to the sends at the head of the queue."""
        while entry.queue:
            send = entry.queue[0]
            take = min(send.total - send.written, n)
            send.written += take
            n -= take
            if send.written < send.total and not entry.udp and not _SHORT_SEND_RESOLVES:
                if take:
                    entry.stats["short_sends"] += 1
                return
            entry.queue.popleft()
            self._finish(entry, send, None)
            if entry.udp:
                return

    def _send_failed(self, entry: _Entry, code: int) -> None:
        error = (
            code,
            f"sending on the socket: {errno.errorcode.get(code, '?')}: {os.strerror(code)}",
        )
        if entry.udp or _STREAM_SURVIVES_FAILURE:
            # A datagram failure leaves the socket usable: fail just this send.
            self._finish(entry, entry.queue.popleft(), error)
            return
        # On a stream any failure leaves a hole or a torn message, so the stream ends.
        entry.failed = error
        while entry.queue:
            self._finish(entry, entry.queue.popleft(), error)

    def _finish(self, entry: _Entry, send: _Send, error: tuple[int, str] | None) -> None:
        _release(send.views)  # the kernel has the bytes: let a bytearray resize again
        if send.file is not None:
            os.close(send.file)
        entry.inflight -= 1
        stats = entry.stats
        stats["sends"] += 1
        if error is not None:
            stats["errors"] += 1
        elif send.file is not None:
            stats["bytes_sendfile"] += send.total
        else:
            stats["bytes_copied"] += send.total
            reason = "bytes_copied_requested" if send.requested else "bytes_copied_backend"
            stats[reason] += send.total
        _resolve(send.future, SendResult(send.total, _CLAIMS_ZEROCOPY), error)
        if entry.inflight == 0:
            waiters, entry.drain_waiters = entry.drain_waiters, []
            for waiter in waiters:
                _resolve(waiter, None, None)
            if entry.closing:
                self._remove(entry)

    def _remove(self, entry: _Entry) -> None:
        del self._entries[entry.handle]
        if entry.want_write:
            entry.want_write = False
            self._selector.unregister(entry.sock)
        entry.sock.close()
        _claimed.discard(entry.key)
        for waiter in entry.drain_waiters:
            _resolve(waiter, None, None)

    def __del__(self) -> None:
        if getattr(self, "_pid", None) != os.getpid():
            return  # inherited through fork(): the parent's to close
        for entry in getattr(self, "_entries", {}).values():
            entry.sock.close()
            _claimed.discard(entry.key)
        if hasattr(self, "_selector"):
            self._selector.close()


def _completed_in_call(event_loop: Any, future: Any) -> Any:
    """A send's awaitable: a :class:`CompletedSend` if it already finished, else its future."""
    if not future.done():
        return future
    error = future.exception()
    return CompletedSend(event_loop, None if error else future.result(), error)


def _count_failed_send(entry: _Entry) -> None:
    """A send refused because its stream already broke still counts as a send that failed."""
    entry.stats["sends"] += 1
    entry.stats["errors"] += 1


def _resolve(future: Any, result: Any, error: tuple[int, str] | None) -> None:
    """Sets the future's result or exception unless it was cancelled meanwhile."""
    if future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(OSError(*error))  # the errno picks the subclass (BrokenPipeError...)


@final
class PoolMemory:
    """``count`` buffers of ``size`` bytes: plain page-aligned memory, neither locked nor
    registered with the kernel."""

    def __init__(self, count: int, size: int, hugepages: bool = False) -> None:
        if count == 0 or size == 0:
            raise ValueError("a buffer pool needs count >= 1 and size >= 1")
        self._count = count
        self._size = size
        self._hugepages_fallback = (
            f"huge pages are not available ({_why_no_native}); using normal pages"
            if hugepages
            else None
        )

    @property
    def count(self) -> int:
        return self._count

    @property
    def size(self) -> int:
        return self._size

    @property
    def hugepages(self) -> bool:
        return False

    @property
    def hugepages_fallback(self) -> str | None:
        return self._hugepages_fallback

    def buffer(self, index: int, on_free: Callable[[int], object]) -> PoolBuffer:
        if not 0 <= index < self._count:
            raise ValueError(f"buffer index {index} out of range (pool of {self._count})")
        return PoolBuffer(self._size, index, on_free)


@final
class PoolBuffer(mmap.mmap):
    """One writable pool buffer; fill it through ``memoryview(buf)``.

    Every acquire maps fresh anonymous pages (page-aligned). ``release()`` unmaps them unless a
    send or a memoryview still uses them; then they stay mapped for that user alone, and the
    next acquire of this slot gets new pages, so no one ever writes into memory still being sent.
    """

    __slots__ = ("_index", "_on_free", "_released", "_size")
    _index: int
    _on_free: Callable[[int], object] | None
    _released: bool
    _size: int

    def __new__(cls, size: int, index: int, on_free: Callable[[int], object]) -> PoolBuffer:
        self = super().__new__(cls, -1, size, flags=mmap.MAP_PRIVATE)
        self._index = index
        self._size = size
        self._released = False
        self._on_free = on_free
        return self

    @property
    def index(self) -> int:
        return self._index

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        try:
            self.close()
        except BufferError:
            pass  # still exported: the pages live on until the last view of them goes
        on_free, self._on_free = self._on_free, None
        if on_free is not None:
            on_free(self._index)

    def __del__(self) -> None:
        # Garbage-collected without release(): it goes back to its pool now rather than never.
        if not getattr(self, "_released", True):
            self.release()

    def __repr__(self) -> str:
        state = " released" if self._released else ""
        return f"<zerosend.PoolBuffer index={self._index} size={self._size}{state}>"
