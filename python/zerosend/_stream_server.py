"""The server side of zerosend streams: ``start_server`` and ``StreamServer``, whose accepted
connections get asyncio's reader and a zerosend ``StreamWriter``."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Final, TypeAlias

from ._socket import BackendName
from ._stream_open import (
    DEFAULT_LIMIT,
    _check_backend,
    _open_stream,
    _refuse_tls,
    _user_timeout_ms,
)
from ._stream_writer import StreamWriter, _set_done

#: Seconds to stop accepting after the process or system ran out of descriptors or memory.
ACCEPT_RETRY_DELAY: Final = 1.0

ClientConnectedCallback: TypeAlias = Callable[
    [asyncio.StreamReader, "StreamWriter"], Awaitable[None] | None
]


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
