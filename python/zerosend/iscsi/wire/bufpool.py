"""Page-aligned transmit buffers, reused only after the kernel released them, shared fairly
between sessions.

Sessions take buffers through their own ``PoolShare`` (``try_acquire()``/``await acquire()``,
then ``lease.release()``, the interface of ``zerosend.BufferPool``), on anonymous mmaps of one
``MmapPool``. The rule that keeps one session from starving the others:

- A session holds at most ``cap`` buffers (``--session-buffers``), so a session whose peer
  stopped reading pins no more than that until it is found dead.
- A buffer that comes back while sessions wait goes to the waiting session that holds the
  fewest. Sessions competing for the pool thus converge on equal shares of it (its size divided
  by the number of sessions that hold or want buffers), and a session above its share never
  gets a buffer while one below it waits. Free buffers are taken at once (up to the cap): a
  buffer is only free while no session that may take it waits.
"""

from __future__ import annotations

import asyncio
import mmap
from collections import deque

from .. import _accel

# A deliberate fault of a mutants build (``_accel.fault_on``); always False in a release build
_LEASE_SHARED = _accel.fault_on("bufpool_lease_shared")


class MmapLease:
    """One pooled buffer, ``view`` of it; ``release()`` hands it back."""

    __slots__ = ("_mem", "_pool", "owner", "view")

    def __init__(self, pool: MmapPool, mem: mmap.mmap) -> None:
        self._pool = pool
        self._mem = mem
        self.owner: PoolShare | None = None  # the session's share holding it
        self.view = memoryview(mem)

    def release(self) -> None:
        self._pool._put(self)


class PoolShare:
    """One session's access to the pool: at most ``cap`` buffers, waits served fairly."""

    __slots__ = ("_pool", "_waiters", "cap", "held")

    def __init__(self, pool: MmapPool, cap: int) -> None:
        self._pool = pool
        self.cap = max(1, min(cap, pool.count))
        self.held = 0
        self._waiters: deque[asyncio.Future[MmapLease]] = deque()

    @property
    def size(self) -> int:
        return self._pool.size

    def try_acquire(self) -> MmapLease | None:
        if self.held >= self.cap or self._waiters:
            return None
        return self._pool._take(self)

    async def acquire(self) -> MmapLease:
        """A buffer, once one is free for this session; the wait is bounded by the session's
        commands in progress (each waits for one buffer at a time)."""
        lease = self.try_acquire()
        if lease is not None:
            return lease
        fut: asyncio.Future[MmapLease] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._pool._waiting[self] = None
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                fut.result().release()  # handed over just as we were cancelled
            raise
        finally:
            self._forget(fut)

    def close(self) -> None:
        """The session ended: no more waiting for buffers."""
        for fut in self._waiters:
            fut.cancel()
        self._waiters.clear()
        self._pool._waiting.pop(self, None)

    def _forget(self, fut: asyncio.Future[MmapLease]) -> None:
        try:
            self._waiters.remove(fut)
        except ValueError:
            pass
        if not self._waiters:
            self._pool._waiting.pop(self, None)

    def _next_waiter(self) -> asyncio.Future[MmapLease] | None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                return fut
        self._pool._waiting.pop(self, None)
        return None


class MmapPool:
    """``count`` anonymous mmaps of ``size`` bytes: page-aligned, allocated once, never freed."""

    def __init__(self, count: int, size: int) -> None:
        self.size = size
        self.count = count
        self._free: deque[MmapLease] = deque(
            MmapLease(self, mmap.mmap(-1, size)) for _ in range(count)
        )
        self._waiting: dict[PoolShare, None] = {}  # shares with a waiter

    @property
    def available(self) -> int:
        return len(self._free)

    def share(self, cap: int) -> PoolShare:
        """A session's access to the pool, holding at most ``cap`` buffers."""
        return PoolShare(self, cap)

    def _take(self, share: PoolShare) -> MmapLease | None:
        if not self._free:
            return None
        # the most recently released: still warm in the cache
        lease = self._free[-1] if _LEASE_SHARED else self._free.pop()
        lease.owner = share
        share.held += 1
        return lease

    def _put(self, lease: MmapLease) -> None:
        owner = lease.owner
        if owner is not None:
            owner.held -= 1
            lease.owner = None
        if not self._waiting:  # the common case, per send: nobody waits
            self._free.append(lease)
            return
        while True:
            # The waiting session with the fewest buffers (that may hold one more) gets it.
            best = min(
                (s for s in self._waiting if s.held < s.cap), key=lambda s: s.held, default=None
            )
            if best is None:
                self._free.append(lease)
                return
            fut = best._next_waiter()
            if fut is not None:
                lease.owner = best
                best.held += 1
                fut.set_result(lease)
                return
