"""One benchmark sender, run as its own process so that its rusage is its own.

    python -m bench.senders.sender CONTENDER --connect HOST:PORT --size BYTES --inflight N
                           [--seconds S] [--max-bytes B] [--cpu CPU]

Sends ``BYTES``-sized buffers to the benchmark receiver for ``S`` seconds (or ``B`` bytes),
keeping ``N`` sends in flight, then shuts the write side and waits for the receiver's byte
count. With ``--udp`` (zerosend contenders only) it sends datagrams on a connected UDP socket
instead, to a device that discards them (the true-zero-copy topology), and waits for the last
release. Prints one JSON line: elapsed seconds (first send to acknowledgement), bytes, sends, the
CPU time this process spent meanwhile, its peak RSS, and zerosend's counters (``stats``, keyed
by ``zerosend.STATS_KEYS``; a copying sender's counters say every byte was copied).

What "N in flight" means for each contender:

* zerosend ``send_zc``: one connection, N sends submitted and not yet released by the kernel;
  each has its own buffer, reused once its send completes (one task awaits the oldest future).
  ``zerosend-auto`` wraps with the defaults (backend and zero-copy threshold); a named backend
  is wrapped with ``zerocopy_threshold=0``, so it sends zero-copy at every size.
* ``zerosend-io_uring-defer``: as ``zerosend-io_uring``, with the loop's ring set up with
  DEFER_TASKRUN (``wrap(..., defer_taskrun=True)``); not in the default set, name it to run it.
* ``loop.sock_sendall``: N connections, one task each, each with one ``sock_sendall`` pending
  (a socket cannot have two: their bytes would interleave).
* ``loop.sock_sendall`` on one connection (``-1conn``): the loop a user writes for one stream,
  one ``await loop.sock_sendall`` after the other; N does not apply (one buffer is enough).
* streams: one connection, N ``writer.write()`` calls, then ``await writer.drain()``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import resource
import socket
import struct
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import zerosend

ACK = struct.Struct("<Q")
CONTENDERS = (
    "zerosend-auto",
    "zerosend-io_uring",
    "zerosend-io_uring-pool",
    "zerosend-io_uring-defer",
    "zerosend-msg_zerocopy",
    "zerosend-copy",
    "asyncio-sock_sendall-1conn",
    "asyncio-sock_sendall",
    "asyncio-streams",
    "uvloop-sock_sendall",
    "uvloop-streams",
)


class Skip(Exception):
    """The contender cannot run here; the message says why."""


@dataclass
class Outcome:
    bytes: int = 0
    sends: int = 0
    connections: int = 1
    backend: str = ""
    counters: dict[str, int] = field(default_factory=dict)


@dataclass
class Plan:
    host: str
    port: int
    size: int
    inflight: int
    seconds: float
    max_bytes: int
    udp: bool = False
    deadline: float = 0.0
    started: float = 0.0
    finished: float = 0.0
    usage: tuple[float, float] = (0.0, 0.0)
    system_cpu: float = 0.0

    def buffers(self, count: int) -> list[bytearray]:
        """``count`` buffers of ``size`` bytes, every page written."""
        return [bytearray(b"\xa5") * self.size for _ in range(count)]

    def start(self) -> None:
        """The clock starts: CPU time and elapsed time count from here."""
        self.system_cpu = system_busy()  # before the getrusage that marks the span's start
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.usage = (ru.ru_utime, ru.ru_stime)
        self.started = time.monotonic()
        self.deadline = self.started + self.seconds

    def finish(self) -> None:
        """The clock stops (the receiver acknowledged every byte)."""
        self.finished = time.monotonic()
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.usage = (ru.ru_utime - self.usage[0], ru.ru_stime - self.usage[1])
        self.system_cpu = system_busy() - self.system_cpu


def system_busy() -> float:
    """Busy CPU seconds of the whole machine (every CPU and process, interrupts included) from
    /proc/stat: on veth the kernel's deferred copy runs on the receiving CPU, outside the
    sender's own rusage."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


async def connect(plan: Plan) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if plan.udp else socket.SOCK_STREAM)
    if not plan.udp:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    await loop.sock_connect(sock, (plan.host, plan.port))
    return sock


async def read_ack(sock: socket.socket) -> int:
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < ACK.size:
        chunk = await loop.sock_recv(sock, ACK.size - len(data))
        if not chunk:
            raise ConnectionError("the receiver closed without acknowledging")
        data += chunk
    return int(ACK.unpack(data)[0])


async def run_zerosend(
    plan: Plan, backend: str, pool: bool, outcome: Outcome, defer: bool = False
) -> None:
    # defer: the loop's io_uring with DEFER_TASKRUN (set up by this, the loop's first wrap)
    options: dict[str, Any] = {"defer_taskrun": True} if defer else {}
    sock = await connect(plan)
    if backend == "auto":  # the defaults, threshold included: what a user gets
        zs = zerosend.wrap(sock, **options)
    else:  # the backend itself at every size: the figures auto's rule is read from
        zs = zerosend.wrap(sock, backend=backend, zerocopy_threshold=0, **options)  # type: ignore[arg-type]
    outcome.backend = zs.backend
    window: collections.deque[tuple[asyncio.Future[Any], Any]] = collections.deque()
    buffer_pool = zerosend.BufferPool(plan.inflight, plan.size) if pool else None
    free: list[Any] = [] if buffer_pool is not None else list(plan.buffers(plan.inflight))
    size = plan.size
    limit = plan.max_bytes
    sent = 0
    sends = 0
    monotonic = time.monotonic
    send_zc = zs.send_zc
    plan.start()
    deadline = plan.deadline
    stopping = False
    while True:
        while not stopping and len(window) < plan.inflight:
            if buffer_pool is not None:
                buf = await buffer_pool.acquire()
            else:
                buf = free.pop()
            window.append((send_zc(buf), buf))
            sent += size
            sends += 1
            if sent >= limit or monotonic() >= deadline:
                stopping = True
        if not window:
            break
        future, buf = window.popleft()
        await future
        if buffer_pool is not None:
            buf.release()
        else:
            free.append(buf)
    await zs.drain()
    outcome.counters = dict(zs.stats)
    if plan.udp:  # nobody to acknowledge: the device discarded every datagram
        received = sent
    else:
        sock.shutdown(socket.SHUT_WR)
        received = await read_ack(sock)
    plan.finish()
    await zs.aclose()
    check_count(sent, received)
    outcome.bytes, outcome.sends = sent, sends


async def run_sock_sendall(plan: Plan, outcome: Outcome, connections: int) -> None:
    loop = asyncio.get_running_loop()
    socks = [await connect(plan) for _ in range(connections)]
    buffers = plan.buffers(connections)
    totals = [0] * connections
    counts = [0] * connections

    async def pump(index: int) -> None:
        sock, buf, size, limit = socks[index], buffers[index], plan.size, plan.max_bytes
        share = limit // connections if limit < 1 << 62 else limit
        deadline, monotonic, sendall = plan.deadline, time.monotonic, loop.sock_sendall
        sent = sends = 0
        while True:
            await sendall(sock, buf)
            sent += size
            sends += 1
            if sent >= share or monotonic() >= deadline:
                break
        totals[index], counts[index] = sent, sends
        sock.shutdown(socket.SHUT_WR)
        check_count(sent, await read_ack(sock))
        sock.close()

    plan.start()
    await asyncio.gather(*(pump(i) for i in range(connections)))
    plan.finish()
    outcome.bytes, outcome.sends, outcome.connections = sum(totals), sum(counts), len(socks)


async def run_streams(plan: Plan, outcome: Outcome) -> None:
    sock = await connect(plan)
    reader, writer = await asyncio.open_connection(sock=sock)
    buffers = plan.buffers(plan.inflight)
    size, limit, monotonic = plan.size, plan.max_bytes, time.monotonic
    sent = sends = 0
    plan.start()
    deadline = plan.deadline
    stopping = False
    while not stopping:
        for buf in buffers:
            writer.write(buf)
            sent += size
            sends += 1
            if sent >= limit or monotonic() >= deadline:
                stopping = True
                break
        await writer.drain()
    writer.write_eof()
    data = await reader.readexactly(ACK.size)
    plan.finish()
    writer.close()
    await writer.wait_closed()
    check_count(sent, int(ACK.unpack(data)[0]))
    outcome.bytes, outcome.sends = sent, sends


def check_count(sent: int, received: int) -> None:
    if sent != received:
        raise RuntimeError(f"sent {sent} bytes but the receiver read {received}")


def runner(contender: str, plan: Plan, outcome: Outcome) -> Callable[[], Coroutine[Any, Any, None]]:
    kind, _, variant = contender.partition("-")
    if plan.udp and kind != "zerosend":
        raise ValueError(f"{contender} does not send datagrams (--udp)")
    if kind == "zerosend":
        backend, _, extra = variant.partition("-")
        return lambda: run_zerosend(plan, backend, extra == "pool", outcome, extra == "defer")
    if variant == "sock_sendall":
        return lambda: run_sock_sendall(plan, outcome, plan.inflight)
    if variant == "sock_sendall-1conn":
        return lambda: run_sock_sendall(plan, outcome, 1)
    if variant == "streams":
        return lambda: run_streams(plan, outcome)
    raise ValueError(f"unknown contender {contender!r}")


def run(contender: str, plan: Plan) -> dict[str, Any]:
    """Runs one contender; returns its measurements."""
    outcome = Outcome(backend="copy")
    coroutine = runner(contender, plan, outcome)
    if contender.startswith("uvloop-"):
        try:
            import uvloop
        except ImportError as exc:
            raise Skip(f"uvloop is not installed: {exc}") from None
        uvloop.run(coroutine())
    else:
        asyncio.run(coroutine())
    counters = outcome.counters
    if not counters:  # a copying sender: every byte was copied
        counters = dict.fromkeys(zerosend.STATS_KEYS, 0)
        counters.update(sends=outcome.sends, bytes_copied=outcome.bytes)
    return {
        "elapsed": plan.finished - plan.started,
        "bytes": outcome.bytes,
        "sends": outcome.sends,
        "cpu_user": plan.usage[0],
        "cpu_sys": plan.usage[1],
        "system_cpu": plan.system_cpu,
        "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "backend": outcome.backend,
        "connections": outcome.connections,
        "stats": counters,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.senders.sender")
    parser.add_argument("contender", choices=CONTENDERS)
    parser.add_argument("--connect", required=True, help="HOST:PORT of the receiver")
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--inflight", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--max-bytes", type=int, default=1 << 62)
    parser.add_argument("--cpu", type=int, default=None, help="pin to this CPU")
    parser.add_argument("--udp", action="store_true", help="datagrams to a discarding device")
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    host, port = args.connect.rsplit(":", 1)
    plan = Plan(
        host, int(port), args.size, args.inflight, args.seconds, args.max_bytes, udp=args.udp
    )
    try:
        result = run(args.contender, plan)
    except Skip as skip:
        print(json.dumps({"skipped": str(skip)}), flush=True)
        return 0
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
