"""send_file: a file sent with sendfile(2) in the same ordered stream as every other send.

Real files, real sockets on loopback on every backend, and the rig for the zero-copy backends
(where io_uring's in-kernel chains and MSG_ZEROCOPY's deferred releases are real): the byte
stream is checked byte for byte, short transfers are forced with a tiny send buffer and a slow
reader, and every bad input is refused with nothing sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

import zerosend
from bench.harness.rig import Rig
from tests.helpers import read_all, rig_connection, tcp_pair

pytestmark = pytest.mark.asyncio

KiB = 1 << 10
MiB = 1 << 20


@pytest.fixture
def data_file(tmp_path: Path) -> Iterator[tuple[Path, bytes]]:
    """A 3 MiB file of random bytes, not page-aligned in size."""
    content = os.urandom(3 * MiB + 123)
    path = tmp_path / "data.bin"
    path.write_bytes(content)
    yield path, content


async def collect(server: socket.socket) -> bytearray:
    received = bytearray()
    await read_all(server, received)
    return received


async def test_interleaved_send_zc_send_and_send_file_keep_the_order(
    backend: str, data_file: tuple[Path, bytes]
) -> None:
    path, content = data_file
    client, server = await tcp_pair()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * KiB)
    zs = zerosend.wrap(client, backend=backend, zerocopy_threshold=0)  # type: ignore[arg-type]
    reader = asyncio.create_task(collect(server))
    expected = bytearray()
    futures = []
    by_kind = {"send_zc": 0, "send": 0, "send_file": 0}
    with path.open("rb") as file:
        for i in range(60):
            offset, count = (i * 49_999) % MiB, 7_000 + (i * 31_337) % (256 * KiB)
            chunk = bytearray(os.urandom(5_000 + i * 997))
            kind = i % 3
            if kind == 0:
                futures.append(zs.send_zc(chunk))
                expected += chunk
                by_kind["send_zc"] += len(chunk)
            elif kind == 1:
                futures.append(zs.send(chunk))
                expected += chunk
                by_kind["send"] += len(chunk)
            futures.append(zs.send_file(file if i % 2 else file.fileno(), offset, count))
            expected += content[offset : offset + count]
            by_kind["send_file"] += count
        assert file.tell() == 0, "send_file must not move the file's own position"
    # The file object is closed now: zerosend holds its own descriptor until the sends are done.
    results = await asyncio.gather(*futures)
    stats = zs.stats
    await zs.aclose()
    received = await reader
    assert received == expected
    assert sum(r.nbytes for r in results) == len(expected)
    # Each kind of send counted under its own cause (all bytes, whatever the backend).
    assert stats["bytes_sendfile"] == by_kind["send_file"], stats
    assert stats["bytes_copied_requested"] == by_kind["send"], stats
    if backend == "copy":
        assert stats["bytes_copied_backend"] == by_kind["send_zc"], stats
    else:
        assert stats["bytes_zerocopy"] + stats["bytes_copied_by_kernel"] == by_kind["send_zc"]
        assert stats["bytes_copied_below_threshold"] == 0, stats
    assert stats["errors"] == 0


async def test_large_file_to_a_slow_reader_is_finished_across_short_transfers(
    backend: str, tmp_path: Path
) -> None:
    path = tmp_path / "large.bin"
    block = os.urandom(MiB)
    with path.open("wb") as out:
        for i in range(64):
            out.write(bytes([i]) + block[1:])
    client, server = await tcp_pair()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * KiB)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KiB)
    zs = zerosend.wrap(client, backend=backend)  # type: ignore[arg-type]
    digest = hashlib.sha256()
    total = 0

    async def slow_reader() -> None:
        nonlocal total
        loop = asyncio.get_running_loop()
        while chunk := await loop.sock_recv(server, 32 * KiB):
            digest.update(chunk)
            total += len(chunk)
            await asyncio.sleep(0)

    reader = asyncio.create_task(slow_reader())
    with path.open("rb") as file:
        result = await zs.send_file(file)
    assert result == zerosend.SendResult(64 * MiB, False)
    stats = zs.stats
    await zs.aclose()
    await reader
    assert total == 64 * MiB
    assert digest.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()
    assert stats["short_sends"] > 0 and stats["eagain_waits"] > 0
    assert stats["bytes_sendfile"] == 64 * MiB


@pytest.mark.parametrize(
    ("offset", "count", "expected"),
    [
        (0, None, slice(0, None)),
        (1000, None, slice(1000, None)),
        (4096, 10, slice(4096, 4106)),
        (3 * MiB + 123, None, slice(0, 0)),  # offset at the end: nothing to send
        (7, 0, slice(0, 0)),
        (3 * MiB, 123, slice(3 * MiB, None)),  # up to the last byte exactly
    ],
)
async def test_offsets_and_counts(
    data_file: tuple[Path, bytes], offset: int, count: int | None, expected: slice
) -> None:
    path, content = data_file
    client, server = await tcp_pair()
    zs = zerosend.wrap(client, backend="copy")
    reader = asyncio.create_task(collect(server))
    fd = os.open(path, os.O_RDONLY)
    try:
        result = await zs.send_file(fd, offset, count)
    finally:
        os.close(fd)
    await zs.aclose()
    assert await reader == content[expected]
    assert result.nbytes == len(content[expected])


async def test_bad_input_is_refused_with_nothing_sent(
    backend: str, data_file: tuple[Path, bytes], tmp_path: Path
) -> None:
    path, content = data_file
    client, server = await tcp_pair()
    zs = zerosend.wrap(client, backend=backend)  # type: ignore[arg-type]
    reader = asyncio.create_task(collect(server))
    with path.open("rb") as file:
        with pytest.raises(ValueError, match="offset must be >= 0"):
            zs.send_file(file, -1)
        with pytest.raises(ValueError, match="count must be >= 0"):
            zs.send_file(file, 0, -5)
        with pytest.raises(ValueError, match="past the end of the file"):
            zs.send_file(file, 0, len(content) + 1)
        with pytest.raises(ValueError, match="past the end of the file"):
            zs.send_file(file, len(content) + 1)
        with pytest.raises(TypeError, match="offset must be an int"):
            zs.send_file(file, 1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="file object"):
        zs.send_file(b"not a file")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="backed by a descriptor"):
        zs.send_file(io.BytesIO(b"in memory"))
    closed = path.open("rb")
    closed.close()
    with pytest.raises(ValueError, match="closed file"):
        zs.send_file(closed)
    with (tmp_path / "out.bin").open("wb") as write_only:
        write_only.write(b"x" * 100)
        write_only.flush()
        with pytest.raises(OSError, match="write-only") as refused:
            zs.send_file(write_only)
        assert refused.value.errno == 9  # EBADF
    directory = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(IsADirectoryError, match="directory"):
            zs.send_file(directory)
    finally:
        os.close(directory)
    pipe_read, pipe_write = os.pipe()
    try:
        with pytest.raises(ValueError, match="regular file"):
            zs.send_file(pipe_read)
    finally:
        os.close(pipe_read)
        os.close(pipe_write)
    # Nothing of any refused call reached the stream, and it is still usable.
    await zs.send(b"first bytes")
    await zs.aclose()
    assert await reader == b"first bytes"
    with path.open("rb") as file, pytest.raises(OSError, match="closed"):
        zs.send_file(file)


async def test_udp_is_refused_with_what_to_do_instead(data_file: tuple[Path, bytes]) -> None:
    path, _ = data_file
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.setblocking(False)
    sender.connect(receiver.getsockname())
    zs = zerosend.wrap(sender, backend="copy")
    with path.open("rb") as file, pytest.raises(ValueError, match="needs a TCP socket"):
        zs.send_file(file)
    await zs.aclose()
    receiver.close()


async def test_send_file_between_zero_copy_sends_on_the_rig(
    rig: Rig, zc_backend: str, data_file: tuple[Path, bytes]
) -> None:
    """On the rig the zero-copy sends are really in flight (io_uring chains in the kernel,
    releases deferred to the other CPU) when the file's turn comes; the receiver's hash proves
    the order."""
    path, content = data_file
    expected = hashlib.sha256()
    async with rig_connection(rig, 5421) as (sock, report):
        # 256 KiB sends, below the default threshold: sent zero-copy here.
        zs = zerosend.wrap(sock, backend=zc_backend, zerocopy_threshold=256 * KiB)  # type: ignore[arg-type]
        futures = []
        with path.open("rb") as file:
            for i in range(24):
                chunk = bytearray(os.urandom(256 * KiB))
                futures.append(zs.send_zc(chunk))
                expected.update(chunk)
                offset = (i * 100_003) % (2 * MiB)
                futures.append(zs.send_file(file, offset, 512 * KiB))
                expected.update(content[offset : offset + 512 * KiB])
        await asyncio.gather(*futures)
        assert zs.stats["errors"] == 0
        await zs.aclose()
    assert report["bytes"] == 24 * (256 + 512) * KiB
    assert report["sha256"] == expected.hexdigest()


async def test_stream_writer_send_file_between_writes(
    backend: str, data_file: tuple[Path, bytes]
) -> None:
    path, content = data_file
    received = bytearray()
    done = asyncio.Event()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.extend(await reader.read())
        writer.close()
        done.set()

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        _, writer = await zerosend.open_connection("127.0.0.1", port, backend=backend)  # type: ignore[arg-type]
        with path.open("rb") as file:
            writer.write(b"head:")
            first = writer.send_file(file, 100, 200_000)
            writer.write_zc(bytearray(b"z" * 20_000))
            with pytest.raises(ValueError, match="past the end"):
                writer.send_file(file, 0, len(content) + 1)
            rest = writer.send_file(file)
            await writer.drain()
        writer.close()
        await writer.wait_closed()
        await done.wait()
    assert (await first).nbytes == 200_000 and (await rest).nbytes == len(content)
    assert received == b"head:" + content[100:200_100] + b"z" * 20_000 + content
