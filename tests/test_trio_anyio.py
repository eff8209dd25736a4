"""The core contract under trio, and under anyio on both of its backends (asyncio and trio).

``zerosend.wrap`` finds the running library itself (sniffio); under trio the driver's one
descriptor is watched by a system task, and sends return futures trio can await. What trio and
anyio change: which library wrap finds, sends in flight through a tiny socket buffer, cancellation
that never stops a send, drain and aclose. Order under hundreds of sends and a peer's reset are
the core's, tested once (tests/test_order.py, tests/test_send.py).
"""

from __future__ import annotations

import array
import asyncio
import socket
from collections.abc import Iterator

import anyio
import pytest
import trio

import zerosend
from tests.helpers import require_backend

pytestmark = pytest.mark.anyio

KiB = 1 << 10


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=["io_uring", "msg_zerocopy", "copy"])
def any_backend(request: pytest.FixtureRequest) -> str:
    require_backend(request.param)
    return request.param


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected TCP pair on loopback, both non-blocking: (client, server side)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    for sock in (client, server):
        sock.setblocking(False)
    yield client, server
    client.close()
    server.close()


def numbered(first_word: int, words: int) -> bytes:
    return array.array("Q", range(first_word, first_word + words)).tobytes()


async def read_until_eof(sock: socket.socket, into: bytearray, piece: int = 1 << 20) -> None:
    while True:
        try:
            chunk = sock.recv(piece)
        except BlockingIOError:
            await anyio.wait_readable(sock)
            continue
        if not chunk:
            return
        into += chunk
        await anyio.sleep(0)  # a slow reader: the sender keeps meeting a full socket


async def test_wrap_picks_the_running_library(
    anyio_backend: str, pair: tuple[socket.socket, socket.socket]
) -> None:
    client, server = pair
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * KiB)
    zs = zerosend.wrap(client, backend="copy")
    # A send the kernel took whole inside the call is done at once, under either library.
    done = zs.send(b"x")
    assert type(done).__name__ == "CompletedSend" and done.done()
    # One that must wait for room gets the running library's future (asyncio: the native one).
    waiting = zs.send(bytes(4 << 20))
    if anyio_backend == "trio":
        assert type(waiting).__name__ == "TrioFuture"
    else:
        assert type(waiting).__name__ == "InFlightSend" and asyncio.isfuture(waiting)
    received = bytearray()
    async with anyio.create_task_group() as tg:
        tg.start_soon(read_until_eof, server, received)
        assert await done == zerosend.SendResult(1, False)
        assert await waiting == zerosend.SendResult(4 << 20, False)
        await zs.aclose()
    assert len(received) == 1 + (4 << 20)


async def test_cancelled_waiter_does_not_stop_the_send(
    anyio_backend: str, any_backend: str, pair: tuple[socket.socket, socket.socket]
) -> None:
    client, server = pair
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * KiB)
    zs = zerosend.wrap(client, backend=any_backend, zerocopy_threshold=0)
    payload = numbered(0, (4 << 20) // 8)
    buf = bytearray(payload)
    future = zs.send_zc(buf)
    with anyio.move_on_after(0) as scope:
        await future  # cancelled at once: the socket is far from taking 4 MiB
    assert scope.cancelled_caught
    assert zs.inflight == 1
    received = bytearray()
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(read_until_eof, server, received)
        # asyncio cancelled the future with its waiter; trio's future keeps its outcome. Either
        # way the send goes out whole and the drain waits for its release.
        await zs.drain()
        assert zs.stats["sends"] == 1 and zs.stats["errors"] == 0
        if anyio_backend == "trio":
            assert future.result().nbytes == len(payload)
        await zs.aclose()
    assert received == payload


async def test_drain_and_aclose_wait_for_every_release(
    anyio_backend: str, any_backend: str, pair: tuple[socket.socket, socket.socket]
) -> None:
    client, server = pair
    zs = zerosend.wrap(client, backend=any_backend, zerocopy_threshold=0)
    futures = [zs.send_zc(bytearray(numbered(i * 8192, 8192))) for i in range(32)]
    received = bytearray()
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(read_until_eof, server, received)
        await zs.drain()
        assert zs.inflight == 0 and all(f.done() for f in futures)
        await zs.aclose()
    assert received == numbered(0, 32 * 8192)
    assert client.fileno() == -1
    with pytest.raises(OSError, match="closed"):
        zs.send(b"late")
    await zs.aclose()  # a second close is harmless


def test_plain_trio_run_with_a_nursery(
    any_backend: str, pair: tuple[socket.socket, socket.socket]
) -> None:
    client, server = pair

    async def main() -> bytearray:
        zs = zerosend.wrap(client, backend=any_backend, zerocopy_threshold=0)
        received = bytearray()
        async with trio.open_nursery() as nursery:

            async def reader() -> None:
                while True:
                    await trio.lowlevel.wait_readable(server)
                    chunk = server.recv(1 << 20)
                    if not chunk:
                        return
                    received.extend(chunk)

            nursery.start_soon(reader)
            for i in range(16):
                result = await zs.send_zc(bytearray(numbered(i * 4096, 4096)))
                assert result.nbytes == 4096 * 8
            await zs.aclose()
        return received

    assert trio.run(main) == numbered(0, 16 * 4096)


def test_wrap_outside_any_event_loop_says_what_is_needed(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    with pytest.raises(RuntimeError, match="asyncio event loop or under trio"):
        zerosend.wrap(pair[0])
