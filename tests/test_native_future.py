"""The native awaitable of a send in flight (``InFlightSend``) and the native send methods.

On asyncio (and uvloop) a send still in the kernel's hands returns a future the driver makes
and resolves itself, without ``loop.create_future()``: it must pass for an asyncio future
everywhere one is taken (``await``, tasks and their cancellation, ``gather``, ``wait``,
``wait_for``, ``shield``, done callbacks and their contexts), and cancelling it must keep the
contract: the send still goes out whole and its buffer stays held until the kernel releases it.
Under trio the trio layer's own future is returned, as before. ``Socket.send_zc``, ``send`` and
``send_file`` are native callables: a send runs no Python frame of zerosend's.

A send is kept in flight deterministically by a tiny send buffer and a peer that does not read
(the copy backend then waits for room), or by sending zero-copy with io_uring.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import os
import socket
import sys
import tempfile
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

import pytest

import zerosend
from tests.helpers import read_all, require_backend, require_probed, tcp_pair

KiB = 1 << 10
MiB = 1 << 20
#: Guards against a hang only (a stranded send never resolves); not a performance bound.
HANG_GUARD_S = 20
#: More than the loopback socket buffers hold once the sender's is shrunk: the send waits.
BIG = 8 * MiB

var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")


async def stalled_pair() -> tuple[zerosend.Socket, socket.socket]:
    """A copy-backend wrapper whose large sends wait for room (nobody reads the peer yet)."""
    client, server = await tcp_pair()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * KiB)
    return zerosend.wrap(client, backend="copy"), server


async def finish(zs: zerosend.Socket, server: socket.socket, expected: bytes | bytearray) -> None:
    """Reads everything, closes, and checks the peer got ``expected`` whole and in order."""
    received = bytearray()
    reader = asyncio.ensure_future(read_all(server, received))
    await asyncio.wait_for(zs.aclose(), HANG_GUARD_S)
    await asyncio.wait_for(reader, HANG_GUARD_S)
    server.close()
    assert received == expected


@pytest.mark.asyncio
async def test_a_send_in_flight_is_a_native_asyncio_future() -> None:
    zs, server = await stalled_pair()
    payload = os.urandom(BIG)
    sent = zs.send(payload)
    assert type(sent).__name__ == "InFlightSend"
    assert asyncio.isfuture(sent)
    assert sent.get_loop() is asyncio.get_running_loop()  # type: ignore[attr-defined]
    assert not sent.done() and not sent.cancelled()
    with pytest.raises(asyncio.InvalidStateError):
        sent.result()
    with pytest.raises(asyncio.InvalidStateError):
        sent.exception()
    # Only the driver sets its outcome.
    assert not hasattr(sent, "set_result") and not hasattr(sent, "set_exception")
    received = bytearray()
    reader = asyncio.ensure_future(read_all(server, received))
    result = await asyncio.wait_for(sent, HANG_GUARD_S)
    assert result == zerosend.SendResult(BIG, False)
    assert sent.done() and sent.result() == result and sent.exception() is None
    assert await sent == result  # awaiting a done one again returns at once
    await asyncio.wait_for(zs.aclose(), HANG_GUARD_S)
    await asyncio.wait_for(reader, HANG_GUARD_S)
    server.close()
    assert received == payload


@pytest.mark.asyncio
async def test_send_methods_are_native_and_run_no_python_frame_of_zerosend() -> None:
    zs, server = await stalled_pair()
    assert "send_zc(" in (inspect.getdoc(type(zs).send_zc) or "")  # help() shows the slots' docs
    frames: list[str] = []

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and "zerosend" in frame.f_code.co_filename:
            frames.append(f"{frame.f_code.co_filename}:{frame.f_code.co_name}")

    payload = os.urandom(BIG)
    with tempfile.TemporaryFile() as file:
        file.write(b"f" * 1000)
        file.flush()
        sys.setprofile(profile)
        try:
            sends = [zs.send_zc(payload), zs.send(b"small"), zs.send_file(file, 10, 100)]
            sends.append(zs.send_file(file.fileno(), offset=0))
        finally:
            sys.setprofile(None)
        assert frames == []
        received = bytearray()
        reader = asyncio.ensure_future(read_all(server, received))
        results = await asyncio.wait_for(asyncio.gather(*sends), HANG_GUARD_S)
    assert [r.nbytes for r in results] == [BIG, 5, 100, 1000]
    await asyncio.wait_for(zs.aclose(), HANG_GUARD_S)
    await asyncio.wait_for(reader, HANG_GUARD_S)
    server.close()
    assert received == payload + b"small" + b"f" * 100 + b"f" * 1000


@pytest.mark.asyncio
async def test_send_file_arguments_off_the_common_path_are_checked_by_name() -> None:
    zs, server = await stalled_pair()
    with tempfile.TemporaryFile() as file:
        file.write(b"f" * 10)
        file.flush()
        with pytest.raises(TypeError, match="offset must be an int"):
            zs.send_file(file, 1.5)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="count must be >= 0"):
            zs.send_file(file, 0, -1)
        with pytest.raises(TypeError, match="not a bool"):
            zs.send_file(True)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="file object"):
            zs.send_file("name")  # type: ignore[arg-type]
        assert zs.stats["sends"] == 0  # nothing was submitted
    await finish(zs, server, b"")


@pytest.mark.asyncio
async def test_cancelling_the_awaiting_task_leaves_the_send_going_and_its_buffer_held() -> None:
    zs, server = await stalled_pair()
    payload = bytearray(os.urandom(BIG))
    expected = bytes(payload)
    sent = zs.send_zc(payload)
    task = asyncio.ensure_future(sent)  # type: ignore[arg-type]
    await asyncio.sleep(0)  # the task now waits on the send
    assert task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sent.cancelled()
    with pytest.raises(asyncio.CancelledError):
        sent.result()
    # Still in flight, and the bytearray's export is still held: it cannot be resized.
    assert zs.inflight == 1
    with pytest.raises(BufferError):
        payload.append(0)
    await finish(zs, server, expected)  # every byte went
    payload.append(0)  # released by the kernel: resizable again


@pytest.mark.asyncio
async def test_cancel_keeps_its_message_and_is_refused_once_done() -> None:
    zs, server = await stalled_pair()
    payload = os.urandom(BIG)
    sent = zs.send(payload)
    assert sent.cancel("stop waiting")  # type: ignore[attr-defined]
    assert not sent.cancel()  # type: ignore[attr-defined]
    with pytest.raises(asyncio.CancelledError, match="stop waiting"):
        await sent
    await finish(zs, server, payload)
    assert zs.stats["bytes_copied"] == len(payload)


@pytest.mark.asyncio
async def test_wait_for_with_a_timeout_cancels_the_wait_not_the_send() -> None:
    zs, server = await stalled_pair()
    payload = os.urandom(BIG)
    sent = zs.send(payload)
    # Nobody reads the peer: the send cannot finish, so the (tiny) timeout always expires.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(sent, 0.01)
    assert sent.cancelled()
    later = zs.send(b"after")
    await finish(zs, server, payload + b"after")
    assert later.result() == zerosend.SendResult(5, False)


@pytest.mark.asyncio
async def test_gather_of_many_sends_in_flight(backend: str) -> None:
    client, server = await tcp_pair()
    received = bytearray()
    reader = asyncio.ensure_future(read_all(server, received))
    zs = zerosend.wrap(client, backend=backend, zerocopy_threshold=0)  # type: ignore[arg-type]
    payloads = [os.urandom(64 * KiB + i) for i in range(100)]
    sends = [zs.send_zc(p) for p in payloads]
    if backend != "copy":
        assert any(type(s).__name__ == "InFlightSend" for s in sends)
    results = await asyncio.wait_for(asyncio.gather(*sends), HANG_GUARD_S)
    assert [r.nbytes for r in results] == [len(p) for p in payloads]
    await asyncio.wait_for(zs.aclose(), HANG_GUARD_S)
    await asyncio.wait_for(reader, HANG_GUARD_S)
    server.close()
    assert received == b"".join(payloads)


@pytest.mark.asyncio
async def test_shield_and_wait_take_it() -> None:
    zs, server = await stalled_pair()
    first, second = os.urandom(BIG), os.urandom(MiB)
    a = zs.send(first)
    b = zs.send(second)
    shielded = asyncio.shield(a)  # type: ignore[arg-type]
    shielded.cancel()  # the outer future only: the send's own is left alone
    assert not a.cancelled()
    done, pending = await asyncio.wait([a, b], timeout=0)  # type: ignore[list-item]
    assert not done and pending == {a, b}
    received = bytearray()
    reader = asyncio.ensure_future(read_all(server, received))
    done, pending = await asyncio.wait([a, b], timeout=HANG_GUARD_S)  # type: ignore[list-item]
    assert done == {a, b} and not pending
    assert (a.result().nbytes, b.result().nbytes) == (BIG, MiB)
    assert await asyncio.shield(b) == b.result()  # type: ignore[arg-type]
    await asyncio.wait_for(zs.aclose(), HANG_GUARD_S)
    await asyncio.wait_for(reader, HANG_GUARD_S)
    server.close()
    assert received == first + second


@pytest.mark.asyncio
async def test_done_callbacks_run_through_call_soon_in_their_context() -> None:
    zs, server = await stalled_pair()
    sent: Any = zs.send(os.urandom(BIG))
    seen: list[tuple[str, object, str]] = []

    def callback(name: str) -> Callable[[Any], None]:
        return lambda future: seen.append((name, future, var.get()))

    var.set("at add")
    by_default = callback("default")
    sent.add_done_callback(by_default)  # runs in a copy of this context, taken now
    explicit = contextvars.copy_context()
    explicit.run(var.set, "explicit")
    sent.add_done_callback(callback("explicit"), context=explicit)
    removed = callback("removed")
    sent.add_done_callback(removed)
    sent.add_done_callback(removed)
    assert sent.remove_done_callback(removed) == 2
    assert sent.remove_done_callback(removed) == 0
    var.set("changed later")
    with pytest.raises(TypeError):
        sent.add_done_callback("not callable")
    received = bytearray()
    reader = asyncio.ensure_future(read_all(server, received))
    await asyncio.wait_for(sent, HANG_GUARD_S)
    await asyncio.sleep(0)  # the callbacks were scheduled (call_soon) when the send finished
    assert seen == [("default", sent, "at add"), ("explicit", sent, "explicit")]
    # Added once done: scheduled at once, not run inside the call.
    sent.add_done_callback(callback("late"))
    assert len(seen) == 2
    await asyncio.sleep(0)
    assert seen[-1] == ("late", sent, "changed later")
    assert sent.remove_done_callback(by_default) == 0
    await asyncio.wait_for(zs.aclose(), HANG_GUARD_S)
    await asyncio.wait_for(reader, HANG_GUARD_S)
    server.close()


@pytest.mark.asyncio
async def test_two_tasks_awaiting_one_send_both_get_its_result() -> None:
    zs, server = await stalled_pair()
    sent = zs.send(os.urandom(BIG))

    async def wait() -> zerosend.SendResult:
        return await sent

    tasks = [asyncio.ensure_future(wait()) for _ in range(2)]
    await asyncio.sleep(0)
    received = bytearray()
    reader = asyncio.ensure_future(read_all(server, received))
    results = await asyncio.wait_for(asyncio.gather(*tasks), HANG_GUARD_S)
    assert results == [zerosend.SendResult(BIG, False)] * 2
    await asyncio.wait_for(zs.aclose(), HANG_GUARD_S)
    await asyncio.wait_for(reader, HANG_GUARD_S)
    server.close()


@pytest.mark.asyncio
async def test_a_failed_send_raises_the_same_oserror_subclass() -> None:
    zs, server = await stalled_pair()
    sent = zs.send(os.urandom(BIG))
    assert type(sent).__name__ == "InFlightSend"
    zs.abort()  # the connection ends with a reset: the send in flight fails
    with pytest.raises((ConnectionResetError, BrokenPipeError)) as raised:
        await asyncio.wait_for(sent, HANG_GUARD_S)
    error = sent.exception()
    assert error is raised.value and isinstance(error, OSError) and error.errno
    with pytest.raises(type(error)):
        sent.result()
    await asyncio.wait_for(zs.aclose(), HANG_GUARD_S)
    server.close()


async def _on_uvloop() -> None:
    assert "uvloop" in type(asyncio.get_running_loop()).__module__
    await test_a_send_in_flight_is_a_native_asyncio_future()
    await test_cancelling_the_awaiting_task_leaves_the_send_going_and_its_buffer_held()
    await test_wait_for_with_a_timeout_cancels_the_wait_not_the_send()
    await test_done_callbacks_run_through_call_soon_in_their_context()


def test_on_uvloop() -> None:
    require_probed("uvloop")
    import uvloop

    uvloop.run(_on_uvloop())


def test_under_trio_sends_return_the_trio_layers_future() -> None:
    trio = pytest.importorskip("trio")

    async def main() -> None:
        listener = trio.socket.socket()
        await listener.bind(("127.0.0.1", 0))
        listener.listen()
        raw = socket.socket()
        raw.setblocking(False)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * KiB)
        try:
            raw.connect(listener.getsockname())
        except BlockingIOError:
            await trio.lowlevel.wait_writable(raw)
        server, _ = await listener.accept()
        zs = zerosend.wrap(raw, backend="copy")
        payload = os.urandom(BIG)
        sent = zs.send(payload)
        assert type(sent).__name__ == "TrioFuture"
        received = bytearray()

        async def read() -> None:
            while chunk := await server.recv(MiB):
                received.extend(chunk)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            with trio.fail_after(HANG_GUARD_S):
                assert await sent == zerosend.SendResult(BIG, False)
                await zs.aclose()
        server.close()
        listener.close()
        assert received == payload

    trio.run(main)


def wrap_on_new_loop(**options: Any) -> Callable[[], Awaitable[str | None]]:
    async def run() -> str | None:
        client, server = await tcp_pair()
        zs = zerosend.wrap(client, backend="io_uring", **options)
        from zerosend._socket import _drivers

        setup = _drivers[asyncio.get_running_loop()].ring_setup
        await zs.aclose()
        server.close()
        return setup

    return run


def test_defer_taskrun_is_a_wrap_option_not_an_environment_switch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require_backend("io_uring")
    assert asyncio.run(wrap_on_new_loop(defer_taskrun=True)()) == "defer_taskrun"
    monkeypatch.setenv("ZEROSEND_DEFER_TASKRUN", "1")
    assert asyncio.run(wrap_on_new_loop()()) != "defer_taskrun"


@pytest.mark.asyncio
async def test_a_loop_has_one_ring_setting_and_a_conflicting_wrap_names_it() -> None:
    require_backend("io_uring")
    client, server = await tcp_pair()
    other, other_server = await tcp_pair()
    zs = zerosend.wrap(client, backend="io_uring", defer_taskrun=True)
    with pytest.raises(ValueError, match="defer_taskrun=False"):
        zerosend.wrap(other, backend="io_uring", defer_taskrun=False)
    same = zerosend.wrap(other, backend="io_uring")  # None: the loop's setting
    payload = os.urandom(MiB)
    sent = same.send_zc(payload)
    await finish(same, other_server, payload)
    assert sent.result().nbytes == MiB
    await finish(zs, server, b"")
