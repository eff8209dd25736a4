"""Backing stores behind LUNs: raw image files and block devices, compressed qcow2 images
(read-only, decompressed in user space), and memory / null LUNs for benchmarks.

A store either fills a caller's buffer (``read_into``: raw files, read into pooled buffers) or
lends views of memory it owns (``borrow``: memory LUNs, decompressed clusters, read-only mapped
images), which the target sends without any copy. Lent memory never changes while the loan
lasts (until the send carrying it was released by the kernel): decompressed clusters are
immutable ``bytes``, a memory LUN copies a lent chunk before a WRITE changes it, and a mapped
image that can be written lends nothing (its pages are the page cache, which a WRITE changes
in place), so its READs are read into pooled buffers like a plain file's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import os
import threading
from typing import Any

BLOCK_SIZE = 512
#: Disk threads of each store that may block (``diskio``).
THREADS_PER_STORE = 4
_ZERO = memoryview(bytes(1 << 20))
log = logging.getLogger("zerosend.iscsi")


class StoreError(Exception):
    """A backing store that cannot be opened or read; the message names the file and why."""


class Loan:
    """Views of a store's memory for one send; ``release()`` once the kernel let go of them."""

    __slots__ = ("views",)

    def __init__(self, views: list[memoryview]) -> None:
        self.views = views

    def release(self) -> None:
        pass


class DiskJobs:
    """A store's own disk threads, started with its first job, and the jobs changing its medium
    that have not finished yet (``diskio`` runs them)."""

    __slots__ = ("_name", "_threads", "changing")

    def __init__(self, name: str) -> None:
        self._name = name
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None
        self.changing: set[asyncio.Future[Any]] = set()

    def threads(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._threads is None:
            self._threads = concurrent.futures.ThreadPoolExecutor(
                THREADS_PER_STORE, thread_name_prefix=f"disk {self._name}"
            )
        return self._threads


class Store:
    """Base class: a byte-addressed medium of ``size`` bytes."""

    size: int = 0
    block_size: int = BLOCK_SIZE
    readonly: bool = False
    kind: str = "store"
    can_discard: bool = False  # ``discard`` deallocates (UNMAP)
    # Reads, writes and syncs may wait for a device: they run in the store's threads
    # (``diskio``) unless the page cache takes them at once (``read_cached``,
    # ``writes_on_loop``); ``borrow`` and those two are called on the event loop only.
    may_block: bool = False

    def __init__(self, name: str) -> None:
        self.name = name
        self.disk = DiskJobs(name)

    @property
    def blocks(self) -> int:
        return self.size // self.block_size

    def segments(self, offset: int, length: int) -> list[memoryview] | None:
        """Views covering [offset, offset+length) if the data already lives in memory (views
        of memory a WRITE may change: to send them, ``borrow``)."""
        return None

    def borrow(self, offset: int, length: int) -> Loan | None:
        """[offset, offset+length) as memory that stays unchanged until the loan is released,
        or None: then ``read_into`` a buffer of the caller's."""
        views = self.segments(offset, length)
        return None if views is None else Loan(views)

    def read_into(self, offset: int, view: memoryview) -> None:
        raise NotImplementedError

    def read_cached(self, offset: int, view: memoryview) -> bool:
        """Fill ``view`` if that cannot wait for a disk; False if it would (then ``read_into``
        it where waiting stops nobody)."""
        self.read_into(offset, view)
        return True

    def write(self, offset: int, data: memoryview | bytes) -> None:
        raise StoreError(f"{self.name}: read-only")

    def writes_on_loop(self) -> bool:
        """A write may be done on the event loop now: it lands in memory without waiting."""
        return not self.may_block

    def wrote_on_loop(self, seconds: float) -> None:
        """A write on the event loop took ``seconds``."""

    @property
    def write_cache(self) -> bool:
        """Writes are acknowledged before they reach stable storage (the caching page's WCE):
        only ``flush`` makes them durable, so initiators must send SYNCHRONIZE CACHE or FUA."""
        return False

    @property
    def unsynced(self) -> tuple[int, int] | None:
        """The byte span written since the last flush that covered it, or None."""
        return None

    def flush(self, offset: int = 0, length: int = 0) -> None:
        """Make the writes to [offset, offset+length) durable (``length`` 0: to the end)."""

    def close(self) -> None:
        pass

    @property
    def thin(self) -> bool:
        """The store can deallocate ranges (``discard``), which then read as zeros."""
        return self.can_discard and not self.readonly

    def discard(self, offset: int, length: int) -> None:
        """Deallocate [offset, offset+length): it reads as zeros afterwards."""
        raise StoreError(f"{self.name}: cannot deallocate ranges")

    def allocated(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The (offset, length) ranges inside [offset, offset+length) that hold data; the rest
        is deallocated and reads as zeros."""
        return [(offset, length)]


class _Descriptor:
    """An image's descriptor, closed only once no I/O in any thread uses it. Closed while a
    queued write still has to run, its number could go to the next file the target opens,
    which would get the LUN's data: so ``close()`` waits for the I/O under way (the last of it
    closes the descriptor) and I/O that starts after it fails. ``with descriptor as fd:``."""

    __slots__ = ("_closing", "_lock", "_users", "fd", "name")

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        self._lock = threading.Lock()
        self._users = 0
        self._closing = False

    def __enter__(self) -> int:
        with self._lock:
            if self._closing:
                raise OSError(errno.ENODEV, f"{self.name}: closed (the LUN was removed)")
            self._users += 1
        return self.fd

    def __exit__(self, *_: object) -> None:
        with self._lock:
            self._users -= 1
            last = self._closing and not self._users
        if last:
            os.close(self.fd)

    def close(self) -> None:
        with self._lock:
            if self._closing:
                return
            self._closing = True
            now = not self._users
        if now:
            os.close(self.fd)


def _zero_views(length: int) -> list[memoryview]:
    out = []
    while length > 0:
        n = min(length, len(_ZERO))
        out.append(_ZERO[:n])
        length -= n
    return out
