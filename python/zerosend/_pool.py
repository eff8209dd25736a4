"""`BufferPool`: page-aligned buffers that io_uring sends as registered (fixed) buffers."""

from __future__ import annotations

import warnings
import weakref
from collections import deque
from collections.abc import Generator
from types import TracebackType
from typing import Any

from . import _native
from ._native import PoolBuffer
from ._socket import _loop_and_driver


class BufferPool:
    """``count`` writable buffers of ``size`` bytes, page-aligned and locked in memory; usable
    under asyncio (and uvloop) and under trio (directly or through anyio).

    ``buf = await pool.acquire()`` waits while all are busy; fill it through
    ``memoryview(buf)`` and send it (or a slice) with ``send_zc``. On the io_uring backend such
    sends use ``IORING_RECVSEND_FIXED_BUF`` (counted in ``stats["fixed_buffer_sends"]``); the
    other backends send them like any buffer. ``buf.release()`` (or leaving
    ``async with pool.acquire() as buf``) returns it, but never while the kernel still holds
    it: a buffer with a send in flight goes back when that send is released.

    ``close()`` (or leaving ``async with BufferPool(...) as pool``) gives the pool's io_uring
    registration back once no send from it is queued or in the kernel (sends submitted before
    still go out whole, from their registered slot) and its locked memory as soon as no buffer
    of it is held or in flight; a pool dropped without ``close()`` does the same when it is
    garbage-collected. Up to 64 pools can be in use with one event loop at a time; there is no
    limit on how many are created and closed over time.

    Raises ``OSError`` naming ``RLIMIT_MEMLOCK`` if the memory cannot be locked.
    ``hugepages=True`` uses 2 MiB pages when the system has them reserved and otherwise warns
    and uses normal pages.
    """

    def __init__(self, count: int, size: int, *, hugepages: bool = False) -> None:
        for name, value in (("count", count), ("size", size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BufferPool {name} must be a positive int, not {value!r}")
        memory = _native.PoolMemory(count, size, hugepages)
        if hugepages and memory.hugepages_fallback:
            warnings.warn(memory.hugepages_fallback, RuntimeWarning, stacklevel=2)
        self._count, self._size, self._hugepages = memory.count, memory.size, memory.hugepages
        # Dropped by close(): acquired buffers hold the memory themselves, so it is unmapped
        # once the last of them is gone.
        self._memory: _native.PoolMemory | None = memory
        self._free: deque[int] = deque(range(count))
        # asyncio futures, or zerosend's trio futures under trio.
        self._waiters: deque[Any] = deque()
        # The event loops' drivers that registered the memory, to unregister it on close.
        self._drivers: weakref.WeakSet[_native.Driver] = weakref.WeakSet()
        self._closed = False

    @property
    def count(self) -> int:
        """Number of buffers in the pool."""
        return self._count

    @property
    def size(self) -> int:
        """Bytes per buffer."""
        return self._size

    @property
    def hugepages(self) -> bool:
        """True if the pool really lives in huge pages."""
        return self._hugepages

    @property
    def available(self) -> int:
        """Buffers free to acquire right now."""
        return len(self._free)

    def acquire(self) -> _Acquire:
        """A free buffer: ``await pool.acquire()`` or ``async with pool.acquire() as buf``."""
        return _Acquire(self)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Stop handing out buffers and give the pool's memory back.

        New sends stop using the io_uring registration at once; the registration itself goes
        after the last send submitted from the pool (queued or in the kernel) finished, so those
        sends keep their pages and their slot. The locked memory is unmapped once no acquired
        buffer of the pool remains (each goes when it is released and its sends were released
        by the kernel). Waiting ``acquire()`` calls raise ``ValueError``. Calling it again does
        nothing.
        """
        if self._closed:
            return
        self._closed = True
        memory, self._memory = self._memory, None
        for driver in list(self._drivers):
            if memory is not None and not driver.forked:  # a fork child leaves the parent's
                driver.unregister_pool(memory)
        self._drivers.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ValueError("the buffer pool was closed"))

    async def __aenter__(self) -> BufferPool:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()

    async def _take(self) -> PoolBuffer:
        memory = self._memory
        if memory is None:
            raise ValueError("the buffer pool is closed; create a new one")
        # The running asyncio loop or trio run; registration is per event loop (per io_uring),
        # repeated calls are no-ops.
        loop, driver = _loop_and_driver()
        driver.register_pool(memory)
        self._drivers.add(driver)
        while not self._free:
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:  # cancelled (asyncio's or trio's way)
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # pass the wake-up on, it was meant for someone
                elif waiter in self._waiters:
                    self._waiters.remove(waiter)
                raise
            if self._closed:
                raise ValueError("the buffer pool was closed")
        return memory.buffer(self._free.popleft(), self._give_back)

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
        state = " closed" if self._closed else ""
        return (
            f"<zerosend.BufferPool {self.available}/{self.count} free, "
            f"{self.size} bytes each{state}>"
        )


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
