"""Sends that finish inside their call (a copy the kernel takes whole) return a done
``CompletedSend`` instead of a future: still in order with everything in flight before them,
errors still raised, counters still counted, and usable wherever asyncio takes a future."""

from __future__ import annotations

import asyncio
import os
import socket
import struct

import pytest

import zerosend
from tests.helpers import read_all, tcp_pair, wait_until

pytestmark = pytest.mark.asyncio

KiB = 1 << 10
TCP_CLOSE = 7  # tcp_info.tcpi_state of a connection that got a reset
BROKEN = (ConnectionResetError, BrokenPipeError)


async def test_small_send_behind_a_zero_copy_send_in_flight_keeps_the_order(
    zc_backend: str,
) -> None:
    client, server = await tcp_pair()
    received = bytearray()
    reader = asyncio.create_task(read_all(server, received))
    # A threshold between the two sends: the big one zero-copy, the small one a copy.
    zs = zerosend.wrap(client, backend=zc_backend, zerocopy_threshold=10 * KiB)  # type: ignore[arg-type]
    big = os.urandom(256 * KiB)
    small = b"after the big one"
    first = zs.send_zc(big)
    second = zs.send_zc(small)  # below the threshold: a copy
    # Nothing ran the loop in between, so the zero-copy send cannot be released yet.
    assert not first.done()
    if zc_backend == "msg_zerocopy":
        # The big send is written (awaiting its release): the small one goes at once.
        assert type(second).__name__ == "CompletedSend" and second.done()
    else:
        # The big send waits for this turn's io_uring submission: the small one queues behind.
        assert not second.done()
    assert await second == zerosend.SendResult(len(small), False)
    assert (await first).nbytes == len(big)
    await zs.aclose()
    await reader
    assert bytes(received) == big + small
    server.close()


async def test_small_send_behind_a_full_socket_waits_its_turn(backend: str) -> None:
    client, server = await tcp_pair()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * KiB)
    zs = zerosend.wrap(client, backend=backend)  # type: ignore[arg-type]
    big = os.urandom(8 << 20)
    first = zs.send(big)  # far more than the socket buffer takes at once
    second = zs.send(b"tail")
    assert not first.done() and not second.done()
    received = bytearray()
    reader = asyncio.create_task(read_all(server, received))
    assert await second == zerosend.SendResult(4, False)
    assert first.done()
    await zs.aclose()
    await reader
    assert bytes(received) == big + b"tail"
    server.close()


async def test_inline_sends_are_counted() -> None:
    client, server = await tcp_pair()
    zs = zerosend.wrap(client, backend="copy")
    results = [await zs.send_zc(b"x" * n) for n in (1, 100, 4096)]
    results.append(await zs.send(b"y" * 10))
    assert results == [zerosend.SendResult(n, False) for n in (1, 100, 4096, 10)]
    stats = zs.stats
    assert stats["sends"] == 4 and stats["errors"] == 0
    assert stats["bytes_copied_backend"] == 1 + 100 + 4096
    assert stats["bytes_copied_requested"] == 10
    assert stats["bytes_copied"] == 1 + 100 + 4096 + 10
    assert zs.inflight == 0
    await zs.aclose()
    assert server.recv(1 << 20) == b"x" + b"x" * 100 + b"x" * 4096 + b"y" * 10
    server.close()


async def test_a_send_that_fails_inside_the_call_raises_and_fails_the_next() -> None:
    client, server = await tcp_pair()
    zs = zerosend.wrap(client, backend="copy")
    assert await zs.send_zc(b"before") == zerosend.SendResult(6, False)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    server.close()  # a reset
    await wait_until(
        lambda: client.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == TCP_CLOSE,
        "the reset reached the client",
    )
    failed = zs.send_zc(b"lost")
    assert failed.done() and not failed.cancelled()
    assert isinstance(failed.exception(), BROKEN)
    with pytest.raises(BROKEN):
        await failed
    with pytest.raises(BROKEN):
        failed.result()
    with pytest.raises(BROKEN):
        await zs.send_zc(b"also lost")  # the stream is over: the next send fails the same way
    stats = zs.stats
    assert stats["sends"] == 3 and stats["errors"] == 2
    client.close()


async def test_a_completed_send_works_where_asyncio_takes_a_future() -> None:
    client, server = await tcp_pair()
    zs = zerosend.wrap(client, backend="copy")
    loop = asyncio.get_running_loop()
    done = zs.send(b"a")
    other = zs.send(b"bc")
    assert type(done).__name__ == "CompletedSend"
    assert asyncio.isfuture(done) and done.get_loop() is loop
    assert done.cancel() is False and not done.cancelled()
    assert done.exception() is None and done.result() == zerosend.SendResult(1, False)
    assert await asyncio.gather(done, other) == [
        zerosend.SendResult(1, False),
        zerosend.SendResult(2, False),
    ]
    finished, pending = await asyncio.wait({done, other})
    assert finished == {done, other} and not pending
    assert await asyncio.wait_for(done, timeout=60) == zerosend.SendResult(1, False)
    assert asyncio.ensure_future(done) is done
    called: asyncio.Future[object] = loop.create_future()
    done.add_done_callback(called.set_result)
    assert await called is done  # called on the loop with the send, as a done future does
    assert done.remove_done_callback(called.set_result) == 0
    await zs.aclose()
    assert server.recv(16) == b"abc"
    server.close()
