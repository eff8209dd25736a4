"""The core contract of ``zerosend.wrap()``, run in a child process by tests/test_fallback.py.

Each scenario runs against real sockets, once with the native extension and once with it hidden
(``tests.hide_native`` imported first), so both backends are held to the very same assertions.
A scenario prints one JSON line of facts for the parent to compare; a failed assertion fails
the child.
"""

from __future__ import annotations

import array
import asyncio
import ctypes
import errno
import json
import mmap
import socket
import struct
import sys
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

import zerosend
from tests.helpers import read_all, tcp_pair

Facts = dict[str, Any]


def _pattern(i: int, size: int) -> bytearray:
    """Bytes that differ per send and per position, so a reordering or a hole shows."""
    stamp = struct.pack("<I", i)
    return bytearray((stamp * (size // 4 + 1))[:size])


def _exported(data: bytearray) -> list[bytes]:
    """[data's first bytes] if something still holds an export of ``data``, else []."""
    try:
        data.append(0)
    except BufferError:
        return [bytes(data[:8])]
    del data[-1]
    return []


async def ordered_many_in_flight() -> Facts:
    client, server = await tcp_pair()
    # A small send buffer and a peer that reads only later: most sends wait for room.
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
    zs = zerosend.wrap(client)
    expected = bytearray()
    futures: list[asyncio.Future[zerosend.SendResult]] = []
    resolved: list[int] = []
    still_held: list[bytes] = []
    held: list[bytearray] = []
    sizes = [(i * 7919) % (512 << 10) + 1 for i in range(64)]
    for i, size in enumerate(sizes):
        data = _pattern(i, size)
        held.append(data)
        if i % 8 == 3:  # a vectored send: header, payload slice, trailer
            half = size // 2
            buf: Any = [b"HDR", memoryview(data)[:half], array.array("I", [i]), data[half:]]
            expected += b"HDR" + data[:half] + array.array("I", [i]).tobytes() + data[half:]
        elif i % 8 == 5:
            mapped = mmap.mmap(-1, size)
            mapped[:] = data
            buf = mapped
            expected += data
        else:
            buf = data
            expected += data
        send = zs.send if i % 5 == 4 else zs.send_zc
        future = send(buf)
        future.add_done_callback(lambda _, i=i: resolved.append(i))
        future.add_done_callback(lambda _, data=data: still_held.extend(_exported(data)))
        futures.append(future)
    futures.append(zs.send_zc(b""))  # an empty send keeps its place too
    futures[-1].add_done_callback(lambda _: resolved.append(len(sizes)))

    assert zs.inflight > 0, "the peer is not reading: sends must be waiting"
    assert _exported(held[-1]), "a bytearray in flight could be resized"

    received = bytearray()
    reader = asyncio.create_task(read_all(server, received))
    results = await asyncio.gather(*futures)
    assert not _exported(held[-1])
    stats = zs.stats
    await zs.aclose()
    await reader
    server.close()

    assert received == expected, "bytes arrived out of order or damaged"
    assert resolved == list(range(len(sizes) + 1)), resolved
    assert not still_held, "a send resolved while its buffer was still held"
    assert all(not r.zerocopy for r in results)
    assert [r.nbytes for r in results[:-1]] == [
        size + 3 + 4 if i % 8 == 3 else size for i, size in enumerate(sizes)
    ]
    assert results[-1] == zerosend.SendResult(0, False)
    assert stats["sends"] == len(futures)
    assert stats["bytes_copied"] == len(expected) and stats["bytes_zerocopy"] == 0
    assert stats["eagain_waits"] > 0 and stats["errors"] == 0
    return {"backend": zs.backend, "stats_keys": sorted(stats)}


async def cancelled_send_still_goes_whole() -> Facts:
    client, server = await tcp_pair()
    zs = zerosend.wrap(client)
    big = _pattern(1, 16 << 20)

    async def wait_for(future: asyncio.Future[zerosend.SendResult]) -> None:
        await future

    task = asyncio.create_task(wait_for(zs.send_zc(big)))
    await asyncio.sleep(0)
    task.cancel()  # cancels the awaited send's future, not the send
    direct = zs.send_zc(_pattern(2, 1 << 20))
    direct.cancel()  # cancelling the future itself does not stop the send either
    tail = zs.send(b"END")
    received = bytearray()
    reader = asyncio.create_task(read_all(server, received))
    await tail
    await zs.aclose()
    await reader
    server.close()
    assert received == big + _pattern(2, 1 << 20) + b"END"
    return {"inflight_after": zs.inflight}


async def stream_errors() -> Facts:
    client, server = await tcp_pair()
    zs = zerosend.wrap(client)
    # The peer resets the connection (SO_LINGER 0): sends fail with the kernel's errno.
    server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    server.close()
    first: OSError | None = None
    for _ in range(100):
        try:
            await zs.send_zc(bytearray(1 << 16))
        except OSError as e:
            first = e
            break
    assert first is not None, "no send failed after the peer reset the connection"
    assert isinstance(first, ConnectionResetError | BrokenPipeError), repr(first)
    with_later = zs.send_zc(b"after the failure")
    try:
        await with_later
    except OSError as later:
        assert later.errno == first.errno, (later, first)  # the stream broke: same error
    else:
        raise AssertionError("a send after the stream broke succeeded")
    assert zs.stats["errors"] >= 1
    await zs.aclose()
    assert client.fileno() == -1
    try:
        zs.send_zc(b"after close")
    except OSError as closed:
        assert closed.errno == errno.EBADF and "closed" in str(closed), closed
    else:
        raise AssertionError("send_zc after aclose() did not raise")
    try:
        zerosend.wrap(client)
    except ValueError as e:
        assert "closed" in str(e)
    else:
        raise AssertionError("wrapping a closed socket did not raise")
    return {"errno": errno.errorcode[first.errno or 0]}


def _raises(kind: type[BaseException], match: str, call: Callable[[], object]) -> None:
    try:
        call()
    except kind as e:
        assert match in str(e), (match, str(e))
    else:
        raise AssertionError(f"{call} did not raise {kind.__name__}")


async def bad_arguments() -> Facts:
    client, server = await tcp_pair()
    zs = zerosend.wrap(client)
    _raises(TypeError, "bytes-like", lambda: zs.send_zc(12345))
    _raises(TypeError, "bytes-like", lambda: zs.send_zc("text is not bytes"))
    _raises(TypeError, "bytes-like", lambda: zs.send_zc([b"ok", object()]))
    _raises(ValueError, "contiguous", lambda: zs.send_zc(memoryview(bytearray(100))[::2]))
    assert zs.inflight == 0 and zs.stats["sends"] == 0
    _raises(ValueError, "already wrapped", lambda: zerosend.wrap(client))
    await zs.aclose()
    server.close()

    _raises(TypeError, "socket.socket", lambda: zerosend.wrap(3))  # type: ignore[arg-type]
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        listening.setblocking(False)
        _raises(ValueError, "listening", lambda: zerosend.wrap(listening))
    with socket.socket() as unconnected:
        unconnected.setblocking(False)
        _raises(ValueError, "not connected", lambda: zerosend.wrap(unconnected))
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        _raises(ValueError, "AF_INET", lambda: zerosend.wrap(a))
    client, server = await tcp_pair()
    with client, server:
        client.setblocking(True)
        _raises(ValueError, "non-blocking", lambda: zerosend.wrap(client))
        client.setblocking(False)
        unknown: Any = "fast"
        _raises(ValueError, "unknown backend", lambda: zerosend.wrap(client, backend=unknown))
        _raises(
            ValueError, "zerocopy_threshold", lambda: zerosend.wrap(client, zerocopy_threshold=-1)
        )
    return {}


async def udp_datagrams() -> Facts:
    loop = asyncio.get_running_loop()
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.setblocking(False)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.connect(receiver.getsockname())
    sender.setblocking(False)
    zs = zerosend.wrap(sender)
    datagrams: list[Any] = [b"one", [b"two:", bytearray(b"gathered"), memoryview(b"!")], b""]
    results = await asyncio.gather(*(zs.send_zc(d) for d in datagrams))
    got = [await loop.sock_recv(receiver, 2048) for _ in datagrams]
    assert got == [b"one", b"two:gathered!", b""], got
    assert [r.nbytes for r in results] == [3, 13, 0]
    await zs.aclose()
    address = receiver.getsockname()
    receiver.close()

    # Nobody listens there any more: the kernel's port-unreachable fails one datagram with
    # ECONNREFUSED, and the socket stays usable (unlike a stream).
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.connect(address)
    sender.setblocking(False)
    zs = zerosend.wrap(sender)
    refused = None
    for _ in range(100):
        try:
            await zs.send_zc(b"anyone?")
        except ConnectionRefusedError as e:
            refused = e
            break
    assert refused is not None, "no datagram was refused"
    assert await zs.send_zc(b"still usable") == zerosend.SendResult(12, False)
    assert zs.stats["errors"] == 1
    await zs.aclose()
    return {}


async def buffer_pool() -> Facts:
    client, server = await tcp_pair()
    zs = zerosend.wrap(client)
    pool = zerosend.BufferPool(2, 10000)
    first = await pool.acquire()
    second = await pool.acquire()
    assert pool.available == 0 and len(first) == 10000
    for buf in (first, second):
        address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        assert address % mmap.PAGESIZE == 0, hex(address)
    third = asyncio.ensure_future(pool.acquire())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not third.done(), "a third buffer from a pool of two"
    view = memoryview(first)
    view[:5] = b"hello"
    result = await zs.send_zc(view[:5])
    view.release()
    assert result.nbytes == 5
    first.release()
    assert first.released
    got = await third
    second.release()
    got.release()
    assert pool.available == 2
    async with pool.acquire() as buf:
        memoryview(buf)[:3] = b"end"
        await zs.send_zc(memoryview(buf)[:3])
    assert pool.available == 2
    await zs.aclose()
    received = bytearray()
    await read_all(server, received)
    server.close()
    assert received == b"helloend"
    return {"hugepages": pool.hugepages}


async def fork_leaves_the_parent_alone() -> Facts:
    """A child that inherited a wrapper cannot use it and, dropping it, takes nothing from the
    parent, whose next sends still resolve; the child can wrap a socket of its own."""
    import os

    client, server = await tcp_pair()
    zs = zerosend.wrap(client)
    await zs.send_zc(b"before")
    pid = os.fork()
    if pid == 0:  # the child: exit code 0 only if every expectation held
        code = 1
        try:
            try:
                zs.send_zc(b"child")
            except RuntimeError as e:
                code = 0 if "fork" in str(e) else 2
            del zs  # dropping the inherited wrapper must not touch the parent's driver
            import gc

            gc.collect()

            async def own_socket() -> None:
                mine, theirs = await tcp_pair()
                own = zerosend.wrap(mine)
                await own.send_zc(b"own")
                await own.aclose()
                got = bytearray()
                await read_all(theirs, got)
                assert got == b"own", got

            asyncio.run(own_socket())
        except BaseException:
            code = code or 3
        os._exit(code)
    _, status = await asyncio.to_thread(os.waitpid, pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"child failed: {status}"
    await zs.send_zc(b" after")
    await zs.aclose()
    received = bytearray()
    await read_all(server, received)
    server.close()
    assert received == b"before after", received
    return {}


async def reports_why() -> Facts:
    """Only meaningful with the extension hidden: everything says why there is no zero-copy."""
    from tests.hide_native import HIDDEN_BECAUSE

    caps = zerosend.capabilities()
    assert not caps.io_uring_send_zc and not caps.msg_zerocopy
    for reason in (caps.io_uring_send_zc_reason, caps.msg_zerocopy_reason):
        assert reason and HIDDEN_BECAUSE in reason, reason
    assert "kernel=" in repr(caps) and caps.kernel
    client, server = await tcp_pair()
    with server:
        for backend in ("io_uring", "msg_zerocopy"):
            try:
                zerosend.wrap(client, backend=backend)
            except zerosend.BackendUnavailableError as e:
                assert e.errno == errno.EOPNOTSUPP and HIDDEN_BECAUSE in str(e), e
            else:
                raise AssertionError(f"backend={backend} did not raise")
        zs = zerosend.wrap(client)
        assert zs.backend == "copy"
        assert zs.fallback_reason and HIDDEN_BECAUSE in zs.fallback_reason
        await zs.aclose()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not zerosend.BufferPool(1, 4096, hugepages=True).hugepages
    assert any(issubclass(w.category, RuntimeWarning) for w in caught)
    from zerosend.iscsi import _accel  # the target's digest, native or its Python stand-in

    assert _accel.crc32c(b"123456789") == 0xE3069283
    part = _accel.crc32c(b"12345")
    assert _accel.crc32c(memoryview(b"6789"), part) == 0xE3069283
    assert zerosend.SendResult(3, False) == zerosend.SendResult(3, False)
    assert repr(zerosend.SendResult(3, True)) == "SendResult(nbytes=3, zerocopy=True)"
    return {"native_module": zerosend._native.__name__, "version": zerosend.__version__}


SCENARIOS: dict[str, Callable[[], Awaitable[Facts]]] = {
    f.__name__: f
    for f in (
        ordered_many_in_flight,
        cancelled_send_still_goes_whole,
        stream_errors,
        bad_arguments,
        udp_datagrams,
        buffer_pool,
        fork_leaves_the_parent_alone,
        reports_why,
    )
}


def main(name: str, loop: str = "asyncio") -> int:
    if loop == "uvloop":
        import uvloop

        facts = uvloop.run(SCENARIOS[name]())
    else:
        facts = asyncio.run(SCENARIOS[name]())
    print(json.dumps(facts))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
