"""Seam: a BufferPool closed while sends from it still wait in a socket's queue.

The pool's io_uring registration must outlive every send that names its slot, queued or in the
kernel: closing the pool may not turn those sends into EFAULT or end the stream.
"""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

import zerosend
from tests.helpers import read_all, require_backend, tcp_pair

KiB = 1 << 10


@pytest.mark.asyncio
async def test_closing_a_pool_keeps_its_queued_sends() -> None:
    require_backend("io_uring")
    client, server = await tcp_pair()
    # A small socket buffer and a peer that is not reading yet: the first sends fill it, the
    # pool's sends wait in the driver's queue (not in the kernel) when the pool is closed.
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * KiB)
    zs = zerosend.wrap(client, backend="io_uring", zerocopy_threshold=0)
    ahead = [os.urandom(256 * KiB) for _ in range(16)]
    pool = zerosend.BufferPool(4, 256 * KiB)
    sends = [zs.send_zc(buf) for buf in ahead]
    pooled = []
    expected = b"".join(ahead)
    for _ in range(4):
        buf = await pool.acquire()
        view = memoryview(buf)
        view[:] = os.urandom(len(view))
        expected += bytes(view)
        pooled.append(zs.send_zc(buf))
        view.release()
        buf.release()
    # The pool's sends are still waiting for the ones ahead (nobody reads yet).
    assert not any(send.done() for send in pooled)
    pool.close()

    received = bytearray()
    reader = asyncio.create_task(read_all(server, received))
    results = await asyncio.wait_for(asyncio.gather(*sends, *pooled), timeout=120)
    assert all(r.nbytes == 256 * KiB for r in results)
    stats = zs.stats
    assert stats["errors"] == 0
    assert stats["fixed_buffer_sends"] == 4  # really sent from the registered slot
    assert stats["bytes_zerocopy"] + stats["bytes_copied_by_kernel"] == 20 * 256 * KiB
    await zs.aclose()
    await asyncio.wait_for(reader, timeout=120)
    server.close()
    assert len(received) == len(expected)
    assert received == expected


@pytest.mark.asyncio
async def test_a_new_pool_does_not_take_a_slot_still_named_by_queued_sends() -> None:
    """Closing a pool with queued sends, then registering another: the new pool must get a
    slot of its own, or the queued sends would go out from the new pool's memory."""
    require_backend("io_uring")
    client, server = await tcp_pair()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * KiB)
    zs = zerosend.wrap(client, backend="io_uring", zerocopy_threshold=0)
    ahead = [os.urandom(256 * KiB) for _ in range(8)]
    sends = [zs.send_zc(buf) for buf in ahead]
    expected = b"".join(ahead)
    first = zerosend.BufferPool(2, 256 * KiB)
    pooled = []
    for _ in range(2):
        buf = await first.acquire()
        view = memoryview(buf)
        view[:] = os.urandom(len(view))
        expected += bytes(view)
        pooled.append(zs.send_zc(buf))
        view.release()
        buf.release()
    first.close()
    second = zerosend.BufferPool(2, 256 * KiB)
    for _ in range(2):
        buf = await second.acquire()
        view = memoryview(buf)
        view[:] = os.urandom(len(view))
        expected += bytes(view)
        pooled.append(zs.send_zc(buf))
        view.release()
        buf.release()

    received = bytearray()
    reader = asyncio.create_task(read_all(server, received))
    await asyncio.wait_for(asyncio.gather(*sends, *pooled), timeout=120)
    assert zs.stats["errors"] == 0
    assert zs.stats["fixed_buffer_sends"] == 4
    second.close()
    await zs.aclose()
    await asyncio.wait_for(reader, timeout=120)
    server.close()
    assert received == expected
