"""Latency histograms kept as the commands and disk operations happen, read by the metrics
exporter at scrape time.

Cheap on the hot path by construction: a histogram is a preallocated list of bucket counts and a
sum; an observation is a ``bisect`` (in C) and two additions. No labels are looked up and no
object is made per observation (the READ fast path observes a whole run at once). The
exporter turns them into Prometheus histograms (cumulative buckets) when it is scraped.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable
from time import perf_counter
from typing import Any

#: Bucket upper bounds in seconds: a page-cache read (tens of microseconds) to a stuck device.
BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

#: Command families (the ``op`` label of the command histogram), by index.
READ, WRITE, OTHER = 0, 1, 2
FAMILIES = ("read", "write", "other")
#: Store operations (the ``op`` label of the disk histogram).
DISK_OPS = ("read", "write", "flush")


class Histogram:
    """Bucket counts (``counts[i]``: observations at most ``BUCKETS[i]``, the last one above
    every bound) and their sum, not cumulative."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float, n: int = 1) -> None:
        """``n`` observations of ``seconds`` each."""
        self.counts[bisect_left(BUCKETS, seconds)] += n
        self.total += seconds * n

    def cumulative(self) -> list[tuple[str, int]]:
        """The Prometheus buckets: (upper bound, observations at most it), ending with +Inf."""
        out, running = [], 0
        for bound, count in zip((*map(str, BUCKETS), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


class LunLatency:
    """One LUN's histograms: commands by family (``READ``, ``WRITE``, ``OTHER``) and disk
    operations by ``DISK_OPS``. The disk ones are observed in the store's threads, under a lock."""

    __slots__ = ("commands", "disk", "lock")

    def __init__(self) -> None:
        self.commands = (Histogram(), Histogram(), Histogram())
        self.disk = {op: Histogram() for op in DISK_OPS}
        self.lock = threading.Lock()


def _timed(
    method: Callable[..., Any], hist: Histogram, lock: threading.Lock, hit_only: bool = False
) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = perf_counter()
        result = method(*args, **kwargs)
        if not hit_only or result:  # (a page-cache probe that read nothing is no read)
            elapsed = perf_counter() - start
            with lock:
                hist.observe(elapsed)
        return result

    return timed


def time_disk(store: Any, latency: LunLatency) -> None:
    """Time ``store``'s reads, writes and flushes into ``latency.disk``: its methods are
    wrapped on the instance, so every caller (the disk threads, the commands working on the
    medium, the loop's own writes) is measured, whatever kind of store it is. A failed
    operation is not observed (its exception passes through)."""
    disk, lock = latency.disk, latency.lock
    setattr(store, "read_into", _timed(store.read_into, disk["read"], lock))  # noqa: B010
    setattr(store, "read_cached", _timed(store.read_cached, disk["read"], lock, hit_only=True))  # noqa: B010
    setattr(store, "write", _timed(store.write, disk["write"], lock))  # noqa: B010
    setattr(store, "flush", _timed(store.flush, disk["flush"], lock))  # noqa: B010
