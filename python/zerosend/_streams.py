"""asyncio streams whose writes are zero-copy: `open_connection`, `start_server`, `StreamWriter`.

The shapes are asyncio's (``reader`` is an ``asyncio.StreamReader``), so the pipelined pattern is
the natural one: ``writer.write_zc(buf)`` submits at once and returns a future that resolves at
the kernel's release, and ``await writer.drain()`` applies back-pressure on the bytes the kernel
has not released yet. Many sends stay in flight without a task per send.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import os
import socket
import warnings
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, Final, TypeAlias, cast

from . import _mutant
from ._abort import check_timeout
from ._native import SendResult
from ._socket import (
    BACKENDS,
    BackendName,
    FileSource,
    Socket,
    _file_descriptor,
    wrap,
)
from ._types import Buffer, Buffers, SendFuture

#: asyncio's default for StreamReader's buffer limit (64 KiB).
DEFAULT_LIMIT: Final = 1 << 16
#: Unreleased bytes above which ``drain()`` waits. Zero-copy bytes stay unreleased until the peer
#: acknowledged them, so this bounds the bytes in flight across a round trip: it has to cover the
#: bandwidth-delay product, far more than the 64 KiB asyncio allows for copied bytes.
DEFAULT_HIGH_WATER: Final = 4 << 20
#: The largest read of one readiness event (asyncio reads 256 KiB).
READ_SIZE: Final = 256 << 10
#: Seconds to stop accepting after the process or system ran out of descriptors or memory.
ACCEPT_RETRY_DELAY: Final = 1.0
# Deliberate faults of a mutants build (``_mutant``); always False in a release build
_UNRELEASED_UNCOUNTED = _mutant.on("stream_unreleased_uncounted")
_ERROR_DROPPED = _mutant.on("stream_error_dropped")
_RESOLVES_AT_SUBMIT = _mutant.on("stream_resolves_at_submit")

ClientConnectedCallback: TypeAlias = Callable[
    [asyncio.StreamReader, "StreamWriter"], Awaitable[None] | None
]

_TLS_REFUSED = (
    "zerosend streams do not do TLS: encryption writes a new copy of every byte, so nothing "
    "could be sent zero-copy; use asyncio.open_connection/start_server with ssl= instead"
)


def _nbytes(buf: Buffers, caller: str) -> int:
    """The bytes ``buf`` (a buffer, or a list/tuple of them) holds, with a clear error if it is
    not made of buffers."""
    if type(buf) in (bytes, bytearray):
        return len(cast("bytes", buf))
    parts = buf if isinstance(buf, list | tuple) else (buf,)
    total = 0
    for part in parts:
        try:
            view = memoryview(part)
        except TypeError:
            hint = " (encode a str first)" if isinstance(part, str) else ""
            raise TypeError(
                f"{caller}() needs a bytes-like object (bytes, bytearray, memoryview, mmap, "
                f"array, a BufferPool buffer) or a list/tuple of them, not "
                f"{type(part).__name__!r}{hint}"
            ) from None
        with view:
            total += view.nbytes
    return total


def _owned(data: Any, caller: str) -> bytes:
    """``data`` as bytes nobody can change while it waits for the kernel: ``write()`` copies, so
    the caller may reuse its buffer at once, as with asyncio."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, list | tuple):
        raise TypeError(f"{caller}() takes one bytes-like object; use writelines() for several")
    _nbytes(data, caller)  # the clear TypeError for a non-buffer
    with memoryview(data) as view:
        return view.tobytes()


class _SocketFeed(asyncio.ReadTransport):
    """Reads the socket into a StreamReader, which pauses and resumes it (its flow control).

    It reads the caller's socket object while the driver sends through its own duplicate of the
    descriptor, so reading never waits for sends, nor sends for reading.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, reader: asyncio.StreamReader
    ) -> None:
        super().__init__()
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._reader = reader
        self._reading = False
        self._done = False
        reader.set_transport(self)
        self.resume_reading()

    def is_reading(self) -> bool:
        return self._reading

    def pause_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def resume_reading(self) -> None:
        if not self._reading and not self._done:
            self._loop.add_reader(self._fd, self._read_ready)
            self._reading = True

    def is_closing(self) -> bool:
        return self._done

    def close(self) -> None:
        """Stops reading for good; what was read stays readable, then the reader sees EOF."""
        if not self._done:
            self._stop()
            self._reader.feed_eof()

    def _stop(self) -> None:
        self.pause_reading()
        self._done = True

    def _read_ready(self) -> None:
        try:
            data = self._sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._stop()
            self._reader.set_exception(exc)
            return
        if data:
            self._reader.feed_data(data)
        else:
            self._stop()
            self._reader.feed_eof()


class StreamWriter:
    """The write side of a zerosend stream; ``asyncio.StreamWriter``'s shape plus ``write_zc``.

    Every write goes into one ordered byte stream: ``write_zc`` without copying, ``write`` and
    ``writelines`` by copy. The *write buffer* is the bytes written and not yet released by the
    kernel (a zero-copy send is released when the peer acknowledged it, a copy when the kernel
    took it); ``drain()`` waits while it is above the high-water mark. An error of the stream
    is raised by the next ``write*()`` and ``drain()``, and by ``wait_closed()`` if nothing
    raised it yet, so it is never lost even if every future was ignored.

    Create it with :func:`open_connection` or :func:`start_server`.
    """

    def __init__(self, zs: Socket, reader: asyncio.StreamReader, feed: _SocketFeed) -> None:
        self._zs = zs
        self._loop = asyncio.get_running_loop()
        self._reader = reader
        self._feed = feed
        sock = zs.socket
        self._extra: dict[str, Any] = {"socket": sock, "zerosend": zs}
        for name, query in (("peername", sock.getpeername), ("sockname", sock.getsockname)):
            try:
                self._extra[name] = query()
            except OSError:  # the peer is already gone; reading and writing will say so
                self._extra[name] = None
        self._high = DEFAULT_HIGH_WATER
        self._low = DEFAULT_HIGH_WATER // 4
        self._unreleased = 0  # bytes written, not yet released by the kernel
        self._pending = 0  # sends not yet released
        self._paused = False  # above high water, until back at low water
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._idle_callbacks: list[Callable[[], object]] = []  # run when nothing is pending
        self._error: BaseException | None = None
        self._error_raised = False
        self._eof = False
        self._closing = False
        self._aborted = False
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._closer: asyncio.Task[None] | None = None
        # Release callbacks run in one context of their own rather than a copy per send.
        self._context = contextvars.Context()

    # -- writing -----------------------------------------------------------------------------

    def write_zc(self, buf: Buffers) -> SendFuture:
        """Send ``buf`` without copying it; the future resolves when the kernel released it.

        ``buf`` is any bytes-like object or a list/tuple of them (one vectored send). It is
        submitted now, in order with every other write, and never waits: pace the writes with
        ``await drain()`` or with the futures. Leave ``buf`` unmodified until its future
        resolved (``bytes`` and ``BufferPool`` buffers need no care). You may ignore the
        future: an error is also raised by the next ``write*()`` or ``drain()``. Cancelling it
        does not stop the send.
        """
        self._check_writable("write_zc")
        nbytes = _nbytes(buf, "write_zc")
        return self._tracked(self._submit(self._zs.send_zc, buf), nbytes)

    def send_file(self, file: FileSource, offset: int = 0, count: int | None = None) -> SendFuture:
        """Send ``count`` bytes of ``file`` from ``offset`` (to its end if ``count`` is None) with
        ``sendfile(2)``, in the same ordered stream as every write; see
        :meth:`zerosend.Socket.send_file`. Submitted now, never waits; the bytes count towards
        ``drain()``'s back-pressure until the kernel took them."""
        self._check_writable("send_file")
        sent = self._submit(lambda _: self._zs.send_file(file, offset, count), b"")
        # The socket checked the file, so its size is there to read.
        nbytes = count if count is not None else os.fstat(_file_descriptor(file)).st_size - offset
        return self._tracked(sent, max(nbytes, 0))

    def write(self, data: Buffer) -> None:
        """Send a copy of ``data`` in the same ordered stream; ``data`` may be reused at once."""
        self._check_writable("write")
        owned = _owned(data, "write")
        if owned:
            self._track(self._submit(self._zs.send, owned), len(owned), None)

    def writelines(self, data: Iterable[Buffer]) -> None:
        """Send a copy of every buffer of ``data``, joined, in the same ordered stream."""
        self._check_writable("writelines")
        try:
            joined = b"".join(data)
        except TypeError as exc:
            raise TypeError(
                f"writelines() needs an iterable of bytes-like objects: {exc}"
            ) from None
        if joined:
            self._track(self._submit(self._zs.send, joined), len(joined), None)

    def _submit(
        self, send: Callable[[Buffers], SendFuture], buf: Buffers
    ) -> asyncio.Future[SendResult]:
        try:
            # On asyncio a send is an asyncio.Future or a CompletedSend: both take callbacks.
            return cast("asyncio.Future[SendResult]", send(buf))
        except OSError as exc:  # the driver knows the stream broke
            self._fail(exc)
            self._error_raised = True
            raise

    def _tracked(self, sent: asyncio.Future[SendResult], nbytes: int) -> asyncio.Future[SendResult]:
        """Tracks a send and returns what the caller gets for it: the send's own awaitable if it
        finished inside the call (nothing is left to cancel), else a future of the caller's own."""
        if sent.done():
            self._track(sent, nbytes, None)
            return sent
        result: asyncio.Future[SendResult] = self._loop.create_future()
        if _RESOLVES_AT_SUBMIT:
            result.set_result(SendResult(nbytes, False))
        self._track(sent, nbytes, result)
        return result

    def _track(
        self,
        sent: asyncio.Future[SendResult],
        nbytes: int,
        result: asyncio.Future[SendResult] | None,
    ) -> None:
        """Counts a submitted send until its release, then passes its outcome to ``result``.
        Every kind of send enters the stream through here (file sends too), so
        back-pressure and errors cover them all.

        The caller gets ``result``, a future of its own: cancelling it must not end the
        accounting, which lasts until the kernel's release."""
        if _UNRELEASED_UNCOUNTED:
            nbytes = 0
        self._pending += 1
        self._unreleased += nbytes
        if not self._paused and self._unreleased > self._high:
            self._paused = True
        if sent.done():  # a copy the kernel took at once: no loop iteration to wait for
            self._released(sent, nbytes, result)
        else:
            sent.add_done_callback(
                lambda done: self._released(done, nbytes, result), context=self._context
            )

    def _released(
        self,
        sent: asyncio.Future[SendResult],
        nbytes: int,
        result: asyncio.Future[SendResult] | None,
    ) -> None:
        self._pending -= 1
        self._unreleased -= nbytes
        exc: BaseException | None
        if sent.cancelled():
            exc = ConnectionAbortedError(errno.ECONNABORTED, "the send was cancelled")
        else:
            exc = sent.exception()
        if exc is not None and not _ERROR_DROPPED:
            self._fail(exc)
        if result is not None and not result.done():
            if exc is None:
                result.set_result(sent.result())
            else:
                result.set_exception(exc)
                # Reported through the stream as well: an ignored future is not an error lost.
                result.exception()
        if self._paused and self._unreleased <= self._low:
            self._paused = False
            self._wake_drainers()
        if self._pending == 0 and self._idle_callbacks:
            callbacks, self._idle_callbacks = self._idle_callbacks, []
            for callback in callbacks:
                callback()

    def _fail(self, exc: BaseException) -> None:
        # After abort() the sends fail because the caller ended the stream: not its error.
        if self._error is None and not self._aborted:
            self._error = exc
            self._wake_drainers()

    def _wake_drainers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            _set_done(waiter)

    def _when_idle(self, callback: Callable[[], object]) -> None:
        if self._pending == 0:
            callback()
        else:
            self._idle_callbacks.append(callback)

    def _check_writable(self, caller: str) -> None:
        if self._closing:
            raise RuntimeError(f"{caller}() on a closed writer; open a new connection")
        if self._eof:
            raise RuntimeError(f"{caller}() after write_eof(): this side of the stream is shut")
        self._raise_stream_error()

    def _raise_stream_error(self) -> None:
        if self._error is not None:
            self._error_raised = True
            raise self._error

    # -- flow control --------------------------------------------------------------------------

    async def drain(self) -> None:
        """Wait until the write buffer (bytes not yet released) is back at the low-water mark,
        if it went above the high-water mark; raise the stream's error, if it has one."""
        self._raise_if_failed()
        while self._paused and self._error is None:
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._drain_waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._drain_waiters:
                    self._drain_waiters.remove(waiter)
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        self._raise_stream_error()
        # As asyncio's drain(): a read error (a reset, say) is the stream's error too.
        read_error = self._reader.exception()
        if read_error is not None:
            raise read_error

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """High- and low-water marks of the unreleased bytes (asyncio's rules for defaults:
        ``low`` = ``high // 4``, ``high`` = ``4 * low``; default high: 4 MiB)."""
        if high is None:
            high = DEFAULT_HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        if self._unreleased > high:
            self._paused = True
        elif self._paused and self._unreleased <= low:
            self._paused = False
            self._wake_drainers()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        """``(low, high)``, as asyncio's transports return them."""
        return self._low, self._high

    def get_write_buffer_size(self) -> int:
        """Bytes written and not yet released by the kernel."""
        return self._unreleased

    # -- ending --------------------------------------------------------------------------------

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """Shut the write side (the peer reads EOF) once every write was released; reading
        goes on. Writing after this raises ``RuntimeError``."""
        if self._closing or self._eof:
            return
        self._eof = True
        self._when_idle(self._shutdown_write)

    def _shutdown_write(self) -> None:
        if self._closing:
            return
        try:
            self._zs.socket.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._fail(exc)

    def close(self, timeout: float | None = None) -> None:
        """Stop reading now; close the socket once the kernel released every write.

        Returns at once; ``await wait_closed()`` waits for the releases and the close. With
        ``timeout`` (seconds), a peer that has not acknowledged every write by then is cut off
        with :meth:`abort` (without it, a silent peer holds the writes as long as TCP retries,
        or ``user_timeout`` allows)."""
        limit = check_timeout(timeout)
        if not self._closing:
            self._closing = True
            self._feed.close()
            self._closer = self._loop.create_task(self._close_when_released())
        if limit is not None:
            self._loop.call_later(limit, self._abort_unless_closed)

    def abort(self) -> None:
        """Close the connection at once with a reset (RST), as asyncio's ``transport.abort()``.

        Unsent and unacknowledged bytes are dropped; the peer reads ``ECONNRESET``. Writes in
        flight fail (their futures raise ``ConnectionResetError`` or ``BrokenPipeError``), each
        still only once the kernel released its buffer, which now comes without the peer.
        ``wait_closed()`` waits for those releases and the close, and raises nothing for the
        abort itself. Writing after it raises ``RuntimeError``."""
        if self._aborted or self._closed.done():
            return
        self._aborted = True
        self._zs.abort()
        self.close()
        self._wake_drainers()

    def _abort_unless_closed(self) -> None:
        if not self._closed.done():
            self.abort()

    async def _close_when_released(self) -> None:
        try:
            if self._pending:
                idle: asyncio.Future[None] = self._loop.create_future()
                self._idle_callbacks.append(lambda: _set_done(idle))
                await idle
            await self._zs.aclose()
        except asyncio.CancelledError:  # the loop is going away
            self._closed.cancel()
            raise
        except Exception as exc:  # raised by wait_closed(), or logged if nobody waits
            if self._aborted and isinstance(exc, OSError):  # the abort's own doing
                self._closed.set_result(None)
            else:
                self._closed.set_exception(exc)
        else:
            self._closed.set_result(None)

    def is_closing(self) -> bool:
        return self._closing

    async def wait_closed(self, timeout: float | None = None) -> None:
        """Wait until ``close()`` completed: every write released, the socket closed. Raises
        the stream's error if no ``write*()``/``drain()`` raised it yet.

        With ``timeout`` (seconds), if that has not happened by then, the connection is cut off
        with :meth:`abort` and this waits for the kernel to release the writes (no longer for
        the peer)."""
        limit = check_timeout(timeout)
        if limit is not None:
            done, _ = await asyncio.wait([self._closed], timeout=limit)
            if not done:
                self.abort()
        await asyncio.shield(self._closed)
        if self._error is not None and not self._error_raised:
            self._error_raised = True
            raise self._error

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``"peername"``, ``"sockname"``, ``"socket"`` or ``"zerosend"`` (the
        :class:`zerosend.Socket` the writes go through)."""
        return self._extra.get(name, default)

    def __del__(self) -> None:
        if getattr(self, "_closing", True) or self._loop.is_closed():
            return
        warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=1)
        self.close()

    def __repr__(self) -> str:
        state = "closing" if self._closing else f"unreleased={self._unreleased}"
        return f"<zerosend.StreamWriter peer={self._extra['peername']} {state}>"


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _open_stream(
    sock: socket.socket,
    backend: BackendName,
    zerocopy_threshold: int,
    limit: int,
    user_timeout_ms: int | None = None,
) -> tuple[asyncio.StreamReader, StreamWriter]:
    """Reader and writer of a connected, non-blocking TCP socket; the socket is closed if not."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if user_timeout_ms is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, user_timeout_ms)
        zs = wrap(sock, backend=backend, zerocopy_threshold=zerocopy_threshold)
    except BaseException:
        sock.close()
        raise
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    return reader, StreamWriter(zs, reader, _SocketFeed(loop, sock, reader))


def _user_timeout_ms(user_timeout: float | None) -> int | None:
    """``user_timeout`` in seconds as TCP_USER_TIMEOUT's milliseconds (None: the kernel's)."""
    if user_timeout is None:
        return None
    if (
        isinstance(user_timeout, bool)
        or not isinstance(user_timeout, (int, float))
        or not 0 < user_timeout < float("inf")
    ):
        raise ValueError(
            f"user_timeout must be a positive number of seconds (or None), not {user_timeout!r}"
        )
    ms = max(1, round(user_timeout * 1000))
    if ms > 2**31 - 1:
        raise ValueError(f"user_timeout must be at most {(2**31 - 1) // 1000} seconds")
    return ms


def _refuse_tls(ssl: object) -> None:
    if ssl is not None and ssl is not False:
        raise ValueError(_TLS_REFUSED)


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")


def _connect_error(errors: list[OSError]) -> OSError:
    """The one error of every address tried, or all of them if they differ."""
    if len({str(e) for e in errors}) == 1:
        return errors[0]
    return OSError(f"Multiple exceptions: {', '.join(str(e) for e in errors)}")


async def _connect(
    host: str | None,
    port: int | str | None,
    family: int,
    proto: int,
    flags: int,
    local_addr: tuple[str, int] | None,
) -> socket.socket:
    """A connected, non-blocking TCP socket to the first address of ``host`` that answers."""
    loop = asyncio.get_running_loop()
    targets = await loop.getaddrinfo(
        host, port, family=family, type=socket.SOCK_STREAM, proto=proto, flags=flags
    )
    if not targets:
        raise OSError(f"getaddrinfo({host!r}, {port!r}) returned no address")
    sources = None
    if local_addr is not None:
        sources = await loop.getaddrinfo(
            *local_addr, family=family, type=socket.SOCK_STREAM, proto=proto, flags=flags
        )
        if not sources:
            raise OSError(f"getaddrinfo() returned no address for local_addr={local_addr!r}")
    errors: list[OSError] = []
    for target_family, kind, target_proto, _, address in targets:
        sock = socket.socket(target_family, kind, target_proto)
        try:
            sock.setblocking(False)
            if sources is not None:
                matching = [s[4] for s in sources if s[0] == target_family]
                if not matching:
                    raise OSError(
                        f"local_addr={local_addr!r} has no address of {address!r}'s family"
                    )
                sock.bind(matching[0])
            await loop.sock_connect(sock, address)
            return sock
        except OSError as exc:
            sock.close()
            errors.append(exc)
        except BaseException:
            sock.close()
            raise
    raise _connect_error(errors)


async def open_connection(
    host: str | None = None,
    port: int | str | None = None,
    *,
    backend: BackendName = "auto",
    zerocopy_threshold: int = 1048576,
    limit: int = DEFAULT_LIMIT,
    ssl: None = None,
    family: int = 0,
    proto: int = 0,
    flags: int = 0,
    sock: socket.socket | None = None,
    local_addr: tuple[str, int] | None = None,
    user_timeout: float | None = None,
) -> tuple[asyncio.StreamReader, StreamWriter]:
    """Connect over TCP; ``(reader, writer)`` as ``asyncio.open_connection`` returns them, with
    a :class:`StreamWriter` whose ``write_zc`` sends without copying.

    ``backend`` and ``zerocopy_threshold`` are :func:`zerosend.wrap`'s; ``limit``, ``family``,
    ``proto``, ``flags``, ``local_addr`` and ``sock`` (an already connected TCP socket, instead
    of ``host`` and ``port``) are asyncio's. TLS (``ssl``) is refused: it cannot be zero-copy.

    ``user_timeout`` (seconds) sets ``TCP_USER_TIMEOUT``: a peer that acknowledges nothing, or
    keeps its receive window shut (stops reading), for that long ends the connection with
    ``ETIMEDOUT``, so its unsent data and in-flight sends are released (failed) instead of held
    forever. ``None`` keeps the kernel's default (retransmissions give up after about 15
    minutes; a shut window is probed for as long as the peer answers).
    """
    _refuse_tls(ssl)
    _check_backend(backend)
    user_timeout_ms = _user_timeout_ms(user_timeout)
    if sock is not None:
        if host is not None or port is not None or local_addr is not None:
            raise ValueError("give either sock or host/port/local_addr, not both")
        if sock.type != socket.SOCK_STREAM:
            raise ValueError(f"zerosend streams need a TCP (SOCK_STREAM) socket, not {sock!r}")
        sock.setblocking(False)
    else:
        if host is None and port is None:
            raise ValueError("host and port are needed (or sock, a connected socket)")
        sock = await _connect(host, port, family, proto, flags, local_addr)
    return _open_stream(sock, backend, zerocopy_threshold, limit, user_timeout_ms)


async def _listen(
    hosts: str | Sequence[str] | None,
    port: int | str | None,
    family: int,
    flags: int,
    backlog: int,
    reuse_address: bool | None,
    reuse_port: bool | None,
) -> list[socket.socket]:
    loop = asyncio.get_running_loop()
    if hosts == "" or hosts is None:
        names: list[str | None] = [None]  # every interface
    elif isinstance(hosts, str):
        names = [hosts]
    else:
        names = list(hosts)
    addresses: dict[tuple[Any, ...], None] = {}
    for name in names:
        infos = await loop.getaddrinfo(
            name, port, family=family, type=socket.SOCK_STREAM, flags=flags
        )
        addresses.update(dict.fromkeys((*info[:3], info[4]) for info in infos))
    listeners: list[socket.socket] = []
    try:
        for address_family, kind, proto, address in addresses:
            listener = socket.socket(address_family, kind, proto)
            listeners.append(listener)
            if reuse_address is None or reuse_address:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if address_family == socket.AF_INET6:
                # One socket per family: the IPv6 one must not claim the IPv4 port as well.
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                listener.bind(address)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot listen on {address!r}: {exc.strerror}") from None
            listener.listen(backlog)
            listener.setblocking(False)
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    return listeners


class StreamServer:
    """Listening sockets whose connections get zerosend streams; ``asyncio.Server``'s shape
    (``async with``, ``serve_forever()``, ``close()``, ``wait_closed()``, ``sockets``).

    Create it with :func:`start_server`.
    """

    def __init__(
        self,
        listeners: list[socket.socket],
        callback: ClientConnectedCallback,
        backend: BackendName,
        zerocopy_threshold: int,
        limit: int,
        backlog: int,
        user_timeout_ms: int | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._listeners: list[socket.socket] | None = listeners
        self._callback = callback
        self._backend: BackendName = backend
        self._threshold = zerocopy_threshold
        self._limit = limit
        self._backlog = backlog
        self._user_timeout_ms = user_timeout_ms
        self._serving = False
        self._writers: set[StreamWriter] = set()
        self._callback_tasks: set[asyncio.Task[None]] = set()
        self._close_waiters: list[asyncio.Future[None]] = []
        self._serving_forever: asyncio.Future[None] | None = None

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets (none once closed)."""
        return tuple(self._listeners or ())

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        """Start accepting connections (if ``start_server(start_serving=False)``)."""
        if self._listeners is None:
            raise RuntimeError("the server is closed")
        if not self._serving:
            self._serving = True
            for listener in self._listeners:
                self._loop.add_reader(listener.fileno(), self._accept_ready, listener)

    async def serve_forever(self) -> None:
        """Accept connections until cancelled (or until ``close()``); closes the server then."""
        if self._serving_forever is not None:
            raise RuntimeError("serve_forever() is already running on this server")
        await self.start_serving()
        self._serving_forever = self._loop.create_future()
        try:
            await self._serving_forever
        except asyncio.CancelledError:
            self.close()
            await self.wait_closed()
            raise
        finally:
            self._serving_forever = None

    def _accept_ready(self, listener: socket.socket) -> None:
        for _ in range(self._backlog):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise
                # Out of descriptors or memory: pause accepting rather than spin on the error.
                self._loop.call_exception_handler(
                    {"message": "zerosend server cannot accept a connection", "exception": exc}
                )
                self._loop.remove_reader(listener.fileno())
                self._loop.call_later(ACCEPT_RETRY_DELAY, self._resume_accepting, listener)
                return
            self._accepted(conn)

    def _resume_accepting(self, listener: socket.socket) -> None:
        if self._serving and listener.fileno() >= 0:
            self._loop.add_reader(listener.fileno(), self._accept_ready, listener)

    def _accepted(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        try:
            reader, writer = _open_stream(
                conn, self._backend, self._threshold, self._limit, self._user_timeout_ms
            )
        except Exception as exc:
            self._loop.call_exception_handler(
                {"message": "zerosend could not take over an accepted connection", "exception": exc}
            )
            return
        self._writers.add(writer)
        writer._closed.add_done_callback(lambda _: self._forget(writer))
        try:
            outcome = self._callback(reader, writer)
        except Exception as exc:
            self._callback_failed(writer, exc)
            return
        if asyncio.iscoroutine(outcome):
            task: asyncio.Task[None] = self._loop.create_task(outcome)
            self._callback_tasks.add(task)
            task.add_done_callback(lambda done: self._callback_done(done, writer))

    def _callback_done(self, task: asyncio.Task[None], writer: StreamWriter) -> None:
        self._callback_tasks.discard(task)
        if task.cancelled():
            writer.close()
        elif (exc := task.exception()) is not None:
            self._callback_failed(writer, exc)

    def _callback_failed(self, writer: StreamWriter, exc: BaseException) -> None:
        self._loop.call_exception_handler(
            {"message": "unhandled exception in the client_connected_cb", "exception": exc}
        )
        writer.close()

    def _forget(self, writer: StreamWriter) -> None:
        self._writers.discard(writer)
        self._wake_if_closed()

    def close(self) -> None:
        """Stop listening; connections already accepted go on (see ``close_clients()``)."""
        listeners, self._listeners = self._listeners, None
        if listeners is None:
            return
        for listener in listeners:
            if self._serving:
                self._loop.remove_reader(listener.fileno())
            listener.close()
        self._serving = False
        if self._serving_forever is not None and not self._serving_forever.done():
            self._serving_forever.cancel()
        self._wake_if_closed()

    def close_clients(self) -> None:
        """Close every accepted connection's writer (each once its writes were released)."""
        for writer in list(self._writers):
            writer.close()

    def abort_clients(self) -> None:
        """Cut off every accepted connection at once with :meth:`StreamWriter.abort` (asyncio
        3.13's ``Server.abort_clients()``): ``wait_closed()`` then waits only for the kernel to
        release their writes, not for their peers."""
        for writer in list(self._writers):
            writer.abort()

    def _wake_if_closed(self) -> None:
        if self._listeners is None and not self._writers:
            waiters, self._close_waiters = self._close_waiters, []
            for waiter in waiters:
                _set_done(waiter)

    async def wait_closed(self) -> None:
        """Wait until the server was closed and every accepted connection's writer closed."""
        if self._listeners is None and not self._writers:
            return
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._close_waiters.append(waiter)
        await waiter

    async def __aenter__(self) -> StreamServer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()

    def __repr__(self) -> str:
        names = [s.getsockname() for s in self.sockets]
        return f"<zerosend.StreamServer sockets={names} connections={len(self._writers)}>"


async def start_server(
    client_connected_cb: ClientConnectedCallback,
    host: str | Sequence[str] | None = None,
    port: int | str | None = None,
    *,
    backend: BackendName = "auto",
    zerocopy_threshold: int = 1048576,
    limit: int = DEFAULT_LIMIT,
    ssl: None = None,
    family: int = socket.AF_UNSPEC,
    flags: int = socket.AI_PASSIVE,
    sock: socket.socket | None = None,
    backlog: int = 100,
    reuse_address: bool | None = None,
    reuse_port: bool | None = None,
    start_serving: bool = True,
    user_timeout: float | None = None,
) -> StreamServer:
    """Listen on ``host``:``port``; call ``client_connected_cb(reader, writer)`` (a function or
    a coroutine function) for every connection, as ``asyncio.start_server`` does, with a
    :class:`StreamWriter` whose ``write_zc`` sends without copying.

    ``backend`` and ``zerocopy_threshold`` are :func:`zerosend.wrap`'s for every connection;
    the other arguments are asyncio's (``sock`` is a bound TCP socket to listen on instead of
    ``host`` and ``port``). TLS (``ssl``) is refused: it cannot be zero-copy.
    ``user_timeout`` is :func:`open_connection`'s, for every connection.
    """
    _refuse_tls(ssl)
    _check_backend(backend)
    user_timeout_ms = _user_timeout_ms(user_timeout)
    if not callable(client_connected_cb):
        raise TypeError("client_connected_cb must be callable: cb(reader, writer)")
    if sock is not None:
        if host is not None or port is not None:
            raise ValueError("give either sock or host/port, not both")
        if sock.type != socket.SOCK_STREAM:
            raise ValueError(f"zerosend streams need a TCP (SOCK_STREAM) socket, not {sock!r}")
        sock.listen(backlog)
        sock.setblocking(False)
        listeners = [sock]
    else:
        listeners = await _listen(host, port, family, flags, backlog, reuse_address, reuse_port)
    server = StreamServer(
        listeners, client_connected_cb, backend, zerocopy_threshold, limit, backlog, user_timeout_ms
    )
    if start_serving:
        await server.start_serving()
    return server
