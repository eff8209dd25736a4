"""zerosend streams (open_connection, start_server, StreamWriter) on real loopback sockets, on
every backend: integrity and order, back-pressure, errors that are never lost, closing."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import pytest

import zerosend
from bench.harness.receiver import fill_chunk, start_receiver
from bench.harness.rig import Rig
from tests.helpers import read_all, require_probed

MiB = 1 << 20

CHUNK = MiB
CHUNKS = 160
RIG_PORT = 5311


@asynccontextmanager
async def silent_peer(
    backend: str,
) -> AsyncIterator[tuple[asyncio.StreamReader, zerosend.StreamWriter, socket.socket]]:
    """A zerosend stream to a raw peer socket that reads nothing until the test does."""
    loop = asyncio.get_running_loop()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        port = listener.getsockname()[1]
        opened = asyncio.ensure_future(
            zerosend.open_connection("127.0.0.1", port, backend=backend)  # type: ignore[arg-type]
        )
        peer, _ = await loop.sock_accept(listener)
        reader, writer = await opened
    peer.setblocking(False)
    try:
        yield reader, writer, peer
    finally:
        peer.close()
        writer.close()
        with suppress(OSError):  # the test may have ended with unreleased sends: they fail
            await asyncio.wait_for(writer.wait_closed(), 30)


def reset(peer: socket.socket) -> None:
    """Abortive close: the peer's kernel answers the data still coming with RST."""
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    peer.close()


@asynccontextmanager
async def collected_loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Every context the loop's exception handler receives meanwhile."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: seen.append(context))
    try:
        yield seen
    finally:
        loop.set_exception_handler(previous)


@pytest.mark.asyncio
async def test_echo_keeps_bytes_and_order_with_many_writes_in_flight(backend: str) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(MiB):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    # 64 KiB pieces: below the default threshold, so it is set to what the test means.
    reader, writer = await zerosend.open_connection(
        "127.0.0.1",
        port,
        backend=backend,  # type: ignore[arg-type]
        zerocopy_threshold=64 * 1024,
    )
    assert isinstance(reader, asyncio.StreamReader)
    assert writer.get_extra_info("zerosend").backend == backend
    big = bytearray(os.urandom(8 * MiB + 3))
    view = memoryview(big)
    expected = bytearray()
    futures = []
    for i in range(48):
        piece = view[i * 97 : i * 97 + 64 * 1024 + i]  # unaligned, above the threshold
        futures.append(writer.write_zc(piece))
        expected += piece
        if i % 3 == 0:
            small = os.urandom(1 + i * 31)
            writer.write(small)  # copies, in the same ordered stream
            expected += small
        if i % 7 == 0:
            writer.writelines([b"<", bytearray(b"line"), memoryview(b">")])
            expected += b"<line>"
    futures.append(writer.write_zc([b"HDR:", view, b"\0" * 3]))  # more than the socket holds
    expected += b"HDR:" + view + b"\0" * 3
    futures.append(writer.write_zc(b"tail"))
    expected += b"tail"
    assert writer.get_extra_info("zerosend").inflight > 1, "writes should be in flight together"

    # The reader works while the writes are in flight: the echo comes back meanwhile.
    echoed = await asyncio.wait_for(reader.readexactly(len(expected)), 60)
    results = await asyncio.gather(*futures)
    assert [r.nbytes for r in results[:-2]] == [64 * 1024 + i for i in range(48)]
    assert [r.nbytes for r in results[-2:]] == [4 + len(big) + 3, 4]
    assert echoed == expected
    # Every write_zc at or above the threshold was a zero-copy send; "tail" went below it.
    zero_copy = sum(r.nbytes for r in results[:-1])
    stats = writer.get_extra_info("zerosend").stats
    if backend != "copy":
        assert stats["bytes_zerocopy"] + stats["bytes_copied_by_kernel"] == zero_copy, stats
        assert stats["bytes_copied_below_threshold"] == 4, stats
    await writer.drain()
    assert writer.get_write_buffer_size() == 0
    writer.close()
    await writer.wait_closed()
    server.close()
    await server.wait_closed()


@pytest.mark.asyncio
async def test_server_callback_round_trip(backend: str) -> None:
    payload = os.urandom(3 * MiB + 5)
    handled: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: zerosend.StreamWriter) -> None:
        assert writer.get_extra_info("zerosend").backend == backend
        request = await reader.readline()
        head = writer.write_zc(b"OK " + request)
        body = writer.write_zc(payload)
        await writer.drain()
        assert (await head).nbytes == 3 + len(request)
        assert (await body).nbytes == len(payload)
        writer.close()
        await writer.wait_closed()
        handled.append(request.decode())

    async with await zerosend.start_server(serve, "127.0.0.1", 0, backend=backend) as server:  # type: ignore[arg-type]
        assert server.is_serving()
        (listener,) = server.sockets
        port = listener.getsockname()[1]
        serving = asyncio.create_task(server.serve_forever())
        for n in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET {n}\n".encode())
            answer = await asyncio.wait_for(reader.read(), 30)
            assert answer == f"OK GET {n}\n".encode() + payload
            writer.close()
            await writer.wait_closed()
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving
        assert not server.is_serving()
        assert server.sockets == ()
    assert handled == ["GET 0\n", "GET 1\n", "GET 2\n"]


@pytest.mark.asyncio
async def test_server_with_a_plain_function_callback_and_a_failing_one() -> None:
    async with collected_loop_errors() as errors:
        writers: list[zerosend.StreamWriter] = []

        def keep(reader: asyncio.StreamReader, writer: zerosend.StreamWriter) -> None:
            writers.append(writer)
            writer.write(b"hello")

        async def fail(reader: asyncio.StreamReader, writer: zerosend.StreamWriter) -> None:
            raise RuntimeError("the handler broke")

        kept = await zerosend.start_server(keep, "127.0.0.1", 0)
        failing = await zerosend.start_server(fail, "127.0.0.1", 0)
        for server, expected in ((kept, b"hello"), (failing, b"")):
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            # The kept connection stays open; the failed handler's connection was closed.
            got = await asyncio.wait_for(reader.readexactly(5) if expected else reader.read(), 30)
            assert got == expected
            writer.close()
        assert [e["exception"].args for e in errors] == [("the handler broke",)]
        # wait_closed waits for the accepted connections too.
        kept.close()
        waiting = asyncio.create_task(kept.wait_closed())
        await asyncio.sleep(0.05)
        assert not waiting.done()
        kept.close_clients()
        await asyncio.wait_for(waiting, 30)
        assert writers[0].is_closing()
        failing.close()
        await failing.wait_closed()


@pytest.mark.asyncio
async def test_drain_waits_while_more_than_high_is_unreleased(backend: str) -> None:
    async with silent_peer(backend) as (_, writer, peer):
        writer.set_write_buffer_limits(high=2 * MiB)
        assert writer.get_write_buffer_limits() == (MiB // 2, 2 * MiB)
        data = os.urandom(MiB)
        futures = [writer.write_zc(data) for _ in range(32)]
        assert writer.get_write_buffer_size() > 24 * MiB  # the socket holds far less
        draining = asyncio.create_task(writer.drain())
        await asyncio.sleep(0.05)
        # The peer reads nothing: the kernel cannot have released 30 MiB of it.
        assert not draining.done()
        assert writer.get_write_buffer_size() > 2 * MiB
        received = bytearray()
        reading = asyncio.create_task(read_all(peer, received))
        await asyncio.wait_for(draining, 30)
        assert writer.get_write_buffer_size() <= MiB // 2
        await asyncio.gather(*futures)
        assert writer.get_write_buffer_size() == 0
        await writer.drain()  # below the mark: returns at once
        writer.close()
        await writer.wait_closed()
        await asyncio.wait_for(reading, 30)
        assert received == data * 32


@pytest.mark.asyncio
async def test_an_ignored_futures_error_is_raised_by_drain_and_never_logged(
    backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="asyncio")
    async with collected_loop_errors() as errors, silent_peer(backend) as (_, writer, peer):
        payload = os.urandom(MiB)
        # More than the socket holds: most of it waits, unreleased, for the peer to read.
        ignored = [writer.write_zc(payload) for _ in range(32)]
        reset(peer)
        await asyncio.wait_for(asyncio.wait(ignored), 30)
        assert any(f.exception() is not None for f in ignored)
        del ignored
        with pytest.raises((ConnectionResetError, BrokenPipeError)) as raised:
            await writer.drain()
        assert raised.value.errno is not None
        # Every later write raises it too, and sends nothing.
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            writer.write(b"more")
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            writer.write_zc(b"more")
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 30)  # already raised: not again
        gc.collect()
        await asyncio.sleep(0)
    assert errors == []
    assert "never retrieved" not in caplog.text


@pytest.mark.asyncio
async def test_an_error_nothing_raised_yet_is_raised_by_wait_closed(backend: str) -> None:
    async with collected_loop_errors() as errors, silent_peer(backend) as (_, writer, peer):
        for _ in range(32):
            writer.write_zc(os.urandom(MiB))  # futures dropped on the floor
        reset(peer)
        writer.close()
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            await asyncio.wait_for(writer.wait_closed(), 30)
        gc.collect()
        await asyncio.sleep(0)
    assert errors == []


@pytest.mark.asyncio
async def test_wait_closed_waits_for_every_release(backend: str) -> None:
    async with silent_peer(backend) as (_, writer, peer):
        data = bytearray(os.urandom(32 * MiB))
        futures = [writer.write_zc(memoryview(data)[i : i + MiB]) for i in range(0, 32 * MiB, MiB)]
        writer.close()
        assert writer.is_closing()
        closing = asyncio.create_task(writer.wait_closed())
        await asyncio.sleep(0.05)
        assert not closing.done(), "the kernel still holds most of the data"
        assert not all(f.done() for f in futures)
        with pytest.raises(BufferError):
            data.extend(b"the kernel still holds part of it")
        received = bytearray()
        reading = asyncio.create_task(read_all(peer, received))
        await asyncio.wait_for(closing, 30)
        assert all(f.done() and f.result().nbytes == MiB for f in futures)
        assert writer.get_extra_info("socket").fileno() == -1
        data.extend(b"released")
        await asyncio.wait_for(reading, 30)
        assert received == data[: 32 * MiB]


@pytest.mark.asyncio
async def test_cancelling_a_write_future_neither_stops_the_send_nor_its_accounting(
    backend: str,
) -> None:
    async with silent_peer(backend) as (_, writer, peer):
        data = os.urandom(24 * MiB)
        future = writer.write_zc(data)
        future.cancel()
        await asyncio.sleep(0.05)
        # Still unreleased, still counted by the back-pressure.
        assert writer.get_write_buffer_size() == len(data)
        after = writer.write_zc(b"after")
        received = bytearray()
        reading = asyncio.create_task(read_all(peer, received))
        assert (await asyncio.wait_for(after, 30)).nbytes == 5
        writer.close()
        await writer.wait_closed()
        assert writer.get_write_buffer_size() == 0
        await asyncio.wait_for(reading, 30)
        assert received == data + b"after"


@pytest.mark.asyncio
async def test_write_copies_so_the_buffer_may_be_refilled_at_once(backend: str) -> None:
    async with silent_peer(backend) as (_, writer, peer):
        ahead = os.urandom(32 * MiB)
        writer.write_zc(ahead)  # fills the socket: the writes below wait behind it
        scratch = bytearray(b"first" * 1000)
        writer.write(scratch)
        scratch[:] = b"other" * 1000
        writer.writelines([scratch, memoryview(scratch)])
        scratch[:] = b"third" * 1000
        received = bytearray()
        reading = asyncio.create_task(read_all(peer, received))
        writer.close()
        await writer.wait_closed()
        await asyncio.wait_for(reading, 30)
        assert received == ahead + b"first" * 1000 + b"other" * 2000


@pytest.mark.asyncio
async def test_extra_info(backend: str) -> None:
    async with silent_peer(backend) as (_, writer, peer):
        sock = writer.get_extra_info("socket")
        assert isinstance(sock, socket.socket)
        assert writer.get_extra_info("peername") == peer.getsockname()
        assert writer.get_extra_info("sockname") == peer.getpeername() == sock.getsockname()
        zs = writer.get_extra_info("zerosend")
        assert isinstance(zs, zerosend.Socket)
        assert zs.socket is sock and zs.backend == backend
        assert writer.get_extra_info("no such thing", "default") == "default"
        assert writer.can_write_eof()


@pytest.mark.asyncio
async def test_write_eof_shuts_the_write_side_and_reading_goes_on(backend: str) -> None:
    loop = asyncio.get_running_loop()
    async with silent_peer(backend) as (reader, writer, peer):
        data = os.urandom(5 * MiB)
        future = writer.write_zc(data)
        writer.write_eof()
        with pytest.raises(RuntimeError, match="after write_eof"):
            writer.write(b"late")
        received = bytearray()
        await asyncio.wait_for(read_all(peer, received), 30)  # ends: the peer saw EOF
        assert received == data
        assert future.done()
        await loop.sock_sendall(peer, b"answer after EOF")
        peer.shutdown(socket.SHUT_WR)
        assert await asyncio.wait_for(reader.read(), 30) == b"answer after EOF"


@pytest.mark.asyncio
async def test_bad_input_and_a_closed_writer_get_clear_errors(backend: str) -> None:
    async with silent_peer(backend) as (reader, writer, peer):
        with pytest.raises(TypeError, match="encode a str first"):
            writer.write_zc("text")
        with pytest.raises(TypeError, match="not 'int'"):
            writer.write_zc([b"ok", 5])  # nothing of the list is sent
        with pytest.raises(TypeError, match="bytes-like"):
            writer.write(7)
        with pytest.raises(TypeError, match="writelines"):
            writer.write([b"a", b"b"])
        with pytest.raises(TypeError, match="writelines"):
            writer.writelines([b"a", "b"])
        with pytest.raises(ValueError, match="contiguous"):
            writer.write_zc(memoryview(bytearray(64))[::2])
        with pytest.raises(ValueError, match="must be >= low"):
            writer.set_write_buffer_limits(high=1, low=2)
        assert writer.get_write_buffer_size() == 0
        writer.write(b"only this")
        writer.close()
        for attempt in (
            lambda: writer.write(b"x"),
            lambda: writer.write_zc(b"x"),
            lambda: writer.writelines([b"x"]),
        ):
            with pytest.raises(RuntimeError, match="closed writer"):
                attempt()
        await writer.wait_closed()
        received = bytearray()
        await asyncio.wait_for(read_all(peer, received), 30)
        assert received == b"only this"
        assert reader.at_eof()


@pytest.mark.asyncio
async def test_refused_arguments() -> None:
    with pytest.raises(ValueError, match="TLS"):
        await zerosend.open_connection("127.0.0.1", 1, ssl=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="TLS"):
        await zerosend.start_server(lambda r, w: None, "127.0.0.1", 0, ssl=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown backend"):
        await zerosend.open_connection("127.0.0.1", 1, backend="zero")  # type: ignore[arg-type]
    with pytest.raises(ConnectionRefusedError):
        with socket.create_server(("127.0.0.1", 0)) as probe:
            free_port = probe.getsockname()[1]
        await zerosend.open_connection("127.0.0.1", free_port)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        with pytest.raises(ValueError, match="SOCK_STREAM"):
            await zerosend.open_connection(sock=udp)


async def _stream_chunks(host: str, backend: str, *, reuse_after_release: bool) -> dict[str, int]:
    """CHUNKS patterned chunks through one stream: most by write_zc from 4 buffers, each
    refilled for a later chunk; every fifth by write() from one scratch buffer."""
    _, writer = await zerosend.open_connection(host, RIG_PORT, backend=backend)  # type: ignore[arg-type]
    buffers = [bytearray(CHUNK) for _ in range(4)]
    released: list[asyncio.Future[zerosend.SendResult] | None] = [None] * len(buffers)
    scratch = bytearray(CHUNK)
    for index in range(CHUNKS):
        if index % 5 == 4:
            fill_chunk(scratch, index)
            writer.write(scratch)  # a copy: the scratch buffer is refilled right away
            continue
        slot = index % len(buffers)
        previous = released[slot]
        if reuse_after_release:
            if previous is not None:
                await previous  # the contract: reuse only once the kernel released it
            fill_chunk(buffers[slot], index)
            released[slot] = writer.write_zc(buffers[slot])
        else:
            fill_chunk(memoryview(buffers[slot]), index)
            released[slot] = writer.write_zc(buffers[slot])
            # The mistake the contract prevents: overwrite memory the kernel still holds, right
            # after handing it over (before the peer's CPU can have copied it).
            fill_chunk(memoryview(buffers[slot]), index + CHUNKS)
        await writer.drain()
    zs = writer.get_extra_info("zerosend")
    assert zs.backend == backend
    writer.close()
    await writer.wait_closed()
    return zs.stats


async def _run_on_rig(rig: Rig, backend: str, *, reuse_after_release: bool) -> dict[str, Any]:
    verifying = start_receiver(
        rig.peer_addr, RIG_PORT, namespace=rig.ns, once=True, check="verify", chunk=CHUNK
    )
    with verifying as rx:
        stats = await _stream_chunks(
            rig.peer_addr, backend, reuse_after_release=reuse_after_release
        )
        result = await asyncio.to_thread(rx.report, 120)
    assert result["bytes"] == CHUNK * CHUNKS
    # The chunks went as zero-copy sends: the kernel held their pages and said when it let go.
    assert stats["notifications"] > 0
    return result


@pytest.mark.asyncio
async def test_on_the_rig_buffers_reused_after_release_arrive_intact(
    rig: Rig, zc_backend: str
) -> None:
    # Behind veth the kernel holds the pages until the peer's CPU copied them, so a buffer
    # refilled too early would show up as a corrupt chunk at the receiver.
    result = await _run_on_rig(rig, zc_backend, reuse_after_release=True)
    assert result["chunks"] == CHUNKS
    assert result["corrupt"] == [], f"chunks corrupted on the wire: {result['corrupt']}"


@pytest.mark.asyncio
async def test_on_the_rig_reuse_before_release_is_detected(rig: Rig, zc_backend: str) -> None:
    # Control: the check above can fail through a stream too.
    result = await _run_on_rig(rig, zc_backend, reuse_after_release=False)
    assert result["corrupt"], "reusing a buffer before its release went unnoticed"


def test_streams_on_uvloop(backend: str) -> None:
    require_probed("uvloop")
    import uvloop

    payload = os.urandom(6 * MiB + 1)

    async def round_trip() -> bytes:
        assert "uvloop" in type(asyncio.get_running_loop()).__module__

        async def serve(reader: asyncio.StreamReader, writer: zerosend.StreamWriter) -> None:
            size = int(await reader.readline())
            writer.write_zc(payload[:size])
            writer.write(b"|end")
            writer.close()
            await writer.wait_closed()

        async with await zerosend.start_server(serve, "127.0.0.1", 0, backend=backend) as server:  # type: ignore[arg-type]
            port = server.sockets[0].getsockname()[1]
            reader, writer = await zerosend.open_connection("127.0.0.1", port, backend=backend)  # type: ignore[arg-type]
            writer.write(b"%d\n" % len(payload))
            answer = await asyncio.wait_for(reader.read(), 30)
            writer.close()
            await writer.wait_closed()
            return answer

    assert uvloop.run(round_trip()) == payload + b"|end"
