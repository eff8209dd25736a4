"""The send engine's history check: random mixes of sends and faults over many sockets, on each
backend, checked against the contract afterwards (tests/history_core.py says which invariants).

Each round connects a handful of sockets to receivers inside the rig's namespace (behind veth,
their receive work on the other CPU, so the kernel releases pages late, as with a NIC) and
drives them from one seeded random generator: sends from plain buffers (overwritten as soon as
they resolve) and from buffer pools (refilled when handed out again), vectored or not; and
faults: the awaiting task cancelled, the socket closed and the wrapper dropped with sends in
flight, pools closed, peers that stall, reset (SO_LINGER 0) or read slowly, fork() with a child
that exits at once. While peers stall, a send on a healthy socket must still resolve.

``ZEROSEND_SOAK_SEED`` picks the first round's seed (round r uses seed + r), and
``ZEROSEND_SOAK_MINUTES`` how long all backends run together (default about a minute); a failure
prints the command that replays its round first.

The same operations also run under Hypothesis' stateful testing on two connections, so that a
failure shrinks to the few steps that cause it (printed as the program that replays it); and the
checker is tested on its own, so that each invariant is seen to fail.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test

import zerosend
from bench.harness.rig import Rig
from tests.helpers import RIG_UNAVAILABLE, require, require_backend
from tests.history_core import (
    WORD,
    History,
    Send,
    StreamVerifier,
    check,
    numbered,
    poison,
    report,
)


def _from_environment(name: str, kind: type[int] | type[float], default: str) -> float:
    text = os.environ.get(name, default)
    try:
        value = kind(text)
    except ValueError:
        what = "an int" if kind is int else "a number"
        raise pytest.UsageError(f"{name}={text!r} is not {what}") from None
    if value < 0:
        raise pytest.UsageError(f"{name}={text!r} must be >= 0")
    return value


SEED = int(_from_environment("ZEROSEND_SOAK_SEED", int, "20260120"))
MINUTES = _from_environment("ZEROSEND_SOAK_MINUTES", float, "1")
BACKENDS = [b for b in zerosend.BACKENDS if b != "auto"]
#: A soak (more than the minute of `make test`): random rounds and the stateful machine share
#: each backend's part of the run half and half.
SOAKING = MINUTES > 1
#: Each backend's share of the run for random rounds, and for stateful batches in a soak.
ROUND_SECONDS = MINUTES * 60 / len(BACKENDS) / (2 if SOAKING else 1)
STATEFUL_SECONDS = ROUND_SECONDS if SOAKING else 0.0
#: Hang guards only (a loaded 2-CPU machine), never a verdict on speed.
PROGRESS_GUARD_S = 30.0
HANG_GUARD_S = 90.0
KiB = 1 << 10
#: Examples of the stateful test per batch and backend (each a short round of up to 30 steps):
#: the same ones in every `make test` run (100 find the pool-close seam); a soak runs batches of
#: new ones until its share of the time is used.
STATEFUL_EXAMPLES = 100
STATEFUL_DERANDOMIZED = not SOAKING
#: Failing rounds whose report a failure shows.
SHOWN_ROUNDS = 3
STEPS = (40, 160)
#: Share of rounds with a crowd of stalled peers, each with sends queued behind small socket
#: buffers: together more than one io_uring takes at once (measured on this kernel: 200 sockets
#: with 100 sends of 4 KiB each exceed it, 150 do not).
CROWD_ROUNDS = 0.2
CROWD_CONNS = (200, 220)
CROWD_SENDS = 100

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def socket_in_namespace(ns: str) -> socket.socket:
    """A TCP socket of network namespace ``ns``: made on a thread that entered it (setns
    changes only the calling thread), usable from any thread afterwards."""
    made: list[socket.socket | BaseException] = []

    def make() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"setns into {ns}: {os.strerror(errno)}")
                made.append(socket.socket())
            finally:
                os.close(fd)
        except BaseException as error:
            made.append(error)

    thread = threading.Thread(target=make)
    thread.start()
    thread.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


class Peer:
    """The receiving end of one connection, in the rig: reads and verifies, or stalls, reads
    slowly, or resets."""

    def __init__(self, sock: socket.socket, verifier: StreamVerifier) -> None:
        self.sock = sock
        self.verifier = verifier
        self.mode = "read"  # read, slow, stalled, reset
        self.running = asyncio.Event()
        self.running.set()
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        buf = bytearray(64 * KiB)
        view = memoryview(buf)
        while True:
            await self.running.wait()
            size = 3000 if self.mode == "slow" else len(buf)
            n = await loop.sock_recv_into(self.sock, view[:size])
            if n == 0:
                self.verifier.eof = True
                self.sock.close()
                return
            self.verifier.feed(view[:n])
            if self.mode == "slow":
                await asyncio.sleep(0.002)

    def stall(self) -> None:
        self.mode = "stalled"
        self.running.clear()

    def resume(self, mode: str = "read") -> None:
        if self.mode != "reset":
            self.mode = mode
            self.running.set()

    async def reset(self) -> None:
        self.mode = "reset"
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        if self.sock.fileno() >= 0:
            # SO_LINGER 0: close() sends RST instead of FIN.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.sock.close()


@dataclass
class Live:
    """A connection's sending side while the round runs."""

    id: int
    sock: socket.socket
    zs: zerosend.Socket | None
    peer: Peer
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    #: Each send's task, its record, future and plain buffers.
    sends: dict[
        asyncio.Task[None], tuple[Send, asyncio.Future[zerosend.SendResult], list[bytearray]]
    ] = field(default_factory=dict)
    #: drain() calls running in the background.
    drains: list[asyncio.Task[None]] = field(default_factory=list)
    #: Plain buffers of cancelled sends: overwritten only after a drain() saw them released.
    held: list[bytearray] = field(default_factory=list)
    raw_closed: bool = False

    def sendable(self) -> bool:
        return self.zs is not None and not self.raw_closed

    def healthy(self, history: History) -> bool:
        model = history.conns[self.id]
        return (
            self.sendable()
            and self.peer.mode in ("read", "slow")
            and not any(s.outcome == "error" for s in model.sends)
        )


class Round:
    """One round: connections, pools and a seeded random mix of operations, recorded."""

    def __init__(self, rig: Rig, backend: str, seed: int, *, early_reuse: bool = False) -> None:
        self.rig = rig
        self.backend = backend
        self.rng = random.Random(seed)
        self.history = History(backend, seed)
        self.early_reuse = early_reuse
        self.conns: list[Live] = []
        self.pools: list[zerosend.BufferPool] = []

    async def connect(self, count: int, *, crowded: bool) -> None:
        loop = asyncio.get_running_loop()
        listener = socket_in_namespace(self.rig.ns)
        # Small receive buffers: a stalled peer backs its sender up quickly.
        rcvbuf = 16 * KiB if crowded else 128 * KiB
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        listener.bind((self.rig.peer_addr, 0))
        listener.listen(64)
        listener.setblocking(False)
        with listener:
            for c in range(count):
                client = socket.socket()
                client.setblocking(False)
                if crowded or self.rng.random() < 0.5:
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * KiB)
                await loop.sock_connect(client, listener.getsockname())
                server, _ = await loop.sock_accept(listener)
                server.setblocking(False)
                zs = zerosend.wrap(client, backend=self.backend, zerocopy_threshold=0)  # type: ignore[arg-type]
                verifier = StreamVerifier(c)
                self.history.conn(c, verifier)
                self.conns.append(Live(c, client, zs, Peer(server, verifier)))

    # The operations ------------------------------------------------------------------------

    def _size(self) -> int:
        return self.rng.choice([4, 16, 64, 200, 256]) * KiB + self.rng.randrange(0, 64) * WORD

    async def send(
        self,
        live: Live,
        *,
        size: int | None = None,
        kind: str | None = None,
        source: str | None = None,
    ) -> Send | None:
        """A send of the connection's next ``size`` bytes from a ``source`` of "pool" (if one
        has a buffer free), "vectored" or "plain"; both drawn at random if not given."""
        assert live.zs is not None
        model = self.history.conns[live.id]
        nbytes = size or self._size()
        payload = numbered(live.id, model.next_offset // WORD, nbytes // WORD)
        pools = [p for p in self.pools if not p.closed and p.available and p.size >= nbytes]
        if source is None and kind is None:
            roll = self.rng.random()
            source = "pool" if roll < 0.4 else "vectored" if roll < 0.55 else "plain"
        bufs: list[bytearray] = []
        try:
            if source == "pool" and pools:
                pool = self.rng.choice(pools)
                taken = await pool.acquire()
                try:
                    view = memoryview(taken)
                    view[:nbytes] = payload
                    fut = live.zs.send_zc(view[:nbytes])
                    del view
                finally:
                    taken.release()  # back to the pool only once the kernel released it
                kind = f"pool {self.pools.index(pool)} buffer"
            elif source == "vectored":
                cut = self.rng.randrange(1, nbytes // WORD) * WORD
                bufs = [bytearray(payload[:cut]), bytearray(payload[cut:])]
                fut = live.zs.send_zc(bufs)
                kind = "vectored plain"
            else:
                bufs = [bytearray(payload)]
                fut = live.zs.send_zc(bufs[0])
                kind = kind or "plain"
        except (OSError, RuntimeError, ValueError) as error:
            # Refused at the call: nothing was submitted. Fine once the stream failed (a
            # failure nothing explains is reported as such).
            if not model.reset and not any(s.outcome == "error" for s in model.sends):
                self.history.violation(
                    live.id, f"conn {live.id}: send_zc() raised {error!r} on a healthy stream"
                )
            else:
                self.history.log(live.id, f"send_zc() raised {error!r}")
            return None
        send = self.history.submit(live.id, nbytes, kind)
        if self.early_reuse:  # the control: reuse before release must be caught
            for buf in bufs:
                memoryview(buf)[:] = poison(len(buf))
        task = asyncio.ensure_future(self._await(send, fut, bufs))
        live.tasks.append(task)
        live.sends[task] = (send, fut, bufs)
        return send

    async def _await(
        self,
        send: Send,
        fut: asyncio.Future[zerosend.SendResult],
        bufs: list[bytearray],
    ) -> None:
        try:
            result = await fut
        except asyncio.CancelledError:
            raise  # recorded by cancel(): a task cancelled before it ran never gets here
        except OSError as error:
            self.history.complete(send, "error", f"{type(error).__name__}: {error}")
            return
        if result.nbytes != send.nbytes:
            self.history.complete(send, "error", f"resolved with nbytes={result.nbytes}")
            return
        self.history.complete(send, "ok")
        for buf in bufs:  # released: the owner may reuse it now
            memoryview(buf)[:] = poison(len(buf))

    def stall_or_resume(self, live: Live) -> None:
        if live.peer.mode == "stalled":
            live.peer.resume()
            self.history.log(live.id, "peer resumes reading")
        else:
            live.peer.stall()
            self.history.log(live.id, "fault: peer stalls (stops reading)")

    def read_slowly(self, live: Live) -> None:
        live.peer.resume("slow")
        self.history.log(live.id, "fault: peer reads slowly")

    async def reset_peer(self, live: Live) -> None:
        if live.peer.mode != "reset":
            await live.peer.reset()
            self.history.conns[live.id].reset = True
            self.history.log(live.id, "fault: peer reset (SO_LINGER 0)")

    async def cancel(self, conn: int | None = None) -> None:
        pending = [(live, t) for live in self.conns for t in live.tasks if not t.done()]
        if conn is not None:
            pending = [(live, t) for live, t in pending if live.id == conn]
        if pending:
            live, task = self.rng.choice(pending)
            task.cancel()
            send, fut, bufs = live.sends[task]
            self.history.complete(send, "cancelled", "fault: the task awaiting it was cancelled")
            fut.add_done_callback(lambda fut: self._settle(live, send, fut, bufs))

    def _settle(
        self,
        live: Live,
        send: Send,
        fut: asyncio.Future[zerosend.SendResult],
        bufs: list[bytearray],
    ) -> None:
        """The end of a send whose awaiting task was cancelled. Its future may still resolve
        (a task cancelled before it ran never awaited it): then it is held to the contract."""
        if fut.cancelled():
            live.held += bufs  # overwritten only after a drain(): the send may be in flight
        elif (error := fut.exception()) is not None:
            detail = f"{type(error).__name__}: {error} (its awaiting task was cancelled)"
            self.history.complete(send, "error", detail)
        else:
            self.history.log(live.id, f"cancelled #{send.id} resolved all the same")
            for buf in bufs:
                memoryview(buf)[:] = poison(len(buf))

    async def drain(self, live: Live) -> None:
        zs, held = live.zs, list(live.held)
        if zs is None:
            return
        self.history.log(live.id, f"drain() started ({len(held)} cancelled buffers held)")
        await zs.drain()
        for buf in held:
            memoryview(buf)[:] = poison(len(buf))

    async def close_raw(self, live: Live) -> None:
        live.sock.close()
        live.raw_closed = True
        self.history.log(live.id, "fault: closed the socket with sends in flight")

    async def drop_wrapper(self, live: Live) -> None:
        live.zs = None  # the only reference: Socket.__del__ runs now
        self.history.log(live.id, "fault: dropped the wrapper with sends in flight")

    async def close_pool(self) -> None:
        open_pools = [p for p in self.pools if not p.closed]
        if open_pools:
            pool = self.rng.choice(open_pools)
            pool.close()
            self.history.log(None, f"fault: closed pool {self.pools.index(pool)}")
        self.new_pool()

    def new_pool(self) -> None:
        size = self.rng.choice([64, 256]) * KiB + 64 * WORD
        self.pools.append(zerosend.BufferPool(self.rng.choice([2, 4, 8]), size))
        self.history.log(None, f"new pool {len(self.pools) - 1} ({size} B buffers)")

    async def fork(self) -> None:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        self.history.log(None, f"fault: fork() (child {pid} exits at once)")
        await asyncio.get_running_loop().run_in_executor(None, os.waitpid, pid, 0)

    async def probe_progress(self) -> bool:
        """With peers stalled, a send on a healthy connection must resolve (False if not)."""
        stalled = [live.id for live in self.conns if live.peer.mode == "stalled"]
        healthy = [live for live in self.conns if live.healthy(self.history)]
        if not stalled or not healthy:
            return True
        live = self.rng.choice(healthy)
        send = await self.send(live, size=64 * KiB, kind="progress probe")
        if send is None:
            return True
        await asyncio.wait([live.tasks[-1]], timeout=PROGRESS_GUARD_S)
        if send.outcome == "pending":
            self.history.violation(
                live.id,
                f"conn {live.id} made no progress: {send} unresolved after {PROGRESS_GUARD_S:.0f}"
                f" s while the peers of {len(stalled)} conns stalled ({stalled[:8]}...)",
            )
            return False
        return True

    # The round ------------------------------------------------------------------------------

    async def crowd(self) -> bool:
        """Most peers stall with more sends queued than the kernel takes from one socket at
        once; the few healthy sockets must keep going (False if one did not)."""
        healthy = set(self.rng.sample(range(len(self.conns)), 3))
        for live in self.conns:
            if live.id not in healthy:
                live.peer.stall()
        self.history.log(None, f"fault: the peers of all conns but {sorted(healthy)} stall")
        for live in self.conns:
            if live.id not in healthy:
                for _ in range(CROWD_SENDS):
                    await self.send(live, size=4 * KiB, kind="crowd plain")
        await asyncio.sleep(0.2)  # let the crowd's sends reach the kernel (not a verdict)
        return await self.probe_progress()

    async def run(self) -> History:
        rng = self.rng
        crowded = rng.random() < CROWD_ROUNDS
        count = rng.randint(*CROWD_CONNS) if crowded else rng.randint(4, 10)
        await self.connect(count, crowded=crowded)
        for _ in range(rng.randint(1, 3)):
            self.new_pool()
        if crowded and not await self.crowd():
            await self.finish()
            return self.history
        for _ in range(rng.randint(*STEPS)):
            sendable = [live for live in self.conns if live.sendable()]
            live = rng.choice(self.conns)
            roll = rng.random()
            if roll < 0.55:
                if sendable:
                    await self.send(rng.choice(sendable))
            elif roll < 0.62:
                await self.cancel()
            elif roll < 0.70:
                self.stall_or_resume(live)
            elif roll < 0.73:
                self.read_slowly(live)
            elif roll < 0.75:
                await self.reset_peer(live)
            elif roll < 0.77:
                if live.sendable():
                    await self.close_raw(live)
            elif roll < 0.79:
                if live.sendable():
                    await self.drop_wrapper(live)
            elif roll < 0.84:
                await self.close_pool()
            elif roll < 0.86:
                await self.fork()
            elif roll < 0.89:
                if live.zs is not None and live.held:
                    live.drains.append(asyncio.ensure_future(self.drain(live)))
            elif roll < 0.95:
                if not await self.probe_progress():
                    break
            else:
                await asyncio.sleep(rng.choice([0, 0.001, 0.01]))
        await self.finish()
        return self.history

    async def finish(self) -> None:
        """Every peer reads again, every connection ends; what does not end in the guard is
        recorded as hanging."""
        for live in self.conns:
            live.peer.resume()
        closing = []
        for live in self.conns:
            if live.zs is not None:
                closing.append(asyncio.ensure_future(self._close(live, live.zs)))
                live.zs = None
            else:
                closing.append(asyncio.ensure_future(self._close(live, None)))
        everything = closing + [t for live in self.conns for t in live.tasks + live.drains]
        everything += [live.peer.task for live in self.conns]
        _, pending = await asyncio.wait(everything, timeout=HANG_GUARD_S)
        for live in self.conns:
            if not live.peer.task.done() and live.peer.mode != "reset":
                self.history.log(live.id, "the receiver is still reading at the hang guard")
        for live, task in zip(self.conns, closing, strict=True):
            if task in pending:
                self.history.violation(
                    live.id, f"conn {live.id}: closing it (aclose() or the last sends) hung"
                )
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for live in self.conns:
            if live.peer.sock.fileno() >= 0:
                live.peer.sock.close()
        for pool in self.pools:
            pool.close()

    async def _close(self, live: Live, zs: zerosend.Socket | None) -> None:
        if zs is not None:
            try:
                await zs.aclose()
                self.history.conns[live.id].final_stats = zs.stats
            except OSError as error:
                self.history.log(live.id, f"aclose() raised {error!r}")
                zs.socket.close()
            self.history.log(live.id, "wrapper closed")
        else:
            await asyncio.gather(*live.tasks, return_exceptions=True)
            live.sock.close()
            self.history.log(live.id, "socket closed after its sends ended")


def replay_command(backend: str, seed: int) -> str:
    """The failing round first (MINUTES=0: one round per backend)."""
    return (
        f"make soak CHECKER=core SEED={seed} MINUTES=0  (or this backend alone: "
        f"ZEROSEND_SOAK_SEED={seed} ZEROSEND_SOAK_MINUTES=0 "
        f".venv/bin/python -m pytest -q tests/test_history_core.py "
        f"-k 'random_mixes and {backend}')"
    )


@pytest.mark.slow
@pytest.mark.timeout(int(ROUND_SECONDS + 400))  # rounds end past their share by one round
@pytest.mark.parametrize("backend", BACKENDS)
def test_random_mixes_keep_the_contract(backend: str) -> None:
    require("rig", RIG_UNAVAILABLE)
    require_backend(backend)
    deadline = time.monotonic() + ROUND_SECONDS
    seed = SEED
    zero_copy_bytes = fixed_buffer_sends = 0
    failed: list[str] = []
    with Rig() as rig:
        while True:
            history = asyncio.run(Round(rig, backend, seed).run())
            found = check(history, zero_copy=backend != "copy")
            if found:  # the other rounds still run: one seam need not hide the next
                failed.append(report(history, found, replay_command(backend, seed)))
            for conn in history.conns.values():
                if conn.final_stats:
                    zero_copy_bytes += conn.final_stats["bytes_zerocopy"]
                    zero_copy_bytes += conn.final_stats["bytes_copied_by_kernel"]
                    fixed_buffer_sends += conn.final_stats["fixed_buffer_sends"]
            seed += 1
            if time.monotonic() > deadline:
                break
    rounds = seed - SEED
    if failed:
        shown = "\n\n".join(failed[:SHOWN_ROUNDS])
        pytest.fail(f"{len(failed)} of {rounds} rounds failed; the first:\n\n{shown}", False)
    if backend != "copy":
        assert zero_copy_bytes > 0, "no send went the zero-copy path"
    if backend == "io_uring":
        assert fixed_buffer_sends > 0, "no pool buffer went as a registered buffer"


# The checker itself: each invariant it holds must be able to fail. ------------------------------


def _stream(conn: int, sizes: list[int]) -> tuple[History, bytes]:
    history = History("none", 0)
    history.conn(conn, StreamVerifier(conn))
    data = b""
    for size in sizes:
        send = history.submit(conn, size, "plain")
        history.complete(send, "ok")
        data += numbered(conn, send.offset // WORD, size // WORD)
    return history, data


def _receive(history: History, conn: int, data: bytes, chunks: list[int]) -> None:
    verifier = history.conns[conn].verifier
    assert verifier is not None
    at = 0
    for size in [*chunks, len(data)]:
        verifier.feed(memoryview(data)[at : at + size])
        at = min(len(data), at + size)
    verifier.eof = True


sizes_strategy = st.lists(st.integers(1, 600).map(lambda w: w * WORD), min_size=2, max_size=8)
chunks_strategy = st.lists(st.integers(1, 5000), max_size=20)


@given(sizes=sizes_strategy, chunks=chunks_strategy)
def test_the_checker_accepts_a_whole_stream_in_any_chunks(
    sizes: list[int], chunks: list[int]
) -> None:
    history, data = _stream(3, sizes)
    _receive(history, 3, data, chunks)
    assert check(history, zero_copy=False) == []


@given(sizes=sizes_strategy, chunks=chunks_strategy, data=st.data())
def test_the_checker_finds_a_lost_reordered_or_reused_send(
    sizes: list[int], chunks: list[int], data: st.DataObject
) -> None:
    history, stream = _stream(3, sizes)
    sends = history.conns[3].sends
    victim = data.draw(st.integers(0, len(sends) - 2))
    send = sends[victim]
    part = stream[send.offset : send.offset + send.nbytes]
    how = data.draw(st.sampled_from(["lost", "reordered", "reused"]))
    if how == "lost":
        stream = stream[: send.offset] + stream[send.offset + send.nbytes :]
    elif how == "reordered":
        after = sends[victim + 1]
        following = stream[after.offset : after.offset + after.nbytes]
        stream = stream[: send.offset] + following + part + stream[after.offset + after.nbytes :]
    else:
        word = data.draw(st.integers(0, send.nbytes // WORD - 1)) * WORD
        at = send.offset + word
        stream = stream[:at] + poison(WORD) + stream[at + WORD :]
    _receive(history, 3, stream, chunks)
    found = check(history, zero_copy=False)
    assert found and f"inside send #{send.id} " in found[0][1], found
    if how == "reused":
        assert "poison" in found[0][1]


def test_the_checker_finds_unexplained_failures_holes_and_hangs() -> None:
    history, data = _stream(1, [800, 800, 800, 800])
    _, two, _, four = history.conns[1].sends
    history.complete(two, "error", "OSError: EFAULT")
    history.complete(four, "pending")
    _receive(history, 1, data[:1600], [])
    found = [what for _, what in check(history, zero_copy=False)]
    assert any("send #1 " in f and "never reset" in f for f in found), found
    assert any("send #2 " in f and "after send #1 " in f and "hole" in f for f in found), found
    assert any("send #3 " in f and "never resolved" in f for f in found), found
    # A reset peer explains the failure; the hole and the hang stay violations.
    history.conns[1].reset = True
    found = [what for _, what in check(history, zero_copy=False)]
    assert not any("never reset" in f for f in found)
    assert any("hole" in f for f in found) and any("never resolved" in f for f in found)


def test_the_checker_finds_bytes_lost_without_a_failure() -> None:
    history, data = _stream(2, [800, 800])
    _receive(history, 2, data[:800], [])
    found = [what for _, what in check(history, zero_copy=False)]
    assert found == ["conn 2: the receiver read 800 B of 1600 submitted, none failed "
                     "(inside send #1 (plain, 800 B, stream bytes [800, 1600)), outcome ok "
                     "is where it stopped)"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", ["io_uring", "msg_zerocopy"])
def test_the_rig_round_catches_buffers_reused_before_release(backend: str) -> None:
    # Control for the reuse check: plain buffers overwritten right after send_zc() returned,
    # before their release, must show up at the receivers.
    require("rig", RIG_UNAVAILABLE)
    require_backend(backend)
    with Rig() as rig:
        for seed in range(SEED, SEED + 10):
            history = asyncio.run(Round(rig, backend, seed, early_reuse=True).run())
            found = check(history, zero_copy=True)
            if any("poison" in what for _, what in found):
                return
    pytest.fail("ten rounds overwrote buffers before their release, unnoticed")


# The same operations driven by Hypothesis' stateful testing: a failing run is shrunk to a
# short list of steps, which Hypothesis prints as the program that replays it. -----------------

CONNS = 2
CONN = st.integers(0, CONNS - 1)


class CoreMachine(RuleBasedStateMachine):
    """Two connections on the rig and a pool, each step one operation of :class:`Round`;
    the whole record is checked at the end."""

    rig: Rig
    backend: str

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.round = Round(self.rig, self.backend, 0)
        # Small socket buffers: a few sends fill them, and the next ones queue.
        self.loop.run_until_complete(self.round.connect(CONNS, crowded=True))
        self.round.new_pool()

    def _run(self, step: Coroutine[Any, Any, object]) -> None:
        self.loop.run_until_complete(step)

    def _live(self, conn: int) -> Live:
        return self.round.conns[conn]

    @rule(conn=CONN, kib=st.sampled_from([4, 256, 1024]), vectored=st.booleans())
    def send_plain(self, conn: int, kib: int, vectored: bool) -> None:
        if self._live(conn).sendable():
            source = "vectored" if vectored else "plain"
            self._run(self.round.send(self._live(conn), size=kib * KiB, source=source))

    @rule(conn=CONN, kib=st.sampled_from([4, 64]))  # every pool's buffers hold 64 KiB
    def send_from_pool(self, conn: int, kib: int) -> None:
        if self._live(conn).sendable():
            self._run(self.round.send(self._live(conn), size=kib * KiB, source="pool"))

    @rule(conn=CONN, action=st.sampled_from(["stall or resume", "read slowly", "reset"]))
    def peer(self, conn: int, action: str) -> None:
        if action == "reset":
            self._run(self.round.reset_peer(self._live(conn)))
        elif action == "read slowly":
            self.round.read_slowly(self._live(conn))
        else:
            self.round.stall_or_resume(self._live(conn))

    @rule(conn=CONN)
    def cancel(self, conn: int) -> None:
        self._run(self.round.cancel(conn))

    @rule(conn=CONN, drop=st.booleans())
    def let_go(self, conn: int, drop: bool) -> None:
        """Close the socket, or drop the wrapper, with sends in flight."""
        live = self._live(conn)
        if live.sendable():
            self._run(self.round.drop_wrapper(live) if drop else self.round.close_raw(live))

    @rule()
    def close_pool(self) -> None:
        self._run(self.round.close_pool())

    @rule()
    def fork(self) -> None:
        self._run(self.round.fork())

    @rule()
    def let_the_loop_run(self) -> None:
        self._run(asyncio.sleep(0.01))

    def teardown(self) -> None:
        try:
            self._run(self.round.finish())
        finally:
            self.loop.close()
        history = self.round.history
        found = check(history, zero_copy=self.backend != "copy")
        replay = "the steps Hypothesis printed above (state = CoreMachine() ...)"
        assert not found, report(history, found, replay)


@pytest.mark.slow
# A soak's last batch ends past its share; shrinking a failure runs many more examples.
@pytest.mark.timeout(int(STATEFUL_SECONDS) + STATEFUL_EXAMPLES * 4 + 600)
@pytest.mark.parametrize("backend", BACKENDS)
def test_stateful_mixes_keep_the_contract(backend: str) -> None:
    require("rig", RIG_UNAVAILABLE)
    require_backend(backend)
    with Rig() as rig:
        CoreMachine.rig, CoreMachine.backend = rig, backend
        deadline = time.monotonic() + STATEFUL_SECONDS
        while True:  # one batch in `make test`; in a soak, batches until the share is used
            run_state_machine_as_test(
                CoreMachine,
                settings=settings(
                    max_examples=STATEFUL_EXAMPLES,
                    stateful_step_count=30,
                    deadline=None,
                    database=None,  # a replay comes from the printed steps, not a local cache
                    derandomize=STATEFUL_DERANDOMIZED,
                    suppress_health_check=list(HealthCheck),
                ),
            )
            if time.monotonic() >= deadline:
                break
