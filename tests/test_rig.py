"""Integrity under buffer reuse on the rig: a receiver in a network namespace behind veth, its
receive work steered to the other CPU, so the kernel releases pages late, as with a real NIC."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
from collections import deque

import pytest

import zerosend
from zerosend._rig import Rig, fill_chunk, rig_unavailable_reason

REASON = rig_unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"rig unavailable: {REASON}")

CHUNK = 1 << 20
CHUNKS = 192
PORT = 5301


async def _send_reusing_buffers(
    host: str, backend: str, *, depth: int, wait_for_release: bool
) -> dict[str, int]:
    """Send CHUNKS patterned chunks from ``depth`` buffers, each refilled for the next chunk."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, (host, PORT))
    zs = zerosend.wrap(sock, backend=backend)  # type: ignore[arg-type]
    buffers = [bytearray(CHUNK) for _ in range(depth)]
    in_flight: deque[asyncio.Future[zerosend.SendResult]] = deque()
    for index in range(CHUNKS):
        buf = buffers[index % depth]
        if wait_for_release:
            if len(in_flight) == depth:
                await in_flight.popleft()  # the contract: reuse only after this resolves
            fill_chunk(buf, index)
        else:
            # The mistake the contract exists to prevent: overwrite the memory while the kernel
            # may still hold it (through a second view, since the export blocks resizing only).
            fill_chunk(memoryview(buf), index)
            await asyncio.sleep(0)
        in_flight.append(zs.send_zc(buf))
    await asyncio.gather(*in_flight)
    stats = zs.stats
    await zs.aclose()
    return stats


def test_auto_picks_the_best_zero_copy_backend_for_a_remote_peer() -> None:
    caps = zerosend.capabilities()
    expected = (
        "io_uring" if caps.io_uring_send_zc else "msg_zerocopy" if caps.msg_zerocopy else "copy"
    )

    async def probe(host: str) -> tuple[str, str | None]:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, PORT))
        async with zerosend.wrap(sock) as zs:
            await zs.send_zc(bytearray(1 << 20))
            return zs.backend, zs.fallback_reason

    with Rig() as rig:
        receiver = rig.start_receiver(PORT, "discard")
        try:
            backend, reason = asyncio.run(probe(rig.peer_addr))
        finally:
            receiver.communicate(timeout=60)
    assert backend == expected, reason


def _run(
    backend: str, *, wait_for_release: bool, depth: int = 1, loss: int = 0
) -> dict[str, object]:
    with Rig() as rig:
        if loss:
            rig.drop_packets(loss)
        receiver = rig.start_receiver(PORT, "verify", CHUNK)
        try:
            stats = asyncio.run(
                _send_reusing_buffers(
                    rig.peer_addr, backend, depth=depth, wait_for_release=wait_for_release
                )
            )
        finally:
            out, err = receiver.communicate(timeout=120)
        assert receiver.returncode == 0, err
        result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
        result["stats"] = stats
        return result


@pytest.mark.parametrize("depth", [1, 8])
def test_reusing_buffers_after_each_await_never_corrupts(backend: str, depth: int) -> None:
    result = _run(backend, wait_for_release=True, depth=depth)
    assert result["bytes"] == CHUNK * CHUNKS
    assert result["chunks"] == CHUNKS
    assert result["corrupt"] == [], f"chunks corrupted on the wire: {result['corrupt']}"


@pytest.mark.skipif(shutil.which("nft") is None, reason="packet loss needs nftables")
def test_packet_loss_delays_releases_but_never_corrupts(backend: str) -> None:
    # 2% of packets dropped: TCP retransmits, and the kernel releases pages late and out of
    # order (MSG_ZEROCOPY ranges arrive coalesced and reordered). Reuse stays safe.
    result = _run(backend, wait_for_release=True, depth=8, loss=2)
    assert result["bytes"] == CHUNK * CHUNKS
    assert result["corrupt"] == [], f"chunks corrupted on the wire: {result['corrupt']}"


@pytest.mark.parametrize("backend", ["io_uring", "msg_zerocopy"])
def test_the_rig_detects_reuse_before_release(backend: str) -> None:
    # Control: the check above can fail. Overwriting the buffer before the kernel released it
    # corrupts chunks on the wire, and the receiver sees it.
    if backend == "io_uring" and not zerosend.capabilities().io_uring_send_zc:
        pytest.skip("io_uring SEND_ZC unavailable")
    if backend == "msg_zerocopy" and not zerosend.capabilities().msg_zerocopy:
        pytest.skip("MSG_ZEROCOPY unavailable")
    result = _run(backend, wait_for_release=False)
    assert result["bytes"] == CHUNK * CHUNKS
    assert result["corrupt"], "reusing a buffer before its release went unnoticed"


def test_pool_buffers_come_back_only_after_release(backend: str) -> None:
    # Buffers go back to the pool as soon as they were handed to send_zc, without awaiting
    # the send: the pool must hold each one until the kernel released it, or the next
    # acquire() would overwrite bytes still on their way.
    async def send(host: str) -> dict[str, int]:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, PORT))
        zs = zerosend.wrap(sock, backend=backend)  # type: ignore[arg-type]
        pool = zerosend.BufferPool(2, CHUNK)
        sends = []
        for index in range(CHUNKS):
            async with pool.acquire() as buf:
                fill_chunk(memoryview(buf), index)
                sends.append(zs.send_zc(buf))
        await asyncio.gather(*sends)
        stats = zs.stats
        await zs.aclose()
        assert pool.available == 2
        return stats

    with Rig() as rig:
        receiver = rig.start_receiver(PORT, "verify", CHUNK)
        try:
            stats = asyncio.run(send(rig.peer_addr))
        finally:
            out, err = receiver.communicate(timeout=120)
        assert receiver.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["chunks"] == CHUNKS
    assert result["corrupt"] == [], f"chunks corrupted on the wire: {result['corrupt']}"
    if backend == "io_uring":
        assert stats["fixed_buffer_sends"] == CHUNKS


@pytest.mark.skipif(shutil.which("nft") is None, reason="needs nftables")
def test_a_datagram_dropped_by_netfilter_fails_alone(backend: str) -> None:
    # netfilter drops the 1000-byte datagrams on their way out: sendmsg fails with EPERM after
    # the kernel already numbered the zero-copy datagram. That send fails; every other send must
    # still be released at the right time (not early, not never).
    async def send(host: str) -> list[object]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect((host, PORT))
        sock.setblocking(False)
        zs = zerosend.wrap(sock, backend=backend, zerocopy_threshold=0)  # type: ignore[arg-type]
        outcomes: list[object] = []
        # All below the MTU: unfragmented datagrams are released as soon as they are delivered.
        for size in [1200, 1000, 1300, 1000, 1000, 1400, 1450]:
            try:
                outcomes.append(await asyncio.wait_for(zs.send_zc(bytes(size)), 10))
            except OSError as err:
                outcomes.append(err)
        await asyncio.wait_for(zs.aclose(), 10)
        return outcomes

    with Rig() as rig:
        rig.add_output_rule("udp length 1008 drop")
        sink = rig.start_udp_sink(PORT)
        try:
            outcomes = asyncio.run(send(rig.peer_addr))
        finally:
            sink.kill()
            sink.wait()
    kinds = [o.nbytes if isinstance(o, zerosend.SendResult) else type(o).__name__ for o in outcomes]
    dropped = "PermissionError"
    assert kinds == [1200, dropped, 1300, dropped, dropped, 1400, 1450]
