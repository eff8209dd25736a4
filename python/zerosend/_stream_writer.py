"""The writing half of a zerosend stream: ``StreamWriter``, one ordered byte stream whose
writes are zero-copy (``write_zc``) or copied (``write``), with back-pressure on the bytes the
kernel has not released yet (``drain``).

The streams (``open_connection``, ``start_server``) have asyncio's shapes, so the pipelined
pattern is the natural one: ``writer.write_zc(buf)`` submits at once and returns a future that
resolves at the kernel's release, and ``await writer.drain()`` applies back-pressure. Many sends
stay in flight without a task per send. The other pieces: ``_stream_feed`` (reading),
``_stream_open`` (a stream of a connected socket), ``_stream_connect``, ``_stream_server``.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import os
import socket
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Final, cast

from . import _mutant
from ._abort import check_timeout
from ._native import SendResult
from ._socket import FileSource, Socket, _file_descriptor
from ._stream_feed import _SocketFeed
from ._types import Buffer, Buffers, SendFuture

#: Unreleased bytes above which ``drain()`` waits. Zero-copy bytes stay unreleased until the peer
#: acknowledged them, so this bounds the bytes in flight across a round trip: it has to cover the
#: bandwidth-delay product, far more than the 64 KiB asyncio allows for copied bytes.
DEFAULT_HIGH_WATER: Final = 4 << 20
# Deliberate faults of a mutants build (``_mutant``); always False in a release build
_UNRELEASED_UNCOUNTED = _mutant.on("stream_unreleased_uncounted")
_ERROR_DROPPED = _mutant.on("stream_error_dropped")
_RESOLVES_AT_SUBMIT = _mutant.on("stream_resolves_at_submit")


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
