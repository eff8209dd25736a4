"""The io_uring set up with SINGLE_ISSUER | DEFER_TASKRUN (``ZEROSEND_DEFER_TASKRUN=1``).

The kernel then posts completions only when the loop's thread enters the ring, and runs at most
20 deferred items per pass unless asked for more: many sockets with sends in flight at once make
far more than that, and every one must still resolve, with the bytes intact. A fork child must
leave the parent's deferred ring alone (it would be refused by the kernel, too: another task)
and gets one of its own. Also the harness's counting of system calls over a sending span.
"""

from __future__ import annotations

import asyncio
import os

import pytest

import zerosend
from bench.syscalls import span_calls
from tests.helpers import read_all, require_backend, tcp_pair
from tests.test_fork import HANG_GUARD_S, run_child, wait_child

KiB = 1 << 10
MiB = 1 << 20


@pytest.fixture
def deferred(monkeypatch: pytest.MonkeyPatch) -> None:
    require_backend("io_uring")
    monkeypatch.setenv("ZEROSEND_DEFER_TASKRUN", "1")


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
    wrapped = [zerosend.wrap(c, backend="io_uring", zerocopy_threshold=0) for c, _ in pairs]
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


@pytest.mark.asyncio
@pytest.mark.usefixtures("deferred")
async def test_fork_child_leaves_a_deferred_ring_to_its_parent() -> None:
    client, server = await tcp_pair()
    received = bytearray()
    reader = asyncio.ensure_future(read_all(server, received))
    zs = zerosend.wrap(client, backend="io_uring", zerocopy_threshold=0)
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
        run_child(zs, "io_uring", write_end)  # its own loop gets its own deferred ring
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
async def test_a_bad_defer_taskrun_setting_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ZEROSEND_DEFER_TASKRUN", "yes")
    client, server = await tcp_pair()
    with pytest.raises(ValueError, match="ZEROSEND_DEFER_TASKRUN"):
        zerosend.wrap(client)
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
