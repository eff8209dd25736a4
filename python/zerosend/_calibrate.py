"""``python -m zerosend calibrate``: measures copy against zero-copy through the public API and
stores the calibration ``_calibration`` reads (see there for the rule)."""

from __future__ import annotations

import asyncio
import json
import platform
import socket
import time
from typing import Any, Final

from ._calibration import FORMAT, cache_path, cpu_model, crossover

#: Sizes the calibration measures (bytes).
SIZES: Final = (64 << 10, 256 << 10, 1 << 20, 4 << 20)
#: Sends in flight while measuring.
INFLIGHT: Final = 8


async def _measure(
    host: str, port: int, size: int, zerocopy: bool, seconds: float
) -> dict[str, Any]:
    import resource  # POSIX only: the pure wheel imports this module on every OS

    import zerosend

    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    await loop.sock_connect(sock, (host, port))
    # The backend auto picks for TCP, at every size; or copy.
    zs = zerosend.wrap(sock, backend="auto", zerocopy_threshold=0 if zerocopy else 1 << 62)
    buffers = [bytearray(b"\xa5") * size for _ in range(INFLIGHT)]
    window: list[Any] = []
    sent = 0
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.monotonic()
    deadline = started + seconds
    index = 0
    while time.monotonic() < deadline:
        if len(window) == INFLIGHT:
            await window.pop(0)
        window.append(zs.send_zc(buffers[index % INFLIGHT]))
        index += 1
        sent += size
    for future in window:
        await future
    await zs.drain()
    elapsed = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    backend = zs.backend
    await zs.aclose()
    try:
        sock.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(loop.sock_recv(sock, 8), 5)  # a benchmark receiver's count
    except (OSError, TimeoutError):
        pass
    sock.close()
    return {
        "size": size,
        "mode": "zerocopy" if zerocopy else "copy",
        "backend": backend,
        "cpu_s_per_gb": cpu / (sent / 1e9),
        "mb_per_s": sent / 1e6 / elapsed,
    }


def calibrate(
    host: str, port: int, seconds: float = 0.5, sizes: tuple[int, ...] = SIZES
) -> dict[str, Any]:
    """Measures copy against zero-copy sending to ``host:port`` (a peer that reads and discards);
    writes and returns this machine's calibration."""
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")

    async def run() -> list[dict[str, Any]]:
        rows = []
        for size in sizes:
            for zerocopy in (False, True, False, True):  # interleaved, twice: the better of two
                rows.append(await _measure(host, port, size, zerocopy, seconds / 2))
        return rows

    runs = asyncio.run(run())
    best: dict[tuple[int, str], dict[str, Any]] = {}
    for row in runs:
        key = (row["size"], row["mode"])
        if key not in best or row["cpu_s_per_gb"] < best[key]["cpu_s_per_gb"]:
            best[key] = row
    measured = sorted(best.values(), key=lambda r: (r["size"], r["mode"]))
    document = {
        "format": FORMAT,
        "kernel": platform.release(),
        "cpu": cpu_model(),
        "peer": f"{host}:{port}",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "measured": measured,
        "tcp_zerocopy_threshold": crossover(measured),
    }
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(document, indent=1))
    tmp.replace(path)
    return document
