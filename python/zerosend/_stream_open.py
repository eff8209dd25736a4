"""A zerosend stream of a connected TCP socket, and the options both ``open_connection`` and
``start_server`` take and check alike."""

from __future__ import annotations

import asyncio
import socket
from typing import Final

from ._socket import BACKENDS, BackendName, wrap
from ._stream_feed import _SocketFeed
from ._stream_writer import StreamWriter

#: asyncio's default for StreamReader's buffer limit (64 KiB).
DEFAULT_LIMIT: Final = 1 << 16

_TLS_REFUSED = (
    "zerosend streams do not do TLS: encryption writes a new copy of every byte, so nothing "
    "could be sent zero-copy; use asyncio.open_connection/start_server with ssl= instead"
)


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
