"""The client side of zerosend streams: ``open_connection``, which tries each address of the
host in turn (as asyncio does) and returns asyncio's reader with a zerosend ``StreamWriter``."""

from __future__ import annotations

import asyncio
import socket

from ._socket import BackendName
from ._stream_open import (
    DEFAULT_LIMIT,
    _check_backend,
    _open_stream,
    _refuse_tls,
    _user_timeout_ms,
)
from ._stream_writer import StreamWriter


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
