"""VERIFY with BYTCHK=3 (SBC-4 5.34): one block from the initiator compared against every block
of a range. The range may be MAXIMUM TRANSFER LENGTH blocks of a store that blocks on reads (an
uncached block device), so the comparison runs in the store's threads (``diskio``), never on the
event loop, and reads the medium in bounded chunks."""

from __future__ import annotations

import asyncio
import functools

from ..storage import diskio
from ..storage.first_difference import compare_with_medium
from ..storage.store import Store

CHUNK = 1 << 20  # bytes read and compared at a time


def first_difference(store: Store, base: int, block: bytes, count: int) -> int | None:
    """The byte offset from ``base`` of the first difference between ``count`` copies of
    ``block`` and the medium there, or None when every block matches."""
    bs = len(block)
    per_chunk = max(1, CHUNK // bs)
    pattern = memoryview(block * min(per_chunk, count))
    done = 0
    while done < count:
        n = min(per_chunk, count - done)
        at = compare_with_medium(store, base + done * bs, pattern[: n * bs])
        if at is not None:
            return done * bs + at
        done += n
    return None


def compare_off_loop(
    store: Store, base: int, block: bytes, count: int
) -> asyncio.Future[int | None]:
    """``first_difference`` in the store's threads; the future resolves on the running loop."""
    return diskio.run(store, functools.partial(first_difference, store, base, block, count))
