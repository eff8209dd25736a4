"""anyio's ``ByteSendStream`` and trio's ``SendStream`` over zerosend, and ``BufferPool`` under
trio: the core contract (order, release before resolve, errors) under anyio on asyncio, uvloop
and trio, with each library's own exceptions."""

from __future__ import annotations

import array
import socket
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import trio

import zerosend
from tests.helpers import require_backend
from zerosend.anyio_stream import ZerosendByteSendStream
from zerosend.trio_stream import ZerosendSendStream

pytestmark = pytest.mark.anyio

KiB = 1 << 10
MiB = 1 << 20
#: More than both socket buffers hold (tcp_wmem and tcp_rmem maxima, 4 and 6 MiB by default).
BEYOND_BUFFERS = 32 * MiB
HANG_GUARD = 120  # seconds: a hang guard on a loaded machine, never a verdict


ANYIO_BACKENDS = [
    pytest.param(("asyncio", {}), id="asyncio"),
    pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    pytest.param(("trio", {}), id="trio"),
]
#: (anyio backend, stream kind): anyio's stream on every anyio backend, trio's under trio only
#: (no combination is generated only to be skipped).
STACKS = [
    pytest.param(("asyncio", {}), "anyio", id="anyio-asyncio"),
    pytest.param(("asyncio", {"use_uvloop": True}), "anyio", id="anyio-uvloop"),
    pytest.param(("trio", {}), "anyio", id="anyio-trio"),
    pytest.param(("trio", {}), "trio", id="trio"),
]
each_stack = pytest.mark.parametrize(("anyio_backend", "kind"), STACKS)


@pytest.fixture(params=ANYIO_BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


@pytest.fixture(params=["io_uring", "msg_zerocopy", "copy"])
def any_backend(request: pytest.FixtureRequest) -> str:
    require_backend(request.param)
    return str(request.param)


class Errors:
    def __init__(self, kind: str) -> None:
        lib: Any = trio if kind == "trio" else anyio
        self.broken = lib.BrokenResourceError
        self.closed = lib.ClosedResourceError
        self.busy = lib.BusyResourceError


def open_stream(kind: str, sock: socket.socket, backend: str, threshold: int = 0) -> Any:
    cls: Any = ZerosendSendStream if kind == "trio" else ZerosendByteSendStream
    return cls(sock, backend=backend, zerocopy_threshold=threshold)


async def send(kind: str, stream: Any, data: Any) -> None:
    if kind == "trio":
        await stream.send_all(data)
    else:
        await stream.send(data)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(client, peer) on loopback."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client = socket.create_connection(listener.getsockname())
        peer, _ = listener.accept()
    client.setblocking(False)
    peer.settimeout(HANG_GUARD)
    yield client, peer
    client.close()
    peer.close()


def read_exactly(peer: socket.socket, nbytes: int) -> bytes:
    got = bytearray()
    while len(got) < nbytes:
        chunk = peer.recv(min(MiB, nbytes - len(got)))
        if not chunk:
            break
        got += chunk
    return bytes(got)


def numbered(first: int, words: int) -> bytes:
    return array.array("Q", range(first, first + words)).tobytes()


def held(buffer: bytearray) -> bool:
    try:
        buffer.append(0)
    except BufferError:
        return True
    buffer.pop()
    return False


@each_stack
async def test_order_of_many_sends_of_every_size(
    kind: str, any_backend: str, pair: tuple[socket.socket, socket.socket]
) -> None:
    client, peer = pair
    stream = open_stream(kind, client, any_backend, threshold=16 * KiB)
    pieces, word = [], 0
    for words in [1, 100, 8 * KiB, 3, 64 * KiB, 7, 128 * KiB]:  # around the threshold
        pieces.append(numbered(word, words))
        word += words
    expected = b"".join(pieces)
    with anyio.fail_after(HANG_GUARD):
        async with anyio.create_task_group() as tasks:

            async def receive() -> None:
                got = await anyio.to_thread.run_sync(read_exactly, peer, len(expected))
                assert got == expected

            tasks.start_soon(receive)
            for piece in pieces:
                await send(kind, stream, piece)
                await send(kind, stream, memoryview(piece)[:0])  # empty: nothing to send
        await stream.aclose()


@each_stack
async def test_a_send_returns_only_after_the_kernel_released_the_data(
    kind: str, any_backend: str, pair: tuple[socket.socket, socket.socket]
) -> None:
    client, peer = pair
    stream = open_stream(kind, client, any_backend)
    data = bytearray(BEYOND_BUFFERS)  # the peer must read for it to be released
    returned = anyio.Event()
    with anyio.fail_after(HANG_GUARD):
        async with anyio.create_task_group() as tasks:

            async def sender() -> None:
                await send(kind, stream, data)
                returned.set()

            tasks.start_soon(sender)
            await anyio.wait_all_tasks_blocked()
            assert not returned.is_set()
            assert held(data)  # the send holds the buffer while the kernel does
            got = await anyio.to_thread.run_sync(read_exactly, peer, len(data))
            await returned.wait()
            assert not held(data)
            assert got == bytes(len(data))
        await stream.aclose()


@each_stack
async def test_errors_are_the_library_s(
    kind: str, any_backend: str, pair: tuple[socket.socket, socket.socket]
) -> None:
    client, peer = pair
    errors = Errors(kind)
    stream = open_stream(kind, client, any_backend)
    failures: list[Exception] = []

    async def sender() -> None:
        try:
            await send(kind, stream, bytes(BEYOND_BUFFERS))
        except Exception as error:
            failures.append(error)

    with anyio.fail_after(HANG_GUARD):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(sender)
            await anyio.wait_all_tasks_blocked()
            with pytest.raises(errors.busy):
                await send(kind, stream, b"a second task at once")
            # The peer goes away with a reset: the send in progress fails.
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            peer.close()
        assert len(failures) == 1 and isinstance(failures[0], errors.broken), failures
        assert isinstance(failures[0].__cause__, OSError)
        with pytest.raises(errors.broken):
            for _ in range(100):  # the socket's error is remembered: bounded retries
                await send(kind, stream, bytes(64 * KiB))
        await stream.aclose()
        await stream.aclose()  # twice is fine
        with pytest.raises(errors.closed):
            await send(kind, stream, b"after aclose")


@each_stack
async def test_aclose_cancelled_resets_and_still_closes(
    kind: str, any_backend: str, pair: tuple[socket.socket, socket.socket]
) -> None:
    client, peer = pair
    stream = open_stream(kind, client, any_backend)
    zs = stream.zerosend_socket
    failures: list[Exception] = []

    async def sender() -> None:
        try:
            await send(kind, stream, bytes(BEYOND_BUFFERS))
        except Exception as error:
            failures.append(error)

    with anyio.fail_after(HANG_GUARD):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(sender)
            await anyio.wait_all_tasks_blocked()
            with anyio.CancelScope() as scope:
                scope.cancel()
                await stream.aclose()
    # The send in progress ends with the library's "closed", its cause the kernel's error.
    assert len(failures) == 1 and isinstance(failures[0], Errors(kind).closed), failures
    assert zs.inflight == 0
    assert "closed" in repr(zs)
    with pytest.raises(ConnectionResetError):
        read_exactly(peer, 2 * BEYOND_BUFFERS)


async def test_anyio_extra_attributes(
    anyio_backend: Any, pair: tuple[socket.socket, socket.socket]
) -> None:
    from anyio.abc import SocketAttribute

    client, _ = pair
    stream = ZerosendByteSendStream(client)
    assert stream.extra(SocketAttribute.raw_socket) is client
    assert stream.extra(SocketAttribute.remote_address) == client.getpeername()
    await stream.aclose()


@each_stack
async def test_buffer_pool_buffers_through_a_stream(
    kind: str, any_backend: str, pair: tuple[socket.socket, socket.socket]
) -> None:
    """BufferPool under every loop, trio included: acquire waits while all are busy and wakes
    when one comes back; a waiting acquire can be cancelled."""
    client, peer = pair
    stream = open_stream(kind, client, any_backend)
    sent = bytearray()
    with anyio.fail_after(HANG_GUARD):
        async with zerosend.BufferPool(2, 64 * KiB) as pool:
            async with anyio.create_task_group() as tasks:

                async def receive() -> None:
                    got = await anyio.to_thread.run_sync(read_exactly, peer, 6 * 64 * KiB)
                    assert got == bytes(sent)

                tasks.start_soon(receive)
                first = await pool.acquire()
                second = await pool.acquire()
                assert pool.available == 0
                with anyio.move_on_after(0.05) as waited:  # a waiting acquire, cancelled
                    await pool.acquire()
                assert waited.cancelled_caught
                woke = anyio.Event()

                async def third() -> None:
                    async with pool.acquire() as buf:
                        memoryview(buf)[:] = bytes([3]) * len(buf)
                        sent.extend(memoryview(buf))
                        await send(kind, stream, buf)
                    woke.set()

                tasks.start_soon(third)
                await anyio.wait_all_tasks_blocked()
                assert not woke.is_set()
                for n, buf in enumerate((first, second)):
                    memoryview(buf)[:] = bytes([n]) * len(buf)
                    sent.extend(memoryview(buf))
                    await send(kind, stream, buf)
                first.release()
                await woke.wait()
                second.release()
                for n in range(3):
                    async with pool.acquire() as buf:
                        memoryview(buf)[:] = bytes([10 + n]) * len(buf)
                        sent.extend(memoryview(buf))
                        await send(kind, stream, buf)
        await stream.aclose()
