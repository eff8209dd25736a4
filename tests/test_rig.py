"""Integrity under buffer reuse on the rig: a receiver in a network namespace behind veth, its
receive work steered to the other CPU, so the kernel releases pages late, as with a real NIC."""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from typing import Any

import pytest

import zerosend
from bench.harness.receiver import Receiver, fill_chunk, start_receiver
from bench.harness.rig import Rig
from tests.helpers import RIG_UNAVAILABLE, require, require_backend


@pytest.fixture(autouse=True)
def _needs_the_rig() -> None:
    require("rig", RIG_UNAVAILABLE)


CHUNK = 1 << 20
CHUNKS = 192
PORT = 5301
#: Guards against a hang only (a send that never resolves); not a performance bound.
HANG_GUARD_S = 30


def verifying_receiver(rig: Rig) -> Receiver:
    """The rig's receiver, checking every CHUNK-sized chunk against its fill_chunk pattern."""
    return start_receiver(
        rig.peer_addr, PORT, namespace=rig.ns, once=True, check="verify", chunk=CHUNK
    )


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


def _run(backend: str, *, wait_for_release: bool, depth: int = 1, loss: int = 0) -> dict[str, Any]:
    with Rig() as rig:
        if loss:
            rig.drop_packets(loss)
        with verifying_receiver(rig) as rx:
            stats = asyncio.run(
                _send_reusing_buffers(
                    rig.peer_addr, backend, depth=depth, wait_for_release=wait_for_release
                )
            )
            result: dict[str, Any] = rx.report(timeout=120)
        result["stats"] = stats
        result["dropped"] = rig.output_rule_packets()
        return result


def assert_zero_copy_sends(backend: str, stats: dict[str, int]) -> None:
    """Every byte went by the backend's zero-copy send and was released by its notification
    (the veth peer receives the data, so the kernel copies it then: ``bytes_copied_by_kernel``);
    a driver that quietly sent by copy fails here."""
    total = CHUNK * CHUNKS
    assert stats["sends"] == CHUNKS
    if backend == "copy":
        assert stats["bytes_copied_backend"] == total
        return
    assert stats["bytes_zerocopy"] + stats["bytes_copied_by_kernel"] == total
    assert stats["bytes_copied_below_threshold"] == stats["bytes_copied_requested"] == 0
    assert stats["bytes_copied_backend"] == 0
    # io_uring: one notification CQE per send; MSG_ZEROCOPY: ranges, which may coalesce.
    assert stats["notifications"] >= (CHUNKS if backend == "io_uring" else 1)


@pytest.mark.parametrize("depth", [1, 8])
def test_reusing_buffers_after_each_await_never_corrupts(backend: str, depth: int) -> None:
    result = _run(backend, wait_for_release=True, depth=depth)
    assert result["bytes"] == CHUNK * CHUNKS
    assert result["chunks"] == CHUNKS
    assert result["corrupt"] == [], f"chunks corrupted on the wire: {result['corrupt']}"
    assert_zero_copy_sends(backend, result["stats"])


def test_packet_loss_delays_releases_but_never_corrupts(backend: str) -> None:
    # 2% of packets dropped: TCP retransmits, and the kernel releases pages late (MSG_ZEROCOPY
    # ranges arrive coalesced). Reuse stays safe. On this topology TCP's releases stay in order
    # (measured: no out-of-order range in 6 runs): cumulative acknowledgements free the
    # retransmit queue front to back, and veth copies each transmitted clone at once.
    result = _run(backend, wait_for_release=True, depth=8, loss=2)
    assert result["bytes"] == CHUNK * CHUNKS
    assert result["corrupt"] == [], f"chunks corrupted on the wire: {result['corrupt']}"
    assert result["dropped"] > 0, "the rule must really have dropped packets"
    assert_zero_copy_sends(backend, result["stats"])


@pytest.mark.parametrize("backend", ["io_uring", "msg_zerocopy"])
def test_the_rig_detects_reuse_before_release(backend: str) -> None:
    # Control: the check above can fail. Overwriting the buffer before the kernel released it
    # corrupts chunks on the wire, and the receiver sees it.
    require_backend(backend)
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

    with Rig() as rig, verifying_receiver(rig) as rx:
        stats = asyncio.run(send(rig.peer_addr))
        result = rx.report(timeout=120)
    assert result["chunks"] == CHUNKS
    assert result["corrupt"] == [], f"chunks corrupted on the wire: {result['corrupt']}"
    assert_zero_copy_sends(backend, stats)
    if backend == "io_uring":
        assert stats["fixed_buffer_sends"] == CHUNKS


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
        with start_receiver(rig.peer_addr, PORT, namespace=rig.ns, udp=True):
            outcomes = asyncio.run(send(rig.peer_addr))
    kinds = [o.nbytes if isinstance(o, zerosend.SendResult) else type(o).__name__ for o in outcomes]
    dropped = "PermissionError"
    assert kinds == [1200, dropped, 1300, dropped, dropped, 1400, 1450]


@pytest.mark.parametrize("backend", ["io_uring", "msg_zerocopy"])
def test_releases_out_of_order_reach_their_own_sends(backend: str) -> None:
    # Datagrams queue behind a slow token bucket; those that find the queue full are dropped
    # (and freed) at once, before the ones still waiting: their releases come first. Every
    # send must resolve, each with its own result; MSG_ZEROCOPY counts the ranges that came
    # out of order. (Datagrams that get through are dropped at the peer's ingress, uncopied.)
    require_backend(backend)

    async def send(host: str) -> tuple[list[zerosend.SendResult], dict[str, int]]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect((host, PORT))
        sock.setblocking(False)
        zs = zerosend.wrap(sock, backend=backend, zerocopy_threshold=0)  # type: ignore[arg-type]
        buffers = [bytearray([i]) * 1400 for i in range(16)]
        # A send whose release is never matched never resolves: the guard says so before
        # pytest's time limit would (which would only say "slow").
        every = asyncio.gather(*(zs.send_zc(buf) for buf in buffers))
        try:
            results = await asyncio.wait_for(every, HANG_GUARD_S)
        except TimeoutError:
            raise AssertionError(f"sends stranded: {zs.inflight} never resolved") from None
        stats = zs.stats
        await zs.aclose()
        return results, stats

    with Rig() as rig, rig.ingress_drop():
        rig.hold_egress()
        results, stats = asyncio.run(send(rig.peer_addr))
    assert [r.nbytes for r in results] == [1400] * 16
    assert stats["sends"] == 16 and stats["errors"] == 0
    assert all(r.zerocopy for r in results), "queued, dropped or not, nothing was copied"
    if backend == "msg_zerocopy":
        assert stats["out_of_order_notifications"] > 0, stats
