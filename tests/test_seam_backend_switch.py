"""Seam: event loops run one after another in one process, each with a different backend.

Every loop gets a driver of its own, but some state outlives a loop: the process-wide registry
of claimed sockets and saved MSG_ZEROCOPY counters, descriptor numbers (and socket inodes) the
kernel hands out again, and a previous driver that is garbage-collected later. A stream on the
second loop must still wait for room (EAGAIN, EPOLLOUT) and be woken when the peer reads, with
every send resolved and every byte in order, whatever backend the loop before it used.

The peer keeps the kernel's default receive buffer on purpose: with a receive buffer of a few
KiB and MSG_ZEROCOPY on loopback the kernel itself slows the stream to a trickle (the receive
window shrinks below the sender's MSS: silly-window avoidance; plain ``socket.send`` with
``MSG_ZEROCOPY`` does the same), which no sender can change.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

import zerosend
from tests.helpers import (
    BACKENDS,
    HANG_GUARD_S,
    require_backend,
    require_probed,
    unsent_bytes,
    wait_until,
)

KiB = 1 << 10
PIECE = 256 * KiB
PIECES = 32
LOOPS = ("asyncio", "uvloop")
PAIRS = list(itertools.product(BACKENDS, repeat=2))


def _runner(kind: str) -> Callable[[Coroutine[Any, Any, None]], None]:
    if kind == "uvloop":
        require_probed("uvloop")
        import uvloop

        return uvloop.run
    return asyncio.run


def _read_all(peer: socket.socket, gate: threading.Event, into: bytearray) -> None:
    # Held back until the sender had to wait for room, so that wait is always exercised.
    gate.wait(HANG_GUARD_S)
    peer.settimeout(HANG_GUARD_S)
    while chunk := peer.recv(1 << 20):
        into += chunk


async def _slow_reader_stream(backend: str, seed: int) -> None:
    loop = asyncio.get_running_loop()
    payload = bytes((i * 7 + seed) % 251 for i in range(PIECES * PIECE))
    received = bytearray()
    gate = threading.Event()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        reader, writer = await zerosend.open_connection(
            "127.0.0.1",
            port,
            backend=backend,  # type: ignore[arg-type]
            zerocopy_threshold=0,
        )
        peer, _ = await loop.sock_accept(listener)
    with peer:
        peer.setblocking(True)
        reading = loop.run_in_executor(None, _read_all, peer, gate, received)
        try:
            zs = writer.get_extra_info("zerosend")
            assert zs.backend == backend
            sends = [writer.write_zc(payload[i : i + PIECE]) for i in range(0, len(payload), PIECE)]
            # sendmsg backends count their waits; io_uring waits in the kernel (bytes queued).
            await wait_until(
                lambda: (
                    zs.stats["eagain_waits"] > 0
                    or (backend == "io_uring" and unsent_bytes(zs.socket) > 0)
                    or all(s.done() for s in sends)
                ),
                "the sender waited for room or finished",
            )
            waited = zs.stats["eagain_waits"] > 0
        finally:
            gate.set()
        # Sends that finished inside their call may share one done object: count per send.
        await asyncio.wait(set(sends), timeout=HANG_GUARD_S)
        stats = zs.stats
        done = sum(s.done() for s in sends)
        assert done == len(sends), (
            f"{backend}: {done} of {len(sends)} sends resolved; a wait for room was never "
            f"woken: stats { ({k: v for k, v in stats.items() if v}) }"
        )
        for send in sends:
            assert send.result().nbytes == PIECE
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), HANG_GUARD_S)
        await asyncio.wait_for(reading, HANG_GUARD_S)
    assert bytes(received) == payload, f"{backend}: the stream arrived damaged or incomplete"
    # The sender filled the socket buffer (the seam under test), unless the peer took it all.
    assert waited or len(received) == len(payload)
    del reader


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", LOOPS)
@pytest.mark.parametrize(("first", "second"), PAIRS, ids=[f"{a}-then-{b}" for a, b in PAIRS])
def test_second_loop_with_another_backend_is_woken(kind: str, first: str, second: str) -> None:
    require_backend(first)
    require_backend(second)
    run = _runner(kind)
    # Three loops: first, second, and first again, so each backend follows the other.
    for seed, backend in enumerate((first, second, first)):
        run(_slow_reader_stream(backend, seed))
