"""Seam: one event loop's io_uring shared by many sockets whose peers never read.

Each stalled socket keeps a chain of zero-copy requests in the kernel for as long as its peer
does not read. A healthy socket on the same loop must still get its sends out and released:
either with its share of the ring or, when the ring is already full, by sendmsg (counted in
``ring_full_sends``). A stream with ``user_timeout`` gives up on a peer that stopped reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

import zerosend
from tests.helpers import read_all, require_backend, tcp_pair

KiB = 1 << 10
#: Enough stalled sockets, each with a full chain (64 requests) of zero-copy sends, to hold
#: more requests than the driver's largest ring (8,192 sends at once).
STALLED = 130
PER_STALLED = 64
HEALTHY_SENDS = 8


def _stalled_pairs(count: int) -> list[tuple[socket.socket, socket.socket]]:
    """``count`` connected loopback pairs with small buffers: (client, peer that never reads)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 4 * count + 256  # both ends, the driver's duplicates, and headroom
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"RLIMIT_NOFILE {hard} is below the {needed} descriptors needed")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    pairs = []
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * KiB)
        listener.bind(("127.0.0.1", 0))
        listener.listen(count)
        for _ in range(count):
            client = socket.socket()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * KiB)
            client.connect(listener.getsockname())
            client.setblocking(False)
            peer, _ = listener.accept()
            pairs.append((client, peer))
    return pairs


@asynccontextmanager
async def _stalled(
    count: int,
) -> AsyncIterator[tuple[list[zerosend.Socket], list[asyncio.Future[zerosend.SendResult]]]]:
    """io_uring sockets whose peers never read, and a list for the sends made on them. On exit
    the peers close (the kernel resets the connections), which fails and releases every send
    still held."""
    pairs = _stalled_pairs(count)
    wrapped = [zerosend.wrap(c, backend="io_uring", zerocopy_threshold=0) for c, _ in pairs]
    held: list[asyncio.Future[zerosend.SendResult]] = []
    try:
        yield wrapped, held
    finally:
        for _, peer in pairs:
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            peer.close()
        await asyncio.wait_for(asyncio.gather(*held, return_exceptions=True), timeout=120)
        await asyncio.wait_for(asyncio.gather(*(zs.aclose() for zs in wrapped)), timeout=120)
        for client, _ in pairs:
            client.close()


async def _healthy_sends(zs: zerosend.Socket, server: socket.socket) -> tuple[bytes, bytearray]:
    """Eight zero-copy sends on a socket whose peer reads; returns (sent, received)."""
    chunks = [os.urandom(64 * KiB) for _ in range(HEALTHY_SENDS)]
    sends = [zs.send_zc(chunk) for chunk in chunks]
    received = bytearray()
    reader = asyncio.create_task(read_all(server, received))
    # Hang guard only: released sends take milliseconds; a starved socket never gets any.
    results = await asyncio.wait_for(asyncio.gather(*sends), timeout=30)
    assert [r.nbytes for r in results] == [64 * KiB] * HEALTHY_SENDS
    await zs.aclose()
    await asyncio.wait_for(reader, timeout=30)
    return b"".join(chunks), received


@pytest.mark.asyncio
async def test_a_healthy_socket_gets_its_share_of_a_ring_stalled_peers_crowd() -> None:
    """Every socket's sends are queued in the same turn: each gets a share of the ring."""
    require_backend("io_uring")
    client, server = await tcp_pair()
    async with _stalled(STALLED) as (stalled, held):
        payload = bytes(64 * KiB)
        held += [zs.send_zc(payload) for zs in stalled for _ in range(PER_STALLED)]
        healthy = zerosend.wrap(client, backend="io_uring", zerocopy_threshold=0)
        sent, received = await _healthy_sends(healthy, server)
        assert not any(send.done() for send in held)  # the peers really never read
        stats = healthy.stats
        assert received == sent
        assert stats["ring_full_sends"] == 0  # all went through the ring
        assert stats["notifications"] == HEALTHY_SENDS  # as zero-copy sends
        assert stats["bytes_zerocopy"] + stats["bytes_copied_by_kernel"] == len(sent)
    server.close()


#: SO_ZEROCOPY (asm-generic/socket.h); Python's socket module does not name it.
SO_ZEROCOPY = 60


@pytest.mark.asyncio
@pytest.mark.parametrize("around", ["msg_zerocopy", "copy"])
async def test_a_healthy_socket_sends_around_a_ring_stalled_peers_filled(around: str) -> None:
    """The stalled sockets' chains filled the ring before the healthy socket came: once the
    ring gave nothing back for a while, it sends by sendmsg instead of waiting for peers that
    never read: with MSG_ZEROCOPY, or by copy where the socket cannot have it (SO_ZEROCOPY set
    by other code leaves the kernel's MSG_ZEROCOPY counter unknown)."""
    require_backend("io_uring")
    if around == "msg_zerocopy":
        require_backend("msg_zerocopy")
    client, server = await tcp_pair()
    if around == "copy":
        client.setsockopt(socket.SOL_SOCKET, SO_ZEROCOPY, 1)
    async with _stalled(STALLED) as (stalled, held):
        payload = bytes(64 * KiB)
        for zs in stalled:
            held += [zs.send_zc(payload) for _ in range(PER_STALLED)]
            await asyncio.sleep(0)  # one socket per turn: each takes a whole chain
        healthy = zerosend.wrap(client, backend="io_uring", zerocopy_threshold=0)
        sent, received = await _healthy_sends(healthy, server)
        assert not any(send.done() for send in held)
        stats = healthy.stats
        assert received == sent
        assert healthy.backend == "io_uring"
        assert stats["ring_full_sends"] == HEALTHY_SENDS
        if around == "msg_zerocopy":
            # Released by error-queue notifications (loopback copies them in the end).
            assert stats["notifications"] >= 1
            assert stats["bytes_copied_ring_full"] == 0
            assert stats["bytes_zerocopy"] + stats["bytes_copied_by_kernel"] == len(sent)
        else:
            assert stats["notifications"] == 0
            assert stats["bytes_copied_ring_full"] == len(sent)
            assert stats["bytes_copied"] == len(sent)
    server.close()


@pytest.mark.asyncio
async def test_user_timeout_ends_a_stream_whose_peer_stopped_reading() -> None:
    """``user_timeout`` (TCP_USER_TIMEOUT): a peer that keeps its window shut past it ends the
    stream, so its sends are released (failed) instead of held forever."""
    require_backend("io_uring")
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * KiB)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        host, port = listener.getsockname()
        _reader, writer = await zerosend.open_connection(
            host, port, backend="io_uring", zerocopy_threshold=0, user_timeout=0.5
        )
        peer, _ = listener.accept()
        with peer:
            sock = writer.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 500
            payload = bytes(256 * KiB)
            sends = [writer.write_zc(payload) for _ in range(16)]
            # Hang guard only: the kernel gives up about half a second after the window shut.
            results = await asyncio.wait_for(
                asyncio.gather(*sends, return_exceptions=True), timeout=120
            )
            failures = [r for r in results if isinstance(r, OSError)]
            assert failures, results
            # ETIMEDOUT goes to whichever request saw the abort first; the rest see EPIPE.
            assert {f.errno for f in failures} <= {errno.ETIMEDOUT, errno.EPIPE}, failures
            writer.close()
            with contextlib.suppress(OSError):  # the stream's error, again
                await asyncio.wait_for(writer.wait_closed(), timeout=120)


@pytest.mark.asyncio
@pytest.mark.parametrize("bad", [0, -1, True, "1", float("nan"), float("inf")])
async def test_user_timeout_must_be_a_positive_number(bad: object) -> None:
    with pytest.raises(ValueError, match="user_timeout"):
        await zerosend.open_connection("127.0.0.1", 9, user_timeout=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="user_timeout"):
        await zerosend.start_server(lambda r, w: None, "127.0.0.1", 0, user_timeout=bad)  # type: ignore[arg-type]
