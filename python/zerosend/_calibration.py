"""``auto`` that measures: the TCP zero-copy threshold calibrated on this machine.

Where zero-copy starts to pay depends on the CPU, the kernel and the device, so no rule fitted
on one machine holds on another. ``python -m zerosend calibrate --connect HOST:PORT`` sends to a
peer that discards what it reads (over the device the application will use: loopback copies
everything on delivery, so it says nothing), by copy and by zero-copy at a few sizes, and keeps
the smallest size from which zero-copy costs no more sender CPU per byte at no less than 95% of
the copy's rate, in the user's cache directory, keyed by kernel release and CPU model. ``wrap``
with the defaults (``backend="auto"``, the default threshold) then uses it for TCP sockets.

This module reads and judges calibrations (below the socket layer, which asks it); the
measuring itself is ``_calibrate``'s, above the public API it measures through.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

#: The threshold used without a calibration (bytes).
DEFAULT_THRESHOLD: Final = 1 << 20
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
