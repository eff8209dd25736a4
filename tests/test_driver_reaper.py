"""An event loop closed while zero-copy sends are in flight must not keep its driver forever.

Nothing polls a driver once its loop is closed: without a reaper its io_uring, timer, epoll set
and buffer exports stayed open for the life of the process, even after the kernel released
every page. The reaper thread takes such a driver over, finishes its sends, releases each buffer
only at the kernel's release (never earlier) and closes the driver after the last one.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable

import pytest

import zerosend
from tests.helpers import HANG_GUARD_S, require_backend, require_probed

KiB = 1 << 10
#: Loops opened and closed with a send in flight each.
LOOPS = 20
#: Much more than the socket buffers hold: the send stays in flight until the peer reads.
PAYLOAD = 1 << 20


def io_uring_fds() -> set[int]:
    """The process's open io_uring descriptors (numbers: drivers of earlier tests that the
    reaper closes meanwhile must not count against this test's)."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[io_uring]":
                found.add(int(name))
        except OSError:
            pass  # the descriptor of the listing itself, closed meanwhile
    return found


def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Polls ``condition`` until it holds; the deadline only guards against a hang."""
    deadline = time.monotonic() + HANG_GUARD_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.01)


def resizable(buf: bytearray) -> bool:
    """True if nothing exports ``buf`` any more (a held export makes resizing raise)."""
    try:
        buf.append(0)
    except BufferError:
        return False
    del buf[-1]
    return True


def pair() -> tuple[socket.socket, socket.socket]:
    """A loopback TCP pair with small buffers on both sides: (sender, peer)."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * KiB)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        sender = socket.create_connection(listener.getsockname())
        peer, _ = listener.accept()
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * KiB)
    sender.setblocking(False)
    return sender, peer


class InFlight:
    """One loop's send: the peer that has not read it yet, its bytes and its future."""

    def __init__(self, peer: socket.socket, payload: bytearray) -> None:
        self.peer = peer
        self.payload = payload
        self.expected = bytes(payload)
        self.future: object = None

    def read_all(self) -> bytes:
        self.peer.settimeout(HANG_GUARD_S)
        got = bytearray()
        while len(got) < len(self.expected):
            chunk = self.peer.recv(len(self.expected) - len(got))
            assert chunk, f"the peer got EOF after {len(got)} of {len(self.expected)} bytes"
            got += chunk
        return bytes(got)


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def close_loop_with_send_in_flight(
    backend: str, kind: str, errors: list[dict[str, object]]
) -> InFlight:
    sender, peer = pair()
    flight = InFlight(peer, bytearray(os.urandom(PAYLOAD)))

    async def start() -> None:
        zs = zerosend.wrap(sender, backend=backend, zerocopy_threshold=0)  # type: ignore[arg-type]
        flight.future = zs.send_zc(flight.payload)
        # Let the loop take a turn so the send reaches the kernel (io_uring flushes then).
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert zs.inflight == 1, "the send must still be in flight when the loop closes"

    loop = new_loop(kind)
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        loop.run_until_complete(start())
    finally:
        loop.close()
    sender.close()  # the driver keeps its own duplicate while the send is in flight
    return flight


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
@pytest.mark.parametrize("backend", ["io_uring", "msg_zerocopy"])
def test_closed_loops_give_back_their_drivers_after_the_last_release(
    backend: str, kind: str
) -> None:
    require_backend(backend)
    if kind == "uvloop":
        require_probed("uvloop")
    before = io_uring_fds()
    errors: list[dict[str, object]] = []
    flights = [close_loop_with_send_in_flight(backend, kind, errors) for _ in range(LOOPS)]
    # The closed loops' rings, held for their sends (a number an earlier test's ring, closed
    # meanwhile, left free may be among them: it is not told apart, hence "at least one")
    ours = io_uring_fds() - before
    if backend == "io_uring":
        assert ours, "the closed loops' rings stay open while their sends are held"

    # The loops are gone and the peers have not read: every buffer is still the kernel's.
    for flight in flights:
        assert not resizable(flight.payload), "a buffer was released before the kernel let go"

    for flight in flights:
        assert flight.read_all() == flight.expected, "the bytes arrived damaged or out of order"
    for flight in flights:
        flight.peer.close()

    wait_for(lambda: all(resizable(f.payload) for f in flights), "every buffer released")
    wait_for(lambda: not io_uring_fds() & ours, "the closed loops' io_uring descriptors closed")
    # The closed loops were never touched: their futures keep no outcome, nothing was logged.
    assert all(not f.future.done() for f in flights)  # type: ignore[attr-defined]
    assert errors == []


def test_a_loop_closed_with_nothing_in_flight_closes_its_driver() -> None:
    require_backend("io_uring")
    before = io_uring_fds()

    async def send_one() -> None:
        sender, peer = pair()
        with sender, peer:
            zs = zerosend.wrap(sender, backend="io_uring", zerocopy_threshold=0)
            await zs.send_zc(b"x" * 1000)
            assert peer.recv(1000) != b""
            await zs.aclose()

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(send_one())
        ours = io_uring_fds() - before
        assert ours, "the loop's driver has its io_uring"
    finally:
        loop.close()
    wait_for(lambda: not io_uring_fds() & ours, "the closed loop's io_uring closed")
