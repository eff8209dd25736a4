"""Reads that may wait for a disk, done off the event loop.

A READ the page cache cannot serve at once (``Store.read_cached`` said no) is read by a thread
of a small pool of the store's own, so a slow or stuck device holds up only the READs of its
LUN, never the event loop that serves every session. A thread may still be writing into the
caller's buffer when the task that waits for it is cancelled (ABORT TASK, a session that
ends): the buffer then goes back to its pool only once the thread is done with it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import weakref

from .bufpool import MmapLease
from .stores import Store

THREADS_PER_STORE = 4

_pools: weakref.WeakKeyDictionary[Store, concurrent.futures.ThreadPoolExecutor] = (
    weakref.WeakKeyDictionary()
)


def _pool(store: Store) -> concurrent.futures.ThreadPoolExecutor:
    pool = _pools.get(store)
    if pool is None:
        pool = _pools[store] = concurrent.futures.ThreadPoolExecutor(
            THREADS_PER_STORE, thread_name_prefix=f"read {store.name}"
        )
    return pool


async def read_into(store: Store, offset: int, view: memoryview, lease: MmapLease) -> None:
    """``store.read_into(offset, view)`` in one of the store's threads; ``view`` lies in
    ``lease``. Raises what the read raised. If the awaiting task is cancelled, ``lease`` is
    released here, when the thread no longer uses it; otherwise it stays the caller's."""
    loop = asyncio.get_running_loop()
    job = _pool(store).submit(store.read_into, offset, view)
    try:
        await asyncio.wrap_future(job)
    except asyncio.CancelledError:

        def finished(_: concurrent.futures.Future[None]) -> None:
            try:
                loop.call_soon_threadsafe(lease.release)
            except RuntimeError:  # the loop is gone, and the pool with it
                pass

        job.add_done_callback(finished)  # at once if the job never started
        raise
