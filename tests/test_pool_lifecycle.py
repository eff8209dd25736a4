"""Buffer pools come back: registration slot and locked memory, with or without close().

A pool registers its memory with the event loop's io_uring (64 slots) and locks it in RAM. Both
must be given back once the pool is closed or dropped and nothing sends from it any more, but
never while a send from it is still in the kernel.
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket

import pytest

import zerosend
from tests.helpers import assert_zero_copy_sends, read_all, tcp_pair

pytestmark = pytest.mark.asyncio

MiB = 1 << 20
CYCLES = 500


def locked_kib() -> int:
    """This process's locked memory (VmLck), in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmLck:"):
                return int(line.split()[1])
    raise AssertionError("no VmLck in /proc/self/status")


async def pool_cycles(zs: zerosend.Socket, cycles: int, sent: bytearray) -> None:
    """Creates, uses and gives up ``cycles`` pools, in turn by close(), async with and drop."""
    for i in range(cycles):
        payload = os.urandom(16) * 1024  # 16 KiB, sent zero-copy (the socket's threshold: 0)
        if i % 3 == 0:
            pool = zerosend.BufferPool(1, len(payload))
            async with pool.acquire() as buf:
                memoryview(buf)[:] = payload
                await zs.send_zc(memoryview(buf))
            pool.close()
            assert pool.closed
        elif i % 3 == 1:
            async with zerosend.BufferPool(1, len(payload)) as pool:
                async with pool.acquire() as buf:
                    memoryview(buf)[:] = payload
                    await zs.send_zc(memoryview(buf))
            assert pool.closed
        else:
            pool = zerosend.BufferPool(1, len(payload))
            async with pool.acquire() as buf:
                memoryview(buf)[:] = payload
                await zs.send_zc(memoryview(buf))
            del pool, buf
        sent += payload


async def test_five_hundred_pools_on_one_loop(backend: str) -> None:
    client, server = await tcp_pair()
    received = bytearray()
    reader = asyncio.ensure_future(read_all(server, received))
    zs = zerosend.wrap(client, backend=backend, zerocopy_threshold=0)  # type: ignore[arg-type]
    sent = bytearray()
    await pool_cycles(zs, CYCLES, sent)
    stats = zs.stats
    await zs.aclose()
    await reader
    server.close()
    assert received == sent
    if backend == "io_uring":
        assert stats["fixed_buffer_sends"] == CYCLES


async def test_pool_dropped_with_a_send_in_flight_keeps_its_memory_until_release(
    backend: str,
) -> None:
    baseline = locked_kib()
    client, server = await tcp_pair()
    zs = zerosend.wrap(client, backend=backend)  # type: ignore[arg-type]
    pool = zerosend.BufferPool(1, 4 * MiB)
    buf = await pool.acquire()
    payload = os.urandom(4 * MiB)
    memoryview(buf)[:] = payload
    # Nobody reads yet: 4 MiB do not fit the socket buffers, so the send stays in flight.
    in_flight = zs.send_zc(memoryview(buf))
    buf.release()
    del pool, buf
    gc.collect()
    assert not in_flight.done()
    assert locked_kib() >= baseline + 4 * 1024, "the memory of a send in flight was unlocked"
    # Other pools come and go meanwhile; the dropped pool's slot is not needed for that.
    sent = bytearray(payload)
    received = bytearray()
    reader = asyncio.ensure_future(read_all(server, received))
    await pool_cycles(zs, 100, sent)
    assert (await in_flight).nbytes == 4 * MiB
    await zs.aclose()
    await reader
    server.close()
    assert received == sent  # the pool's pages were not reused before the release
    gc.collect()
    assert locked_kib() == baseline


async def test_close_gives_locked_memory_back_once_the_last_send_is_released(
    zc_backend: str,
) -> None:
    baseline = locked_kib()
    client, server = await tcp_pair()
    # Small socket buffers and nobody reading: the 2 MiB zero-copy send stays in flight.
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    zs = zerosend.wrap(client, backend=zc_backend, zerocopy_threshold=0)  # type: ignore[arg-type]
    pool = zerosend.BufferPool(2, 2 * MiB)
    assert locked_kib() == baseline + 4 * 1024
    buf = await pool.acquire()
    memoryview(buf)[:] = b"z" * (2 * MiB)
    in_flight = zs.send_zc(memoryview(buf))
    buf.release()
    del buf  # nothing in the test pins the region: only the send can
    gc.collect()
    pool.close()
    assert not in_flight.done()
    assert locked_kib() == baseline + 4 * 1024  # held by the send in flight
    with pytest.raises(ValueError, match="closed"):
        await pool.acquire()
    received = bytearray()
    reader = asyncio.ensure_future(read_all(server, received))
    await in_flight
    await zs.aclose()
    await reader
    server.close()
    assert received == b"z" * (2 * MiB)
    assert_zero_copy_sends(zs.stats, zc_backend, 2 * MiB)
    gc.collect()
    assert locked_kib() == baseline
