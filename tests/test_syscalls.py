"""The io_uring set up with SINGLE_ISSUER | DEFER_TASKRUN (``wrap(..., defer_taskrun=True)``).

The kernel then posts completions only when the loop's thread enters the ring, and runs at most
20 deferred items per pass unless asked for more: many sockets with sends in flight at once make
far more than that, and every one must still resolve, with the bytes intact. A fork child must
leave the parent's deferred ring alone (it would be refused by the kernel, too: another task)
and gets one of its own. Also the harness's counting of system calls over a sending span.
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

import zerosend
from bench.senders.syscalls import span_calls
from tests.helpers import read_all, require_backend, tcp_pair
from tests.test_fork import HANG_GUARD_S, wait_child

KiB = 1 << 10
MiB = 1 << 20


@pytest.fixture
def deferred() -> None:
    require_backend("io_uring")


def ring_setup() -> str | None:
    from zerosend._socket import _drivers

    return _drivers[asyncio.get_running_loop()].ring_setup


@pytest.mark.asyncio
@pytest.mark.usefixtures("deferred")
async def test_many_sockets_on_a_deferred_ring_all_resolve_intact() -> None:
    sockets = 48
    pairs = [await tcp_pair() for _ in range(sockets)]
    received = [bytearray() for _ in pairs]
    readers = [
        asyncio.ensure_future(read_all(server, into))
        for (_, server), into in zip(pairs, received, strict=True)
    ]
    wrapped = [
        zerosend.wrap(c, backend="io_uring", zerocopy_threshold=0, defer_taskrun=True)
        for c, _ in pairs
    ]
    assert ring_setup() == "defer_taskrun"
    payloads = [[os.urandom(256 * KiB) for _ in range(3)] for _ in pairs]
    # Three sends in flight on each socket at once: hundreds of completions deferred together.
    futures = [zs.send_zc(p) for zs, ps in zip(wrapped, payloads, strict=True) for p in ps]
    results = await asyncio.wait_for(asyncio.gather(*futures), HANG_GUARD_S)
    assert [r.nbytes for r in results] == [256 * KiB] * (3 * sockets)
    for zs in wrapped:
        assert zs.stats["notifications"] >= 3
        await asyncio.wait_for(zs.aclose(), HANG_GUARD_S)
    await asyncio.wait_for(asyncio.gather(*readers), HANG_GUARD_S)
    for (_, server), into, ps in zip(pairs, received, payloads, strict=True):
        server.close()
        assert into == b"".join(ps)


def run_deferred_child(inherited: zerosend.Socket, report: int) -> None:
    """As test_fork's child (never returns; writes what went wrong to ``report``), with a
    deferred ring of its own on its fresh loop."""
    status = 1
    try:
        with pytest.raises(RuntimeError, match="fork"):
            inherited.send_zc(b"x" * 65536)
        del inherited
        gc.collect()  # the wrapper and its buffers go; the parent's ring must not change

        async def own_socket() -> None:
            client, server = await tcp_pair()
            received = bytearray()
            reader = asyncio.ensure_future(read_all(server, received))
            zs = zerosend.wrap(client, backend="io_uring", defer_taskrun=True)
            assert ring_setup() == "defer_taskrun"
            payload = os.urandom(MiB)
            assert (await zs.send_zc(payload)).nbytes == MiB
            await zs.aclose()
            await reader
            server.close()
            assert received == payload

        asyncio.run(own_socket())
        status = 0
    except BaseException:
        os.write(report, traceback.format_exc().encode())
    finally:
        os._exit(status)


@pytest.mark.asyncio
@pytest.mark.usefixtures("deferred")
async def test_fork_child_leaves_a_deferred_ring_to_its_parent() -> None:
    client, server = await tcp_pair()
    received = bytearray()
    reader = asyncio.ensure_future(read_all(server, received))
    zs = zerosend.wrap(client, backend="io_uring", zerocopy_threshold=0, defer_taskrun=True)
    assert ring_setup() == "defer_taskrun"
    sent = bytearray(os.urandom(MiB))
    await zs.send_zc(bytes(sent))
    across = os.urandom(8 * MiB)
    in_flight = zs.send_zc(across)  # in flight across the fork: the parent's to reap
    sent += across
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        run_deferred_child(zs, write_end)  # its own loop gets its own deferred ring
    os.close(write_end)
    await asyncio.wait_for(wait_child(pid, read_end), HANG_GUARD_S)
    assert (await asyncio.wait_for(in_flight, HANG_GUARD_S)).nbytes == len(across)
    more = os.urandom(MiB)
    assert (await asyncio.wait_for(zs.send_zc(more), HANG_GUARD_S)).nbytes == MiB
    sent += more
    await asyncio.wait_for(zs.aclose(), HANG_GUARD_S)
    await asyncio.wait_for(reader, HANG_GUARD_S)
    server.close()
    assert received == sent


@pytest.mark.asyncio
async def test_a_bad_defer_taskrun_setting_names_the_option() -> None:
    client, server = await tcp_pair()
    with pytest.raises(TypeError, match="defer_taskrun"):
        zerosend.wrap(client, defer_taskrun="yes")  # type: ignore[arg-type]
    client.close()
    server.close()


@pytest.mark.asyncio
async def test_the_default_ring_says_why_it_runs_without_defer_taskrun() -> None:
    require_backend("io_uring")
    client, server = await tcp_pair()
    zs = zerosend.wrap(client, backend="io_uring")
    setup = ring_setup()
    assert setup is not None and setup != "defer_taskrun" and "not asked for" in setup
    await zs.aclose()
    server.close()


def test_span_calls_counts_between_the_two_getrusage_calls() -> None:
    trace = "\n".join(
        [
            '1 openat(AT_FDCWD, "x", O_RDONLY) = 3',
            "1 getrusage(RUSAGE_SELF, {...}) = 0",
            "1 io_uring_enter(5, 8, 0, 0, NULL, 8) = 8",
            "1 epoll_wait(3,  <unfinished ...>",
            "2 read(7, <unfinished ...>",
            "1 <... epoll_wait resumed>[], 1, 0) = 0",
            "2 <... read resumed>..., 8) = 8",
            "1 getrusage(RUSAGE_SELF, {...}) = 0",
            "1 close(3) = 0",
        ]
    )
    assert span_calls(trace) == {"io_uring_enter": 1, "epoll_wait": 1, "read": 1}
    with pytest.raises(ValueError, match="getrusage"):
        span_calls("1 close(3) = 0")


ACQUIRES = r"""
import asyncio, resource, zerosend

async def main():
    pool = zerosend.BufferPool(4, 4096)
    await pool.acquire()  # the first acquire may look the loop up
    resource.getrusage(resource.RUSAGE_SELF)  # the span starts
    for _ in range(500):
        buf = await pool.acquire()
        buf.release()
    resource.getrusage(resource.RUSAGE_SELF)  # the span ends
    pool.close()

asyncio.run(main())
"""


def test_acquiring_from_a_pool_makes_no_system_call(tmp_path: Path) -> None:
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    trace = tmp_path / "trace"
    subprocess.run(
        ["strace", "-f", "-qq", "-o", str(trace), sys.executable, "-c", ACQUIRES],
        check=True,
        timeout=120,
    )
    # Python 3.11's asyncio.get_running_loop() made a getpid() per acquire.
    assert span_calls(trace.read_text()) == {}


async def pool_sends(pool: zerosend.BufferPool) -> int:
    client, server = await tcp_pair()
    received = bytearray()
    reader = asyncio.ensure_future(read_all(server, received))
    zs = zerosend.wrap(client, backend="io_uring", zerocopy_threshold=0)
    buf = await pool.acquire()
    memoryview(buf)[:] = os.urandom(len(buf))
    expected = bytes(buf)
    await asyncio.wait_for(zs.send_zc(buf), HANG_GUARD_S)
    buf.release()
    fixed = zs.stats["fixed_buffer_sends"]
    await asyncio.wait_for(zs.aclose(), HANG_GUARD_S)
    await asyncio.wait_for(reader, HANG_GUARD_S)
    server.close()
    assert received == expected
    return fixed


def test_a_pool_used_on_successive_loops_and_in_a_fork_child_registers_with_each() -> None:
    require_backend("io_uring")
    pool = zerosend.BufferPool(2, 64 * KiB)
    assert asyncio.run(pool_sends(pool)) == 1
    assert asyncio.run(pool_sends(pool)) == 1  # a new loop: its own driver and registration
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            status = 0 if asyncio.run(pool_sends(pool)) == 1 else 2
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    pool.close()
