"""zerosend streams on the rig: the two ways a StreamWriter keeps N sends in flight.

    python -m bench.senders.streams [--rounds N] [--seconds S] [--sizes 16K,64K,1M]
                                    [--inflight 1,8,32] [--backends io_uring,msg_zerocopy]
                                    [--topology rig|loopback]

The same receiver and clock as ``python -m bench`` (``bench.harness.receiver`` on CPU 1; the sender
pinned to CPU 0; MB/s from the first send to the receiver's byte count, sender CPU from
``getrusage`` over that span). Each run is one connection from ``zerosend.open_connection``:

* *window*: N buffers; ``write_zc`` from each, awaiting the oldest future before refilling its
  buffer (the buffers are reused, so each may be refilled only after its release).
* *drain*: ``write_zc`` of one ``bytes`` object (immutable: nothing to wait for before reusing
  it) and ``await writer.drain()`` after each, with the high-water mark at N x SIZE.

Prints a Markdown table of medians over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import resource
import statistics
import time
from typing import Any

import zerosend
from bench.harness.config import parse_size, size_label
from bench.harness.run import pinning, receiver, rig_reason
from bench.senders.sender import ACK, check_count

PATTERNS = ("window", "drain")


async def one_run(
    address: tuple[str, int], backend: str, pattern: str, size: int, inflight: int, seconds: float
) -> dict[str, float]:
    # Threshold 0: the backend itself at every size, as the core harness measures it.
    reader, writer = await zerosend.open_connection(
        *address,
        backend=backend,  # type: ignore[arg-type]
        zerocopy_threshold=0,
    )
    zs = writer.get_extra_info("zerosend")
    sent = 0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    started = time.monotonic()
    deadline = started + seconds
    if pattern == "window":
        free = [bytearray(b"\xa5") * size for _ in range(inflight)]
        window: collections.deque[tuple[asyncio.Future[Any], bytearray]] = collections.deque()
        while time.monotonic() < deadline:
            while free:
                buf = free.pop()
                window.append((writer.write_zc(buf), buf))
                sent += size
            future, buf = window.popleft()
            await future
            free.append(buf)
    else:
        payload = b"\xa5" * size
        writer.set_write_buffer_limits(high=inflight * size)
        while time.monotonic() < deadline:
            writer.write_zc(payload)
            sent += size
            await writer.drain()
    writer.write_eof()  # once every write was released
    (received,) = ACK.unpack(await reader.readexactly(ACK.size))
    elapsed = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    check_count(sent, received)
    stats = zs.stats
    writer.close()
    await writer.wait_closed()
    cpu = after.ru_utime - usage.ru_utime + after.ru_stime - usage.ru_stime
    return {
        "mb_per_s": sent / elapsed / 1e6,
        "cpu_s_per_gb": cpu / (sent / 1e9),
        "copied": stats["bytes_copied"] / max(1, sent),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.senders.streams", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--sizes", default="16K,64K,1M")
    parser.add_argument("--inflight", default="1,8,32")
    parser.add_argument("--backends", default="io_uring,msg_zerocopy")
    parser.add_argument("--topology", choices=("rig", "loopback"), default="rig")
    args = parser.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    depths = [int(d) for d in args.inflight.split(",")]
    backends = args.backends.split(",")
    if args.topology == "rig" and (why := rig_reason()):
        parser.error(f"the rig is unavailable: {why}")
    sender_cpu, receiver_cpu = pinning()
    if sender_cpu is not None:
        os.sched_setaffinity(0, {sender_cpu})
    runs: dict[tuple[str, str, int, int], list[dict[str, float]]] = collections.defaultdict(list)
    with receiver(args.topology, receiver_cpu) as address:
        for _ in range(args.rounds):
            for size in sizes:
                for depth in depths:
                    for backend in backends:
                        for pattern in PATTERNS:
                            result = asyncio.run(
                                one_run(address, backend, pattern, size, depth, args.seconds)
                            )
                            runs[(backend, pattern, size, depth)].append(result)
    print("| size | in flight | " + " | ".join(f"{b} {p}" for b in backends for p in PATTERNS))
    print("|---|---|" + "---|" * (len(backends) * len(PATTERNS)))
    for size in sizes:
        for depth in depths:
            cells = []
            for backend in backends:
                for pattern in PATTERNS:
                    results = runs[(backend, pattern, size, depth)]
                    mbps = statistics.median(r["mb_per_s"] for r in results)
                    cpu = statistics.median(r["cpu_s_per_gb"] for r in results)
                    cells.append(f"{mbps:,.0f} MB/s, {cpu:.3f} s/GB")
            print(f"| {size_label(size)} | {depth} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
