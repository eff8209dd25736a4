"""BufferPool: registered buffers, waiting for a free one, and release only after the kernel."""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import json
import os
import resource
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

import zerosend
from bench.harness.rig import Rig
from tests.helpers import (
    HELD,
    accepted_not_released,
    driver_round_trip,
    read_all,
    require,
    require_probed,
    rig_connection,
    tcp_pair,
)

MiB = 1 << 20


@pytest.mark.asyncio
async def test_acquire_waits_while_all_are_busy() -> None:
    pool = zerosend.BufferPool(2, 64 * 1024)
    assert (pool.count, pool.size, pool.available) == (2, 64 * 1024, 2)
    a = await pool.acquire()
    b = await pool.acquire()
    assert pool.available == 0
    assert len(a) == 64 * 1024 and a.index != b.index
    third = asyncio.ensure_future(pool.acquire())
    await asyncio.sleep(0.01)
    assert not third.done(), "acquire must wait while every buffer is out"
    b.release()
    c = await asyncio.wait_for(third, 5)
    assert c.index == b.index
    with pytest.raises(BufferError, match="released"):
        memoryview(b)
    b.release()  # idempotent
    a.release()
    c.release()
    assert pool.available == 2
    async with pool.acquire() as d:
        memoryview(d)[:5] = b"hello"
        assert pool.available == 1
    assert pool.available == 2


@pytest.mark.asyncio
async def test_cancelled_acquire_does_not_lose_a_buffer() -> None:
    pool = zerosend.BufferPool(1, 4096)
    held = await pool.acquire()
    waiter = asyncio.ensure_future(pool.acquire())
    await asyncio.sleep(0.01)
    waiter.cancel()
    held.release()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert pool.available == 1
    (await pool.acquire()).release()


@pytest.mark.asyncio
async def test_pool_buffers_are_page_aligned_and_writable() -> None:
    pool = zerosend.BufferPool(3, 5000)
    bufs = [await pool.acquire() for _ in range(3)]
    addresses = []
    for buf in bufs:
        view = memoryview(buf)
        assert not view.readonly and view.nbytes == 5000
        view[:] = bytes([buf.index]) * 5000
        addresses.append(ctypes.addressof(ctypes.c_char.from_buffer(view)))
        view.release()
    assert all(address % 4096 == 0 for address in addresses)
    for buf in bufs:
        assert bytes(memoryview(buf)[:3]) == bytes([buf.index]) * 3
        buf.release()


@pytest.mark.asyncio
async def test_sends_from_the_pool(backend: str) -> None:
    pool = zerosend.BufferPool(4, MiB)
    client, server = await tcp_pair()
    received = bytearray()
    reader = asyncio.create_task(read_all(server, received))
    zs = zerosend.wrap(client, backend=backend, zerocopy_threshold=0)  # the slices too
    expected = bytearray()
    for round_ in range(6):
        async with pool.acquire() as buf:
            view = memoryview(buf)
            view[:] = os.urandom(MiB)
            expected += view  # whole buffer
            expected += view[100 : 100 + 300_000]  # and a slice of it
            await asyncio.gather(zs.send_zc(buf), zs.send_zc(view[100 : 100 + 300_000]))
            view.release()
        assert pool.available == 4, round_
    stats = zs.stats
    if backend == "io_uring":
        assert stats["fixed_buffer_sends"] == 12
    else:
        assert stats["fixed_buffer_sends"] == 0
    await zs.aclose()
    await reader
    server.close()
    assert received == expected


@pytest.mark.asyncio
async def test_release_waits_for_the_kernel(rig: Rig, zc_backend: str) -> None:
    # In the ingress-drop window the kernel accepted the whole buffer but cannot release it: the
    # buffer must stay out of the pool, also after the task awaiting the send was cancelled.
    pool = zerosend.BufferPool(1, HELD)
    async with rig_connection(rig, 5312) as (sock, report):
        zs = zerosend.wrap(sock, backend=zc_backend, zerocopy_threshold=HELD)  # type: ignore[arg-type]
        buf = await pool.acquire()
        memoryview(buf)[:] = b"p" * HELD

        with rig.ingress_drop():
            sent = zs.send_zc(buf)

            async def wait() -> None:
                await sent

            waiter = asyncio.create_task(wait())
            buf.release()  # given back at once: the pool must wait for the kernel
            await accepted_not_released(sock, HELD, zc_backend)
            assert not waiter.done(), "resolved while the kernel still holds the pages"
            assert pool.available == 0
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            assert pool.available == 0, "cancelling the waiter must not return the buffer"
            acquiring = asyncio.ensure_future(pool.acquire())
            await driver_round_trip(zc_backend)
            assert not acquiring.done(), "the only buffer is still the kernel's"
        again = await acquiring  # the rule is lifted: the kernel releases, the pool hands it out
        assert zs.inflight == 0
        again.release()
        assert pool.available == 1
        await zs.aclose()
    assert report == {"bytes": HELD, "sha256": hashlib.sha256(b"p" * HELD).hexdigest()}


def _free_huge_pages() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("HugePages_Free:"):
            return int(line.split()[1])
    raise AssertionError("no HugePages_Free in /proc/meminfo")


@pytest.mark.asyncio
async def test_hugepages_without_reserved_pages_fall_back_with_a_warning(
    sysctl: Callable[[str, str], str],
) -> None:
    sysctl("vm.nr_hugepages", "0")
    with pytest.warns(RuntimeWarning, match="huge pages unavailable"):
        pool = zerosend.BufferPool(2, 4096, hugepages=True)
    assert not pool.hugepages
    async with pool.acquire() as buf:
        memoryview(buf)[:4] = b"ok!!"  # the fallback memory works


@pytest.mark.asyncio
async def test_hugepages_when_reserved_are_used(sysctl: Callable[[str, str], str]) -> None:
    sysctl("vm.nr_hugepages", "4")
    free = _free_huge_pages()
    if free < 1:
        require("hugepages", "the kernel could not reserve a huge page (memory too fragmented?)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        pool = zerosend.BufferPool(2, 4096, hugepages=True)
    assert pool.hugepages
    assert _free_huge_pages() == free - 1, "the pool must live in one (locked) huge page"
    async with pool.acquire() as buf:
        memoryview(buf)[:4] = b"ok!!"


def test_bad_pool_arguments() -> None:
    with pytest.raises(ValueError, match="count"):
        zerosend.BufferPool(0, 4096)
    with pytest.raises(ValueError, match="size"):
        zerosend.BufferPool(1, -5)


LOW_MEMLOCK = """
import json, zerosend
try:
    zerosend.BufferPool(64, 1 << 20)
except OSError as err:
    print(json.dumps({"errno": err.errno, "message": str(err)}))
else:
    print(json.dumps({"errno": None}))
"""


def test_memlock_limit_is_named_in_the_error() -> None:
    require_probed("setpriv")

    def low_memlock() -> None:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (64 * 1024, 64 * 1024))

    # Without CAP_IPC_LOCK (dropped from the bounding set), the 64 KiB limit applies.
    done = subprocess.run(
        ["setpriv", "--bounding-set", "-ipc_lock", "--", sys.executable, "-c", LOW_MEMLOCK],
        preexec_fn=low_memlock,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["errno"] is not None, "locking 64 MiB over a 64 KiB limit must fail"
    assert "RLIMIT_MEMLOCK" in result["message"]


@pytest.mark.asyncio
async def test_a_forgotten_buffer_returns_to_the_pool() -> None:
    pool = zerosend.BufferPool(1, 4096)
    buf = await pool.acquire()
    memoryview(buf)[:3] = b"abc"
    assert pool.available == 0
    del buf  # never released: garbage collection hands it back
    assert pool.available == 1
    (await asyncio.wait_for(pool.acquire(), 5)).release()
