"""send_zc on real loopback sockets, on every backend: integrity, order, ownership, failures."""

from __future__ import annotations

import array
import asyncio
import gc
import hashlib
import mmap
import os
import socket

import pytest

import zerosend
from bench.harness.rig import Rig
from tests.helpers import (
    HELD,
    accepted_not_released,
    assert_zero_copy_sends,
    driver_round_trip,
    read_all,
    require_backend,
    require_probed,
    rig_connection,
    tcp_pair,
    unsent_bytes,
)

MiB = 1 << 20

pytestmark = pytest.mark.asyncio


def _payloads() -> list[object]:
    """Mixed sizes from 1 B to 64 MiB: unaligned slices, mmap, array, vectors, copies."""
    big = bytearray(os.urandom(9 * MiB + 13))
    view = memoryview(big)
    mapped = mmap.mmap(-1, 3 * MiB + 5)
    mapped.write(os.urandom(len(mapped)))
    numbers = array.array("i", range(5000))
    huge = bytearray(os.urandom(64 * MiB))
    return [
        b"x",
        bytes(os.urandom(7)),
        view[3:103],  # unaligned slice
        bytearray(os.urandom(4095)),
        view[1 : 1 + 10239],  # just below the threshold
        view[5 : 5 + 10240],  # at the threshold
        mapped,
        numbers,  # format "i": sent as its raw bytes
        [os.urandom(48), view[7 : 7 + 65537], b"\0\0\0"],  # header + payload + padding
        view[11 : 11 + 8 * MiB + 1],
        huge,
        (b"tail", memoryview(b"-end")),
        b"",
    ]


def _flatten(payload: object) -> bytes:
    if isinstance(payload, list | tuple):
        return b"".join(bytes(memoryview(p).cast("B")) for p in payload)
    return bytes(memoryview(payload).cast("B"))  # type: ignore[arg-type]


async def test_integrity_and_order_with_many_in_flight(backend: str) -> None:
    client, server = await tcp_pair()
    received = bytearray()
    reader = asyncio.create_task(read_all(server, received))
    # The payloads straddle 10 KiB (just below it, at it): that threshold, set here.
    zs = zerosend.wrap(client, backend=backend, zerocopy_threshold=10240)
    assert zs.backend == backend
    payloads = _payloads()
    expected = bytearray()
    futures = []
    for i, payload in enumerate(payloads):
        expected += _flatten(payload)
        # Interleave copying sends: they share the ordered stream.
        if i % 4 == 3:
            futures.append(zs.send(payload))
        else:
            futures.append(zs.send_zc(payload))
    assert zs.inflight > 1, "sends should be in flight together"
    results = await asyncio.gather(*futures)
    for payload, result in zip(payloads, results, strict=True):
        assert result.nbytes == len(_flatten(payload))
        # Loopback always copies (deferred copy on local delivery), so nothing is zero-copy here,
        # and the result must say so rather than pretend.
        assert result.zerocopy is False
    stats = zs.stats
    assert stats["sends"] == len(payloads)
    assert stats["bytes_copied"] + stats["bytes_zerocopy"] == len(expected)
    if backend != "copy":
        assert stats["notifications"] > 0
        assert stats["bytes_copied_by_kernel"] > 0
        assert stats["bytes_copied_below_threshold"] > 0
    await zs.aclose()
    await reader
    server.close()
    assert len(received) == len(expected)
    assert received == expected


RIG_PORT = 5311


async def test_buffer_is_held_until_the_kernel_releases_it(rig: Rig, zc_backend: str) -> None:
    # The ingress-drop window: the kernel accepts the whole send but the peer acknowledges
    # nothing while the rule stands, so the pages are not released. Resolving at acceptance
    # (the classic early-release bug) fails here; on loopback it could not be told apart.
    data = bytearray(os.urandom(HELD))
    expected = hashlib.sha256(data).hexdigest()
    async with rig_connection(rig, RIG_PORT) as (sock, report):
        zs = zerosend.wrap(sock, backend=zc_backend, zerocopy_threshold=HELD)  # type: ignore[arg-type]
        with rig.ingress_drop() as drop:
            future = zs.send_zc(data)
            await accepted_not_released(sock, HELD, zc_backend)
            assert not future.done(), "resolved while the kernel still holds the pages"
            assert zs.inflight == 1
            with pytest.raises(BufferError):
                data.extend(b"resize while the kernel holds it")
        assert drop.dropped > 0, "the window must have dropped the peer's packets"
        result = await future
        assert result.nbytes == HELD
        assert unsent_bytes(sock) == 0, "released only once the peer acknowledged everything"
        assert zs.inflight == 0
        data.extend(b"now it may grow")  # the export was released
        await zs.aclose()
    assert report == {"bytes": HELD, "sha256": expected}


async def test_cancelling_the_waiter_keeps_the_send_whole(rig: Rig, zc_backend: str) -> None:
    data = bytearray(os.urandom(HELD))
    after = b"after-the-cancelled-send"
    expected = hashlib.sha256(bytes(data) + after).hexdigest()
    async with rig_connection(rig, RIG_PORT) as (sock, report):
        zs = zerosend.wrap(sock, backend=zc_backend, zerocopy_threshold=HELD)  # type: ignore[arg-type]

        async def waiter() -> None:
            await zs.send_zc(data)

        with rig.ingress_drop():
            task = asyncio.create_task(waiter())
            await accepted_not_released(sock, HELD, zc_backend)
            assert not task.done(), "resolved while the kernel still holds the pages"
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            del task
            gc.collect()
            # Cancelled, but the kernel still has the pages: the buffer stays held.
            await driver_round_trip(zc_backend)
            assert zs.inflight == 1
            with pytest.raises(BufferError):
                data.extend(b"!")
            following = zs.send_zc(after)  # small: goes by copy, behind the held send
            await driver_round_trip(zc_backend)
            with pytest.raises(BufferError):
                data.extend(b"!")
        await following
        await zs.drain()
        assert zs.inflight == 0
        data.extend(b"!")  # released at last
        await zs.aclose()
    assert report == {"bytes": HELD + len(after), "sha256": expected}


async def test_peer_reset_raises_and_nothing_hangs(backend: str) -> None:
    client, server = await tcp_pair()
    zs = zerosend.wrap(client, backend=backend)
    loop = asyncio.get_running_loop()
    payload = bytearray(os.urandom(MiB))
    first = zs.send_zc(payload)
    assert len(await loop.sock_recv(server, 4096)) > 0
    # Abortive close: the peer answers further data with RST.
    server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    server.close()
    futures = [first] + [zs.send_zc(payload) for _ in range(64)]
    outcomes = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 30)
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert errors, "sending into a reset connection must fail"
    for error in errors:
        assert isinstance(error, ConnectionResetError | BrokenPipeError), repr(error)
        assert error.errno is not None
    # Once the stream failed, new sends fail at once with the same kind of error.
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        await zs.send_zc(payload)
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        await zs.send(b"a copying send after the reset")
    await asyncio.wait_for(zs.drain(), 30)
    assert zs.inflight == 0
    payload.extend(b"released")
    await zs.aclose()


async def test_reading_the_socket_while_sends_are_in_flight(backend: str) -> None:
    client, server = await tcp_pair()
    loop = asyncio.get_running_loop()

    async def echo() -> None:
        buf = bytearray(MiB)
        while n := await loop.sock_recv_into(server, buf):
            await loop.sock_sendall(server, memoryview(buf)[:n])
        server.close()

    echo_task = asyncio.create_task(echo())
    zs = zerosend.wrap(client, backend=backend)
    data = os.urandom(6 * MiB)
    echoed = bytearray()

    async def read_back() -> None:
        buf = bytearray(MiB)
        while len(echoed) < len(data):
            n = await loop.sock_recv_into(client, buf)
            assert n > 0
            echoed.extend(memoryview(buf)[:n])

    reader = asyncio.create_task(read_back())
    sends = [zs.send_zc(memoryview(data)[i : i + MiB]) for i in range(0, len(data), MiB)]
    await asyncio.gather(*sends)
    await reader
    assert echoed == data
    await zs.aclose()
    await echo_task


async def test_ipv6(backend: str) -> None:
    require_probed("ipv6")
    client, server = await tcp_pair(socket.AF_INET6)
    received = bytearray()
    reader = asyncio.create_task(read_all(server, received))
    data = os.urandom(3 * MiB + 1)
    async with zerosend.wrap(client, backend=backend) as zs:
        assert (await zs.send_zc(data)).nbytes == len(data)
    await reader
    server.close()
    assert received == data


async def test_udp_datagrams(backend: str) -> None:
    loop = asyncio.get_running_loop()
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * MiB)
    receiver.bind(("127.0.0.1", 0))
    receiver.setblocking(False)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.connect(receiver.getsockname())
    sender.setblocking(False)
    zs = zerosend.wrap(sender, backend=backend, zerocopy_threshold=4096)
    sizes = [0, 1, 1400, 4096, 20000, 65507]
    datagrams = [os.urandom(n) for n in sizes]
    results = await asyncio.gather(*(zs.send_zc([d[:10], d[10:]]) for d in datagrams))
    assert [r.nbytes for r in results] == sizes
    for expected in datagrams:
        got = await asyncio.wait_for(loop.sock_recv(receiver, 70000), 5)
        assert got == expected
    # Maximal datagrams at many alignments arrive whole.
    region = mmap.mmap(-1, MiB)
    region.write(os.urandom(MiB))
    for offset in range(100, 4096, 500):
        part = memoryview(region)[offset : offset + 65507]
        assert (await zs.send_zc(part)).nbytes == 65507
        assert await asyncio.wait_for(loop.sock_recv(receiver, 70000), 5) == part
        part.release()
    # A datagram gathered from 20 pieces on 20 pages needs more fragments than a zero-copy skb
    # holds (17): the kernel refuses it (EMSGSIZE); it goes by copy, arrives whole, and both
    # the result and the counter say so.
    pieces = [memoryview(region)[i * 8192 : i * 8192 + 3000] for i in range(20)]
    refusals = zs.stats["zerocopy_refusals"]
    result = await zs.send_zc(pieces)
    assert result == zerosend.SendResult(60000, False)
    assert await asyncio.wait_for(loop.sock_recv(receiver, 70000), 5) == b"".join(pieces)
    if backend != "copy":
        assert zs.stats["zerocopy_refusals"] == refusals + 1
    for piece in pieces:
        piece.release()
    # Too big for one datagram: a clear error for that send only, the socket goes on.
    with pytest.raises(OSError) as raised:
        await zs.send_zc(bytearray(70000))
    assert raised.value.errno == 90  # EMSGSIZE
    assert (await zs.send_zc(b"still works")).nbytes == 11
    assert await asyncio.wait_for(loop.sock_recv(receiver, 100), 5) == b"still works"
    await zs.aclose()
    receiver.close()


async def test_async_with_drains_and_closes(backend: str) -> None:
    client, server = await tcp_pair()
    received = bytearray()
    reader = asyncio.create_task(read_all(server, received))
    data = bytearray(os.urandom(5 * MiB))
    async with zerosend.wrap(client, backend=backend) as zs:
        futures = [zs.send_zc(data) for _ in range(4)]
    # Leaving the block waited for every release.
    assert all(f.done() for f in futures)
    assert client.fileno() == -1
    assert zs.inflight == 0 and zs.stats["sends"] == 4
    await reader
    server.close()
    assert received == bytes(data) * 4


async def test_many_small_sends_queued_behind_a_full_socket(backend: str) -> None:
    # The peer reads nothing at first, so the socket fills and thousands of small sends queue
    # up (copying ones are gathered into shared sendmsg calls); all must arrive whole, in order.
    client, server = await tcp_pair()
    zs = zerosend.wrap(client, backend=backend)
    parts = [os.urandom(1 + (i * 997) % 6000) for i in range(3000)]
    parts[1500] = os.urandom(2 * MiB)  # one large zero-copy send in the middle of the queue
    sends = [zs.send_zc(p) if i % 3 else zs.send(p) for i, p in enumerate(parts)]
    await asyncio.sleep(0.05)
    assert zs.inflight > 100, "the sends should be queued behind the full socket"
    received = bytearray()
    reader = asyncio.create_task(read_all(server, received))
    results = await asyncio.wait_for(asyncio.gather(*sends), 60)
    assert [r.nbytes for r in results] == [len(p) for p in parts]
    assert zs.stats["eagain_waits"] > 0
    await zs.aclose()
    await reader
    server.close()
    assert received == b"".join(parts)


async def test_an_empty_send_queued_between_others(backend: str) -> None:
    client, server = await tcp_pair()
    zs = zerosend.wrap(client, backend=backend, zerocopy_threshold=0)
    first, empty, last = os.urandom(4 * MiB), b"", os.urandom(MiB)
    sends = [zs.send_zc(first), zs.send_zc(empty), zs.send_zc(last)]
    received = bytearray()
    reader = asyncio.create_task(read_all(server, received))
    results = await asyncio.wait_for(asyncio.gather(*sends), 30)
    assert [r.nbytes for r in results] == [4 * MiB, 0, MiB]
    await zs.aclose()
    await reader
    server.close()
    assert received == first + last


async def test_wrapping_again_after_the_first_wrapper_is_gone(backend: str) -> None:
    # The kernel's MSG_ZEROCOPY counter keeps counting across wrappers; a second wrapper must
    # continue from it, or completions would release the wrong sends.
    client, server = await tcp_pair()
    received = bytearray()
    reader = asyncio.create_task(read_all(server, received))
    expected = bytearray()
    for _ in range(3):
        # Threshold 0: every send a zero-copy send, each one moving the kernel's counter.
        zs = zerosend.wrap(client, backend=backend, zerocopy_threshold=0)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="already wrapped"):
            zerosend.wrap(client, backend=backend)
        chunks = [os.urandom(256 * 1024) for _ in range(8)]
        results = await asyncio.wait_for(asyncio.gather(*(zs.send_zc(c) for c in chunks)), 30)
        assert sum(r.nbytes for r in results) == 8 * 256 * 1024
        expected += b"".join(chunks)
        await zs.drain()
        assert_zero_copy_sends(zs.stats, backend, 8 * 256 * 1024)
        del zs  # the driver lets go of the socket; the connection stays open
        gc.collect()
    client.close()
    await reader
    server.close()
    assert received == expected


async def test_so_zerocopy_set_by_other_code_is_not_trusted() -> None:
    require_backend("msg_zerocopy")
    client, server = await tcp_pair()
    with client, server:
        client.setsockopt(socket.SOL_SOCKET, 60, 1)  # SO_ZEROCOPY, as other code might
        with pytest.raises(zerosend.BackendUnavailableError, match="counter is unknown"):
            zerosend.wrap(client, backend="msg_zerocopy")
