"""The asyncio face of the driver: `wrap()` and `Socket`.

One concept in one module: the wrapped socket, from what ``wrap()`` checks and which loop's
driver it registers with, to the native send methods bound at construction (with the
docstrings ``help()`` shows for them) and the ``send_file`` argument checks they fall back on.
"""

from __future__ import annotations

import asyncio
import functools
import io
import os
import socket
import sys
import threading
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final, Literal, Protocol, TypeAlias

from . import _native, _reaper
from ._abort import check_timeout, reset, wait_at_most
from ._calibration import DEFAULT_THRESHOLD, Thresholds
from ._calibration import load as load_thresholds
from ._types import Buffers, FallbackCode, SendFuture, fallback_code

#: What ``wrap(backend=...)`` accepts: "auto" or one of the extension's backends, best first.
BACKENDS: Final = ("auto", *_native.BACKENDS)
#: The same names for type checkers (tests/test_package.py holds the two equal).
BackendName: TypeAlias = Literal["auto", "io_uring", "msg_zerocopy", "copy"]
#: Environment variable that overrides ``backend="auto"`` (for example to force "copy").
BACKEND_ENV: Final = "ZEROSEND_BACKEND"
#: Linux's UDP_SEGMENT socket option (UDP GSO; the socket module has no name for it before 3.12).
UDP_SEGMENT: Final = getattr(socket, "UDP_SEGMENT", 103)
#: The largest UDP payload of one IPv4 datagram: a segment size above it could not be sent.
MAX_UDP_PAYLOAD: Final = 65507


class Loop(Protocol):
    """What a :class:`Socket` needs from its event loop: an asyncio loop, or a trio run's face."""

    def create_future(self) -> Any: ...

    def call_soon(self, callback: Any, /) -> Any: ...

    def add_reader(self, fd: int, callback: Any, /) -> Any: ...


# One driver per event loop; its descriptor is watched with add_reader, so completions are
# reaped on the loop thread in batches, with no thread hop per send.
_drivers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _native.Driver] = (
    weakref.WeakKeyDictionary()
)


def _driver_for(
    loop: asyncio.AbstractEventLoop, defer_taskrun: bool | None = None
) -> _native.Driver:
    driver = _drivers.get(loop)
    # A driver inherited through fork() belongs to the parent (shared epoll set and io_uring);
    # a child that runs this same loop object gets a driver of its own.
    if driver is None or driver.forked:
        driver = _native.Driver(defer_taskrun=bool(defer_taskrun))
        dispatch = driver.dispatch
        loop.add_reader(driver.fileno(), dispatch)
        # The loop drops its reader callback when it is closed (or collected): from then on
        # nothing polls the driver, so the reaper takes it over. Not at exit: no thread may
        # start then, and the process's end releases everything anyway.
        weakref.finalize(dispatch, _loop_gone, driver).atexit = False
        _drivers[loop] = driver
    else:
        _check_defer_taskrun(driver, defer_taskrun)
    return driver


def _loop_gone(driver: _native.Driver) -> None:
    if not driver.forked:  # a fork child's copy belongs to the parent
        _reaper.adopt(driver)


def _check_defer_taskrun(driver: _native.Driver, defer_taskrun: bool | None) -> None:
    """The loop's driver is made by its first wrap(): a later one cannot ask for another ring."""
    if defer_taskrun is None:
        return
    current = bool(getattr(driver, "defer_taskrun", False))
    if current != defer_taskrun:
        raise ValueError(
            f"defer_taskrun={defer_taskrun}: this event loop's io_uring was already set up "
            f"with defer_taskrun={current} by an earlier wrap() (or BufferPool use); every "
            "wrap() on one loop shares it (pass the same value, or None to take the loop's)"
        )


def _resolve_backend(backend: str) -> str:
    # Backend names are checked by the driver; only the environment's needs its own message.
    if backend == "auto":
        forced = os.environ.get(BACKEND_ENV, "").strip()
        if forced:
            if forced not in BACKENDS:
                raise ValueError(
                    f"{BACKEND_ENV}={forced!r} is not a backend; use one of {', '.join(BACKENDS)}"
                )
            return forced
    return backend


def wrap(
    sock: socket.socket,
    *,
    backend: BackendName = "auto",
    zerocopy_threshold: int = DEFAULT_THRESHOLD,
    udp_segment: int | None = None,
    defer_taskrun: bool | None = None,
) -> Socket:
    """Wrap a connected, non-blocking TCP (IPv4/IPv6) or connected UDP socket.

    Must be called on a running asyncio event loop (the default loop or uvloop), or under trio
    (directly or through anyio); the returned :class:`Socket` sends on that loop or trio run, and
    its sends return awaitables of that library (under trio, futures trio can await).
    ``backend`` picks how zero-copy sends reach the kernel:
    ``"auto"`` (the best this kernel offers, overridable with the ``ZEROSEND_BACKEND``
    environment variable), ``"io_uring"``, ``"msg_zerocopy"`` or ``"copy"``. Asking for a
    backend the kernel lacks raises :class:`BackendUnavailableError` naming the reason. Sends
    smaller than ``zerocopy_threshold`` bytes go by copy, where zero-copy costs more than it saves.

    With ``"auto"`` and the default threshold, a TCP socket uses the threshold calibrated on
    this machine by ``python -m zerosend calibrate`` if there is one (``fallback_reason`` says
    so; ``python -m zerosend`` prints the thresholds in use and where they came from).

    ``"auto"`` sends by copy to a peer on this host (loopback copies on delivery anyway, so
    zero-copy would only add work); ``fallback_reason`` says so.

    zerosend keeps its own duplicate of the descriptor while sends are in flight; write to the
    socket only through the returned object from now on. Reading it (``loop.sock_recv_into``)
    is fine. A socket has one wrapper at a time: wrapping it again raises ``ValueError`` until
    the first wrapper was closed (or garbage-collected) and its sends were released.

    ``udp_segment`` (UDP only) turns on UDP GSO (``UDP_SEGMENT``) for the socket: each send is
    one batch the kernel cuts into datagrams of ``udp_segment`` bytes (the last may be shorter),
    so one large zero-copy send carries many MTU-sized datagrams. A batch holds at most 64
    segments and 65,507 bytes in all; the kernel refuses larger ones (``EINVAL``/``EMSGSIZE``).

    ``defer_taskrun=True`` sets the event loop's io_uring up with ``IORING_SETUP_SINGLE_ISSUER
    | DEFER_TASKRUN | TASKRUN_FLAG`` (Linux 6.1; where the kernel refuses it the ring runs
    without, and says why). The ring belongs to the loop, shared by all its sockets, and is set
    up by the loop's first ``wrap()``: a later ``wrap()`` on that loop asking for the other
    setting raises ``ValueError``; ``None`` (the default) takes the loop's, off for its first.
    Off by default because it measured slower on the rig (a send that waits for socket room
    moves on only when the loop enters the ring). Only the loop's thread may send on it; under
    trio it is not available.
    """
    if not isinstance(sock, socket.socket):
        raise TypeError(f"wrap() needs a socket.socket, not {type(sock).__name__!r}")
    if sock.fileno() < 0:
        raise ValueError("wrap() needs an open socket; this one is closed")
    if sock.gettimeout() != 0.0:
        raise ValueError("the socket must be non-blocking: call sock.setblocking(False) first")
    if isinstance(zerocopy_threshold, bool) or not isinstance(zerocopy_threshold, int):
        raise TypeError("zerocopy_threshold must be an int (bytes)")
    if zerocopy_threshold < 0:
        raise ValueError("zerocopy_threshold must be >= 0")
    if defer_taskrun is not None and not isinstance(defer_taskrun, bool):
        raise TypeError(f"defer_taskrun must be a bool or None, not {defer_taskrun!r}")
    if udp_segment is not None:
        _set_udp_segment(sock, udp_segment)
    chosen = _resolve_backend(backend)
    calibrated = None
    if (
        chosen == "auto"
        and zerocopy_threshold == DEFAULT_THRESHOLD
        and sock.type == socket.SOCK_STREAM
    ):
        # The defaults: this machine's calibration, if one was made, decides the threshold.
        calibrated = _thresholds()
        if calibrated.source == "calibrated":
            measured = calibrated.tcp_zerocopy_threshold
            zerocopy_threshold = NEVER if measured is None else measured
        else:
            calibrated = None
    loop, driver = _loop_and_driver(defer_taskrun)
    handle = driver.register(sock.fileno(), chosen, zerocopy_threshold)
    # The driver's io_uring (made by the first io_uring socket) is watched by the loop itself:
    # a completion then wakes the loop once and is read from the ring's shared memory.
    ring = driver.watch_ring()
    if ring >= 0:
        # Given the loop, a wake-up that resolves futures also schedules the flush of what
        # their tasks send next, in the same turn as those tasks.
        loop.add_reader(ring, functools.partial(driver.dispatch_ring, loop))
    wrapped = Socket(sock, loop, driver, handle)
    if calibrated is not None and wrapped._backend != "copy":
        what = (
            "every send copies: zero-copy did not pay at any size measured"
            if calibrated.tcp_zerocopy_threshold is None
            else f"zero-copy from {zerocopy_threshold} bytes"
        )
        note = f"calibrated on this machine, {what} ({calibrated.detail})"
        reason = wrapped._fallback_reason
        wrapped._fallback_reason = f"{reason}; {note}" if reason else note
    return wrapped


#: A threshold no send reaches: every send copies.
NEVER: Final = 1 << 62
_cached_thresholds: Thresholds | None = None


def _thresholds() -> Thresholds:
    """This machine's calibration (read once per process), or the default."""
    global _cached_thresholds
    if _cached_thresholds is None:
        _cached_thresholds = load_thresholds()
    return _cached_thresholds


def _set_udp_segment(sock: socket.socket, size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"udp_segment must be an int (bytes per datagram), not {size!r}")
    if not 1 <= size <= MAX_UDP_PAYLOAD:
        raise ValueError(f"udp_segment must be between 1 and {MAX_UDP_PAYLOAD} bytes, not {size}")
    if sock.type != socket.SOCK_DGRAM:
        raise ValueError("udp_segment is for UDP sockets; this one is not")
    sock.setsockopt(socket.IPPROTO_UDP, UDP_SEGMENT, size)


# The asyncio loop last seen running on each thread. asyncio.get_running_loop() makes a getpid()
# system call on Python 3.11 (to tell a fork child); this cache spares it on every pool acquire:
# one thread runs one loop at a time, so a loop seen on this thread that is still running is the
# running one. A fork child starts with an empty cache.
_running_loops: weakref.WeakValueDictionary[int, asyncio.AbstractEventLoop] = (
    weakref.WeakValueDictionary()
)
os.register_at_fork(after_in_child=_running_loops.clear)


def _loop_and_driver(defer_taskrun: bool | None = None) -> tuple[Loop, _native.Driver]:
    """The running event loop (asyncio, uvloop, or a trio run) and its driver."""
    thread = threading.get_ident()
    seen = _running_loops.get(thread)
    if seen is not None and seen.is_running():
        return seen, _driver_for(seen, defer_taskrun)
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        _running_loops[thread] = loop
        return loop, _driver_for(loop, defer_taskrun)
    # Not asyncio: trio (directly, or as anyio's backend)? sniffio comes with trio and anyio.
    library = None
    if "trio" in sys.modules:
        import sniffio

        try:
            library = sniffio.current_async_library()
        except sniffio.AsyncLibraryNotFoundError:
            pass
    if library == "trio":
        from ._trio import driver_for_run

        if defer_taskrun:
            raise ValueError("defer_taskrun=True is for asyncio event loops; not under trio")
        return driver_for_run()
    raise RuntimeError(
        "wrap() must be called from a coroutine running on an asyncio event loop or under trio"
        + (f" (running under {library}, which zerosend does not support)" if library else "")
    )


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


FileSource: TypeAlias = int | _HasFileno


def _file_descriptor(file: FileSource) -> int:
    if isinstance(file, bool):
        raise TypeError("send_file() needs a file object or a file descriptor, not a bool")
    if isinstance(file, int):
        return file
    fileno = getattr(file, "fileno", None)
    if fileno is None:
        raise TypeError(
            f"send_file() needs a file object (with fileno()) or a file descriptor, "
            f"not {type(file).__name__!r}; send buffers with send_zc()"
        )
    try:
        fd = fileno()
    except io.UnsupportedOperation as error:  # io.BytesIO and the like have no descriptor
        raise TypeError(
            f"send_file() needs a file backed by a descriptor; {type(file).__name__} has none "
            f"({error}); send its bytes with send_zc()"
        ) from None
    except ValueError as error:  # a closed Python file
        raise ValueError(f"send_file() got a closed file: {error}") from None
    if not isinstance(fd, int):
        raise TypeError(f"{type(file).__name__}.fileno() returned {fd!r}, not an int")
    return fd


class _SendFile(Protocol):
    def __call__(
        self, file: FileSource, offset: int = 0, count: int | None = None
    ) -> SendFuture: ...


def _submit_file(
    driver: _native.Driver,
    handle: int,
    loop: Loop,
    file: FileSource,
    offset: int = 0,
    count: int | None = None,
) -> SendFuture:
    """``send_file`` where the driver has no native one (the pure-Python stand-in)."""
    fd = _send_file_arguments(file, offset, count)
    sent: SendFuture = driver.submit_file(handle, fd, offset, count, loop)
    return sent


def _check_byte_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int (bytes), not {type(value).__name__!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


_SEND_ZC_DOC: Final = """Send ``buf`` without copying it; resolves when the kernel released it.

``send_zc(buf)``: ``buf`` is any bytes-like object or a list/tuple of them (one vectored send:
one datagram on UDP). The send is submitted now, in call order; the returned future resolves to
a :class:`SendResult` only after the kernel let go of every page, and until then the buffer
export is held (a bytearray cannot be resized). Cancelling the future or the task awaiting it
does not stop the send: the bytes still go out whole and the buffer is held until the kernel
releases it. Errors are raised as ``OSError`` subclasses with ``errno``.

On asyncio the future of a send in flight is a native ``InFlightSend`` (an asyncio-compatible
future: ``await``, ``asyncio.gather``/``wait``/``wait_for``/``shield``, done callbacks). A send
the kernel took whole inside the call (a copy: below ``zerocopy_threshold``, or the copy
backend) returns a ``CompletedSend``: already done, with the methods of a done future, and
awaiting it does not even yield to the event loop. See :class:`SendFuture`.

A native method bound to this socket (no Python frame per send)."""

_SEND_DOC: Final = """Send all of ``buf`` by copy, in the same ordered stream as :meth:`send_zc`.

``send(buf)``: like ``socket.sendall`` (not ``socket.send``): the whole buffer goes, or an error
is raised; there is no partial count to loop on. Resolves once the kernel has copied all of it
(``zerocopy`` is False). Returns what :meth:`send_zc` returns."""

_SEND_FILE_DOC: Final = """Send part of a file with ``sendfile(2)``, in the same ordered stream.

``send_file(file, offset=0, count=None)`` sends ``count`` bytes of ``file`` from ``offset`` (to
its end if ``count`` is None): from the page cache straight to the socket, in the same ordered
stream as :meth:`send_zc` and :meth:`send`. TCP only.

``file`` is a binary file object open for reading (anything with ``fileno()``) or a descriptor;
its own position is neither used nor moved, and zerosend holds a duplicate of its descriptor
until the send completes, so closing it meanwhile is safe. The file is checked first (a regular
file, readable, ``offset + count`` within its size): a bad one raises with nothing sent.
Resolves to a :class:`SendResult` with ``zerocopy=False`` (the bytes never pass through user
memory; ``stats["bytes_sendfile"]`` counts them) once the kernel took all of them. Truncating
the file while it is sent ends the stream with an error.

Unlike ``socket.sendfile`` and ``loop.sock_sendfile``, it returns a :class:`SendResult` rather
than a count, does not move the file's position (``file.tell()`` is unchanged; pass
``offset``), and sends every byte asked for or raises."""


def _send_file_arguments(file: FileSource, offset: int, count: int | None) -> int:
    """Checks ``send_file``'s arguments in order (raising the error that names the bad one) and
    returns the file's descriptor; the native ``send_file`` calls it only off its common path."""
    fd = _file_descriptor(file)
    _check_byte_count("offset", offset)
    if count is not None:
        _check_byte_count("count", count)
    return fd


class Socket:
    """A socket whose sends complete only when the kernel released their buffers.

    Create it with :func:`wrap`.
    """

    # send_zc, send and send_file are native callables bound to this socket at construction
    # (the driver's Sender/FileSender): a send runs no Python frame. The slots' docstrings are
    # what help() shows for them.
    __slots__ = {
        "__weakref__": None,
        "_backend": None,
        "_closed": None,
        "_driver": None,
        "_fallback_reason": None,
        "_final_stats": None,
        "_handle": None,
        "_loop": None,
        "_sock": None,
        "send": _SEND_DOC,
        "send_file": _SEND_FILE_DOC,
        "send_zc": _SEND_ZC_DOC,
    }

    send_zc: Callable[[Buffers], SendFuture]
    send: Callable[[Buffers], SendFuture]
    send_file: _SendFile

    def __init__(
        self,
        sock: socket.socket,
        loop: Loop,
        driver: _native.Driver,
        handle: int,
    ) -> None:
        self._sock = sock
        self._loop = loop
        self._driver = driver
        self._handle = handle
        self._closed = False
        self._final_stats: dict[str, int] = {}
        self._backend = driver.backend(handle)
        self._fallback_reason = driver.fallback_reason(handle)
        if hasattr(driver, "sender"):
            self.send_zc = driver.sender(handle, loop, True)
            self.send = driver.sender(handle, loop, False)
            self.send_file = driver.file_sender(handle, loop, _send_file_arguments)
        else:  # the pure-Python stand-in for the extension
            self.send_zc = functools.partial(driver.submit, handle, zerocopy=True, event_loop=loop)
            self.send = functools.partial(driver.submit, handle, zerocopy=False, event_loop=loop)
            self.send_file = functools.partial(_submit_file, driver, handle, loop)

    async def drain(self) -> None:
        """Wait until every send submitted so far has been released by the kernel."""
        if self._closed:
            return
        future = self._loop.create_future()
        self._driver.drain(self._handle, future)
        await future

    def abort(self) -> None:
        """End the connection now with a reset (RST), as asyncio's ``transport.abort()``.

        Bytes not yet acknowledged are dropped and every send in flight or submitted later
        fails (``ConnectionResetError``, ``BrokenPipeError``); each still resolves only once
        the kernel released its buffer, which now comes without waiting for the peer. The
        socket stays open until :meth:`aclose`. On UDP it disconnects the socket.
        """
        if not self._closed:
            reset(self._sock)

    async def aclose(self, timeout: float | None = None) -> None:
        """Wait for all sends to be released, then close the socket.

        With ``timeout`` (seconds), a peer that has not taken every byte by then is cut off
        with :meth:`abort`, so closing never waits longer than that for the peer (the buffers
        are still released by the kernel before this returns).
        """
        limit = check_timeout(timeout)
        if self._closed:
            return
        if limit is not None and not await self._drained_within(limit):
            self.abort()
        await self.drain()
        self._final_stats = self.stats
        self._closed = True
        self._driver.close(self._handle)
        self._sock.close()

    async def _drained_within(self, timeout: float) -> bool:
        future = self._loop.create_future()
        self._driver.drain(self._handle, future)
        return await wait_at_most(future, timeout, self._loop)

    async def __aenter__(self) -> Socket:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # Sends in flight still finish; the driver closes its descriptor after the last release.
        if not getattr(self, "_closed", True):
            self._closed = True
            self._driver.close(self._handle)

    @property
    def socket(self) -> socket.socket:
        """The wrapped socket (read from it freely; write only through this object)."""
        return self._sock

    @property
    def backend(self) -> str:
        """The backend in use: "io_uring", "msg_zerocopy" or "copy"."""
        return self._backend

    @property
    def fallback_reason(self) -> str | None:
        """Why ``backend="auto"`` could not use a better backend, or None."""
        return self._fallback_reason

    @property
    def fallback_code(self) -> FallbackCode | None:
        """:attr:`fallback_reason` as a :class:`FallbackCode` to switch on, or None."""
        return fallback_code(self._fallback_reason, _native.__name__ == "zerosend._native")

    @property
    def inflight(self) -> int:
        """Sends submitted whose buffers the kernel has not released yet."""
        if self._closed:
            return 0
        return self._driver.inflight(self._handle)

    @property
    def stats(self) -> dict[str, int]:
        """Counters: sends, bytes_zerocopy, bytes_copied (and why), notifications, ..."""
        if self._closed:
            return dict(self._final_stats)
        return self._driver.stats(self._handle)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"backend={self.backend} inflight={self.inflight}"
        return f"<zerosend.Socket fd={self._sock.fileno()} {state}>"
