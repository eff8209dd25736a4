"""Disk I/O that may wait for a device, done off the event loop.

A store that may block (``Store.may_block``: an image file, a block device, a qcow2 image) has
a small thread pool of its own. READs the page cache cannot serve at once, WRITE data, the
syncs of SYNCHRONIZE CACHE and FUA, and the commands that work on the medium (UNMAP, WRITE
SAME, COMPARE AND WRITE, ...) run there, so a slow or stuck device holds up only the commands
of its own LUN, never the event loop that serves every session.

A job cannot be stopped once its thread has it. Two rules follow:
- a READ's buffer goes back to its pool only when the thread is done writing into it, even
  if the task waiting for it was cancelled (``read_into``);
- a job that changes the medium is counted until it finished (``changes``): an aborted
  command's write must land before the abort is answered, or it could overwrite what the
  initiator writes next to the same blocks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from ..wire.bufpool import MmapLease
from .store import Store

T = TypeVar("T")


def run(
    store: Store, job: Callable[[], T], *, changes: bool = False, also: Iterable[Store] = ()
) -> asyncio.Future[T]:
    """``job()`` in one of ``store``'s threads; the future resolves on the running loop with
    what it returned or raised. ``changes``: the job writes to the medium (see ``changes``);
    ``also``: other stores whose media it writes too (a copy between LUNs), where it counts as
    well. Cancelling the future does not stop the job."""
    future = asyncio.wrap_future(store.disk.threads().submit(job))
    if changes:
        for changed in (store, *also):
            pending = changed.disk.changing
            pending.add(future)
            future.add_done_callback(pending.discard)
    return future


def changes(stores: list[Store]) -> list[asyncio.Future[Any]]:
    """The jobs changing these stores' media that have not finished yet."""
    return [f for store in stores for f in store.disk.changing]


async def read_into(store: Store, offset: int, view: memoryview, lease: MmapLease) -> None:
    """``store.read_into(offset, view)`` in one of the store's threads; ``view`` lies in
    ``lease``. Raises what the read raised. If the awaiting task is cancelled, ``lease`` is
    released here, when the thread no longer uses it; otherwise it stays the caller's."""
    loop = asyncio.get_running_loop()
    job = store.disk.threads().submit(store.read_into, offset, view)
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
