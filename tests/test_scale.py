"""One event loop, thousands of sockets, every send in flight at once: none is stranded.

Every io_uring send posts two completions, so thousands of sends outgrow any fixed completion
queue; the driver must never queue more than the queue can take and must flush completions the
kernel held back. The socket count is what CI holds: 10,000 UDP sockets, with RLIMIT_NOFILE
raised inside the test to its hard limit (20,000 on the CI machines, which an unprivileged or
container root cannot raise). UDP because one receiving socket serves them all, so the
descriptor budget goes to sockets that send; and each Python socket is closed right after
wrapping, so that each sending socket costs one descriptor (the driver's own duplicate keeps it
open, as it does for any caller that closes its descriptor). A second test keeps 2,000 TCP
connections (6,000 descriptors) each with a 64 KiB send in flight, the shape that used to wedge
the ring at 1,100 sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
from collections.abc import Iterator

import pytest

import zerosend
from tests.helpers import read_all, require, require_backend, tcp_pair

UDP_SOCKETS = 10_000
TCP_CONNECTIONS = 2_000
#: Guards against a hang only (a stranded send never resolves); not a performance bound.
HANG_GUARD_S = 300

# pytest's own limit comes after this test's hang guards (two waits and the set-up), so that
# a stranded send is reported by the guard that names it, not by a 120 s default.
pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(2 * HANG_GUARD_S + 120)]


@pytest.fixture(autouse=True)
def _needs_io_uring() -> None:
    require_backend("io_uring")


@contextlib.contextmanager
def descriptors(needed: int) -> Iterator[int]:
    """Raises RLIMIT_NOFILE to ``needed`` for the test (as root, the hard limit too)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, needed)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        want = hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield want
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_ten_thousand_udp_sockets_on_one_loop_all_resolve() -> None:
    with descriptors(UDP_SOCKETS + 1024) as limit:
        if limit < UDP_SOCKETS + 1024:
            require("nofile", f"RLIMIT_NOFILE cannot be raised above {limit}")
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        receiver.bind(("127.0.0.1", 0))
        wrapped: list[zerosend.Socket] = []
        try:
            payload = bytes(range(256)) * 64  # 16 KiB, sent zero-copy (threshold 0)
            for _ in range(UDP_SOCKETS):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.setblocking(False)
                    sock.connect(receiver.getsockname())
                    wrapped.append(zerosend.wrap(sock, backend="io_uring", zerocopy_threshold=0))
            # Two datagrams in flight on every socket: 20,000 sends, 40,000 completions.
            futures = [zs.send_zc(payload) for zs in wrapped for _ in range(2)]
            results = await asyncio.wait_for(asyncio.gather(*futures), HANG_GUARD_S)
            assert len(results) == 2 * UDP_SOCKETS
            assert all(r.nbytes == len(payload) for r in results)
            assert all(zs.inflight == 0 for zs in wrapped)
            assert sum(zs.stats["notifications"] for zs in wrapped) == 2 * UDP_SOCKETS
            # The ring still works after the burst.
            again = await asyncio.wait_for(wrapped[0].send_zc(payload), HANG_GUARD_S)
            assert again.nbytes == len(payload)
            for zs in wrapped:
                await zs.aclose()
        finally:
            receiver.close()


async def test_two_thousand_tcp_connections_each_with_a_send_in_flight() -> None:
    with descriptors(3 * TCP_CONNECTIONS + 1024) as limit:
        if limit < 3 * TCP_CONNECTIONS + 1024:
            require("nofile", f"RLIMIT_NOFILE cannot be raised above {limit}")
        pairs = [await tcp_pair() for _ in range(TCP_CONNECTIONS)]
        try:
            wrapped = [
                zerosend.wrap(client, backend="io_uring", zerocopy_threshold=0)
                for client, _ in pairs
            ]
            payloads = [bytes([i % 251]) * 65536 for i in range(TCP_CONNECTIONS)]
            futures = [zs.send_zc(p) for zs, p in zip(wrapped, payloads, strict=True)]
            results = await asyncio.wait_for(asyncio.gather(*futures), HANG_GUARD_S)
            assert all(r.nbytes == 65536 for r in results)
            for zs in wrapped:
                await zs.aclose()
            received = [bytearray() for _ in pairs]
            await asyncio.gather(
                *(read_all(server, got) for (_, server), got in zip(pairs, received, strict=True))
            )
            assert all(got == p for got, p in zip(received, payloads, strict=True))
        finally:
            for client, server in pairs:
                client.close()
                server.close()
