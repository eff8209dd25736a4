"""Page-aligned transmit buffers, reused only after the kernel released them.

The interface is ``zerosend.BufferPool``'s (``try_acquire()``/``await acquire()``, then
``lease.release()``), on anonymous mmaps.
"""

from __future__ import annotations

import asyncio
import mmap
from collections import deque


class MmapLease:
    """One pooled buffer, ``view`` of it; ``release()`` hands it back."""

    __slots__ = ("_mem", "_pool", "view")

    def __init__(self, pool: MmapPool, mem: mmap.mmap) -> None:
        self._pool = pool
        self._mem = mem
        self.view = memoryview(mem)

    def release(self) -> None:
        self._pool._put(self)


class MmapPool:
    """``count`` anonymous mmaps of ``size`` bytes: page-aligned, allocated once, never freed."""

    def __init__(self, count: int, size: int) -> None:
        self.size = size
        self.count = count
        self._free: deque[MmapLease] = deque(
            MmapLease(self, mmap.mmap(-1, size)) for _ in range(count)
        )
        self._waiters: deque[asyncio.Future[MmapLease]] = deque()

    @property
    def available(self) -> int:
        return len(self._free)

    def try_acquire(self) -> MmapLease | None:
        if self._free and not self._waiters:
            return self._free.pop()  # the most recently released: still warm in the cache
        return None

    async def acquire(self) -> MmapLease:
        lease = self.try_acquire()
        if lease is not None:
            return lease
        fut: asyncio.Future[MmapLease] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._put(fut.result())  # handed over just as we were cancelled
            raise

    def _put(self, lease: MmapLease) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(lease)
                return
        self._free.append(lease)
