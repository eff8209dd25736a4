"""``auto`` that measures: the TCP zero-copy threshold calibrated on this machine.

Where zero-copy starts to pay depends on the CPU, the kernel and the device, so no rule fitted
on one machine holds on another. ``python -m zerosend calibrate --connect HOST:PORT`` sends to a
peer that discards what it reads (over the device the application will use: loopback copies
everything on delivery, so it says nothing), by copy and by zero-copy at a few sizes, and keeps
the smallest size from which zero-copy costs no more sender CPU per byte at no less than 95% of
the copy's rate, in the user's cache directory, keyed by kernel release and CPU model. ``wrap``
with the defaults (``backend="auto"``, the default threshold) then uses it for TCP sockets.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import platform
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

#: The threshold used without a calibration (bytes).
DEFAULT_THRESHOLD: Final = 1 << 20
#: Sizes the calibration measures (bytes).
SIZES: Final = (64 << 10, 256 << 10, 1 << 20, 4 << 20)
#: Sends in flight while measuring.
INFLIGHT: Final = 8
FORMAT: Final = 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.machine()


def cache_path() -> Path:
    """Where this machine's calibration lives: per kernel release and CPU model."""
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    key = hashlib.sha256(f"{platform.release()}\n{cpu_model()}".encode()).hexdigest()[:16]
    return Path(base) / "zerosend" / f"calibration-{key}.json"


@dataclass(frozen=True)
class Thresholds:
    """The TCP zero-copy threshold ``auto`` uses (None: every send copies) and its source."""

    tcp_zerocopy_threshold: int | None
    source: str  # "calibrated" or "default"
    detail: str


def load() -> Thresholds:
    """The calibration for this machine if there is one, else the default. A cache file that
    cannot be read raises ValueError naming the file and the field."""
    path = cache_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Thresholds(DEFAULT_THRESHOLD, "default", "no calibration for this machine")
    try:
        document = json.loads(text)
    except ValueError as error:
        raise ValueError(f"{path}: not JSON ({error}); delete it or recalibrate") from None
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected an object; delete it or recalibrate")
    threshold = document.get("tcp_zerocopy_threshold", "missing")
    if threshold is not None and (
        isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0
    ):
        raise ValueError(
            f"{path}: tcp_zerocopy_threshold must be a byte count >= 0 or null, "
            f"got {threshold!r}; delete it or recalibrate"
        )
    return Thresholds(threshold, "calibrated", f"{path} ({document.get('measured_at', '?')})")


def crossover(measured: list[dict[str, Any]]) -> int | None:
    """The smallest size from which zero-copy wins at every larger size measured: no more
    sender CPU per byte than copy, at 95% of copy's MB/s or better. None if it never does."""
    by_size: dict[int, dict[str, dict[str, Any]]] = {}
    for row in measured:
        by_size.setdefault(row["size"], {})[row["mode"]] = row
    threshold = None
    for size in sorted(by_size, reverse=True):
        pair = by_size[size]
        copy, zc = pair.get("copy"), pair.get("zerocopy")
        if copy is None or zc is None:
            break
        wins = (
            zc["cpu_s_per_gb"] <= copy["cpu_s_per_gb"] and zc["mb_per_s"] >= 0.95 * copy["mb_per_s"]
        )
        if not wins:
            break
        threshold = size
    return threshold


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
