"""`BufferPool`: page-aligned buffers that io_uring sends as registered (fixed) buffers."""

from __future__ import annotations

import asyncio
import warnings
from collections import deque
from collections.abc import Generator
from types import TracebackType
from typing import Any

from . import _native
from ._native import PoolBuffer
from ._socket import _driver_for


class BufferPool:
    """``count`` writable buffers of ``size`` bytes, page-aligned and locked in memory.

    ``buf = await pool.acquire()`` waits while all are busy; fill it through
    ``memoryview(buf)`` and send it (or a slice) with ``send_zc``. On the io_uring backend such
    sends use ``IORING_RECVSEND_FIXED_BUF`` (counted in ``stats["fixed_buffer_sends"]``); the
    other backends send them like any buffer. ``buf.release()`` (or leaving
    ``async with pool.acquire() as buf``) returns it, but never while the kernel still holds
    it: a buffer with a send in flight goes back when that send is released.

    Raises ``OSError`` naming ``RLIMIT_MEMLOCK`` if the memory cannot be locked.
    ``hugepages=True`` uses 2 MiB pages when the system has them reserved and otherwise warns
    and uses normal pages.
    """

    def __init__(self, count: int, size: int, *, hugepages: bool = False) -> None:
        for name, value in (("count", count), ("size", size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BufferPool {name} must be a positive int, not {value!r}")
        self._memory = _native.PoolMemory(count, size, hugepages)
        if hugepages and self._memory.hugepages_fallback:
            warnings.warn(self._memory.hugepages_fallback, RuntimeWarning, stacklevel=2)
        self._free: deque[int] = deque(range(count))
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def count(self) -> int:
        """Number of buffers in the pool."""
        return self._memory.count

    @property
    def size(self) -> int:
        """Bytes per buffer."""
        return self._memory.size

    @property
    def hugepages(self) -> bool:
        """True if the pool really lives in huge pages."""
        return self._memory.hugepages

    @property
    def available(self) -> int:
        """Buffers free to acquire right now."""
        return len(self._free)

    def acquire(self) -> _Acquire:
        """A free buffer: ``await pool.acquire()`` or ``async with pool.acquire() as buf``."""
        return _Acquire(self)

    async def _take(self) -> PoolBuffer:
        loop = asyncio.get_running_loop()
        # Registration is per event loop (per io_uring); repeated calls are no-ops.
        _driver_for(loop).register_pool(self._memory)
        while not self._free:
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # pass the wake-up on, it was meant for someone
                elif waiter in self._waiters:
                    self._waiters.remove(waiter)
                raise
        return self._memory.buffer(self._free.popleft(), self._give_back)

    def _give_back(self, index: int) -> None:
        self._free.append(index)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def __repr__(self) -> str:
        return f"<zerosend.BufferPool {self.available}/{self.count} free, {self.size} bytes each>"


class _Acquire:
    """Awaitable, and an async context manager that releases the buffer on exit."""

    __slots__ = ("_buffer", "_pool")

    def __init__(self, pool: BufferPool) -> None:
        self._pool = pool
        self._buffer: PoolBuffer | None = None

    def __await__(self) -> Generator[Any, None, PoolBuffer]:
        return self._pool._take().__await__()

    async def __aenter__(self) -> PoolBuffer:
        self._buffer = await self._pool._take()
        return self._buffer

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._buffer is not None:
            self._buffer.release()
            self._buffer = None
