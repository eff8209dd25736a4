"""``make run`` (``python -m bench.demo``): probe the kernel, push 1 GiB through each backend.

For each usable backend (and io_uring with BufferPool buffers) it sends 1 GiB from one reused
set of buffers to a receiver in another process, first over loopback, then (as root, where
network namespaces work) over the rig: a receiver in its own namespace behind a veth pair on
CPU 1, the sender pinned to CPU 0. Both copy on delivery. Last, as root, true zero-copy: UDP
datagrams of 60,000 bytes out of an ``ifb`` device (MTU 65535) that frees them uncopied.
It prints throughput, the sender's CPU seconds per GB, and, from the send results, how many
bytes went zero-copy and why the rest were copied. The probe alone is ``python -m zerosend``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

import zerosend
from bench.harness.receiver import start_receiver
from bench.harness.rig import IfbSink, Rig, rig_unavailable_reason
from zerosend.__main__ import describe

MiB = 1 << 20
#: Datagram size on the true-zero-copy topology: below the ifb's MTU, so never fragmented.
DATAGRAM = 60_000
IFB_TOPOLOGY = "ifb (UDP, true zero-copy)"


@dataclass
class Row:
    topology: str
    backend: str
    mb_per_s: float
    cpu_s_per_gb: float
    bytes_zerocopy: int
    bytes_copied: int
    why_copied: str


def _why_copied(stats: dict[str, int]) -> str:
    reasons = {
        "bytes_copied_by_kernel": "kernel copied on local delivery (loopback/veth)",
        "bytes_copied_below_threshold": "below zerocopy_threshold",
        "bytes_copied_backend": "copy backend",
        "bytes_copied_requested": "send() asked for a copy",
    }
    parts = [text for key, text in reasons.items() if stats.get(key)]
    return "; ".join(parts) or "-"


async def _connect(host: str, port: int, datagrams: bool) -> socket.socket:
    loop = asyncio.get_running_loop()
    kind = socket.SOCK_DGRAM if datagrams else socket.SOCK_STREAM
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, kind)
    sock.setblocking(False)
    await loop.sock_connect(sock, (host, port))
    return sock


async def _push(
    sock: socket.socket, backend: str, pooled: bool, total: int, size: int, depth: int
) -> Row:
    if sock.type == socket.SOCK_DGRAM:  # below the default threshold; zero-copy is the point
        zs = zerosend.wrap(sock, backend=backend, zerocopy_threshold=0)  # type: ignore[arg-type]
    else:
        zs = zerosend.wrap(sock, backend=backend)  # type: ignore[arg-type]
    buffers: list[Any]
    if pooled:
        # Registered buffers: io_uring sends them without looking up and pinning pages.
        pool = zerosend.BufferPool(depth, size)
        buffers = [await pool.acquire() for _ in range(depth)]
    else:
        buffers = [bytearray(size) for _ in range(depth)]
    for i, buf in enumerate(buffers):
        memoryview(buf)[:] = bytes([i]) * size
    inflight: list[asyncio.Future[zerosend.SendResult]] = []
    zerocopy = copied = 0
    started, cpu_started = time.perf_counter(), time.process_time()
    for i in range(total // size):
        if len(inflight) == depth:
            result = await inflight.pop(0)
            zerocopy, copied = _count(result, zerocopy, copied)
        # Buffer i % depth is free again: its previous send was awaited above.
        inflight.append(zs.send_zc(buffers[i % depth]))
    for result in await asyncio.gather(*inflight):
        zerocopy, copied = _count(result, zerocopy, copied)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    stats = zs.stats
    await zs.aclose()
    for buf in buffers:
        if pooled:
            buf.release()
    label = f"{zs.backend} + pool ({stats['fixed_buffer_sends']} fixed)" if pooled else zs.backend
    return Row(
        "",
        label,
        total / elapsed / 1e6,
        cpu / (total / 1e9),
        zerocopy,
        copied,
        _why_copied(stats),
    )


def _count(result: zerosend.SendResult, zerocopy: int, copied: int) -> tuple[int, int]:
    if result.zerocopy:
        return zerocopy + result.nbytes, copied
    return zerocopy, copied + result.nbytes


def _run(
    topology: str, rig: Rig | None, backend: str, pooled: bool, args: argparse.Namespace
) -> Row:
    host = "127.0.0.1" if rig is None else rig.peer_addr
    namespace = None if rig is None else rig.ns
    # On the rig the receive work runs on CPU 1 (RPS); the sender stays on CPU 0.
    cpu = None if rig is None else 1
    receiver = start_receiver(host, namespace=namespace, cpu=cpu, once=True)

    async def push() -> Row:
        sock = await _connect(host, receiver.port, datagrams=False)
        return await _push(sock, backend, pooled, args.total, args.size, args.depth)

    with receiver:
        row = asyncio.run(push())
        received = receiver.report()["bytes"]
    if received != args.total:
        raise RuntimeError(f"receiver got {received} bytes, expected {args.total}")
    row.topology = topology
    return row


def _run_ifb(ifb: IfbSink, backend: str, pooled: bool, args: argparse.Namespace) -> Row:
    """Datagrams out of the ifb device; the device's drop counter stands in for a receiver."""
    total = args.total - args.total % DATAGRAM
    before = ifb.dropped()

    async def push() -> Row:
        sock = await _connect(ifb.sink_addr, 9, datagrams=True)
        return await _push(sock, backend, pooled, total, DATAGRAM, args.depth)

    row = asyncio.run(push())
    if ifb.dropped() - before < total // DATAGRAM:
        raise RuntimeError(f"the ifb device saw fewer than {total // DATAGRAM} datagrams")
    row.topology = IFB_TOPOLOGY
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.demo", description=__doc__)
    parser.add_argument("--total", type=int, default=1 << 30, help="bytes per run (1 GiB)")
    parser.add_argument("--size", type=int, default=MiB, help="bytes per send (1 MiB)")
    parser.add_argument("--depth", type=int, default=8, help="sends in flight (8)")
    parser.add_argument("--no-rig", action="store_true", help="loopback only")
    args = parser.parse_args(argv)
    args.total -= args.total % args.size

    caps = zerosend.capabilities()
    print(describe(caps))
    contenders = [
        (backend, pooled)
        for backend, pooled, ok in (
            ("io_uring", False, caps.io_uring_send_zc),
            ("io_uring", True, caps.io_uring_send_zc),
            ("msg_zerocopy", False, caps.msg_zerocopy),
            ("copy", False, True),
        )
        if ok
    ]

    topologies: list[tuple[str, Rig | None]] = [("loopback", None)]
    rig = None
    reason = "skipped (--no-rig)" if args.no_rig else rig_unavailable_reason()
    if reason is None:
        rig = Rig().__enter__()
        topologies.append(("rig (veth+netns)", rig))
    print(
        f"\npushing {args.total / MiB:.0f} MiB per run, {args.size // 1024} KiB sends "
        f"({DATAGRAM:,}-byte datagrams on ifb), {args.depth} in flight\n"
    )
    rows = []
    ifb = IfbSink().__enter__() if reason is None else None
    try:
        for topology, on_rig in topologies:
            pinned = topology != "loopback" and (os.cpu_count() or 1) > 1
            affinity = os.sched_getaffinity(0)
            if pinned:
                os.sched_setaffinity(0, {0})
            try:
                for backend, pooled in contenders:
                    rows.append(_run(topology, on_rig, backend, pooled, args))
            finally:
                os.sched_setaffinity(0, affinity)
        if ifb is not None:
            for backend, pooled in contenders:
                rows.append(_run_ifb(ifb, backend, pooled, args))
    finally:
        if rig is not None:
            rig.close()
        if ifb is not None:
            ifb.close()

    header = (
        "topology",
        "backend",
        "MB/s",
        "CPU s/GB",
        "zero-copy bytes",
        "copied bytes",
        "why copied",
    )
    table = [header] + [
        (
            r.topology,
            r.backend,
            f"{r.mb_per_s:,.0f}",
            f"{r.cpu_s_per_gb:.3f}",
            f"{r.bytes_zerocopy:,}",
            f"{r.bytes_copied:,}",
            r.why_copied,
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    if reason is not None:
        print(f"\nrig and ifb not run: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
