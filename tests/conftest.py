"""Shared fixtures: real connected sockets on loopback and the backends this kernel offers."""

from __future__ import annotations

import asyncio
import socket

import pytest

import zerosend

CAPS = zerosend.capabilities()
UNAVAILABLE = {
    "io_uring": None if CAPS.io_uring_send_zc else CAPS.io_uring_send_zc_reason,
    "msg_zerocopy": None if CAPS.msg_zerocopy else CAPS.msg_zerocopy_reason,
    "copy": None,
}


@pytest.fixture(params=["io_uring", "msg_zerocopy", "copy"])
def backend(request: pytest.FixtureRequest) -> str:
    """Each backend in turn; skipped (with the kernel's reason) where unavailable."""
    reason = UNAVAILABLE[request.param]
    if reason is not None:
        pytest.skip(f"{request.param} unavailable: {reason}")
    return request.param


async def tcp_pair(
    family: socket.AddressFamily = socket.AF_INET,
) -> tuple[socket.socket, socket.socket]:
    """A connected, non-blocking TCP pair on loopback: (client, server side)."""
    loop = asyncio.get_running_loop()
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.bind((host, 0))
        listener.listen()
        listener.setblocking(False)
        client = socket.socket(family, socket.SOCK_STREAM)
        client.setblocking(False)
        await loop.sock_connect(client, listener.getsockname()[:2])
        server, _ = await loop.sock_accept(listener)
    server.setblocking(False)
    return client, server


async def read_all(sock: socket.socket, into: bytearray, *, chunk: int = 1 << 20) -> None:
    """Read ``sock`` until EOF, appending to ``into``."""
    loop = asyncio.get_running_loop()
    buf = bytearray(chunk)
    view = memoryview(buf)
    while True:
        n = await loop.sock_recv_into(sock, buf)
        if n == 0:
            return
        into += view[:n]
