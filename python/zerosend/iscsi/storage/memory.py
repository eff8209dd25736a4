"""Memory LUNs: lent straight out of anonymous memory, copy-on-write under a loan."""

from __future__ import annotations

import mmap
import threading

from .. import _accel
from .store import _ZERO, BLOCK_SIZE, Loan, Store

# Deliberate faults of a mutants build (``_accel.fault_on``); always False in a release build
_LOAN_WRITTEN_IN_PLACE = _accel.fault_on("loan_written_in_place")


class MemoryStore(Store):
    """An anonymous-memory LUN: reads are lent straight out of it (no read copy at all).

    The memory is split in chunks; a WRITE to a chunk that a send still holds goes to a fresh
    copy of the chunk (copy-on-write), which replaces it in the LUN, and the send keeps the old
    one, unchanged, until its release."""

    kind = "mem"
    can_discard = True
    CHUNK = 64 * 1024

    def __init__(self, size: int) -> None:
        super().__init__(f"mem:{size}")
        self.size = size - size % BLOCK_SIZE
        base = memoryview(mmap.mmap(-1, self.size))
        c = self.CHUNK
        self._chunks = [base[at : at + c] for at in range(0, self.size, c)]
        self._lent = [0] * len(self._chunks)  # loans of each chunk as it is now
        # Times each chunk was copied on write (a loan of an older copy no longer counts)
        self._copies = [0] * len(self._chunks)
        # Loans are made on the event loop, while a write may come from a thread (EXTENDED COPY,
        # or a write that found the medium busy): a chunk's loan count and its copy change
        # together.
        self._lock = threading.Lock()

    def _pieces(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(chunk, start, end) of every chunk [offset, offset+length) touches."""
        c = self.CHUNK
        out = []
        end = offset + length
        while offset < end:
            index, start = divmod(offset, c)
            n = min(c - start, end - offset)
            out.append((index, start, start + n))
            offset += n
        return out

    def segments(self, offset: int, length: int) -> list[memoryview]:
        return [self._chunks[i][a:b] for i, a, b in self._pieces(offset, length)]

    def borrow(self, offset: int, length: int) -> Loan:
        pieces = self._pieces(offset, length)
        with self._lock:
            for i, _, _ in pieces:
                self._lent[i] += 1
            return _ChunkLoan(self, [self._chunks[i][a:b] for i, a, b in pieces],
                              [(i, self._copies[i]) for i, _, _ in pieces])  # fmt: skip

    def _returned(self, chunks: list[tuple[int, int]]) -> None:
        with self._lock:
            for i, copy in chunks:
                if self._copies[i] == copy:
                    self._lent[i] -= 1

    def read_into(self, offset: int, view: memoryview) -> None:
        pos = 0
        for seg in self.segments(offset, len(view)):
            view[pos : pos + len(seg)] = seg
            pos += len(seg)

    def write(self, offset: int, data: memoryview | bytes) -> None:
        pos = 0
        for i, a, b in self._pieces(offset, len(data)):
            with self._lock:  # one chunk at a time: a loan waits for one chunk's copy at most
                if self._lent[i] and not _LOAN_WRITTEN_IN_PLACE:
                    self._chunks[i] = memoryview(bytearray(self._chunks[i]))
                    self._lent[i] = 0
                    self._copies[i] += 1
                self._chunks[i][a:b] = data[pos : pos + b - a]
            pos += b - a

    def discard(self, offset: int, length: int) -> None:
        # Zeroed through write(), so copy-on-write keeps the pages a send still holds.
        for at in range(offset, offset + length, len(_ZERO)):
            self.write(at, _ZERO[: min(len(_ZERO), offset + length - at)])


class _ChunkLoan(Loan):
    __slots__ = ("_chunks", "_store")

    def __init__(
        self, store: MemoryStore, views: list[memoryview], chunks: list[tuple[int, int]]
    ) -> None:
        super().__init__(views)
        self._store = store
        self._chunks = chunks

    def release(self) -> None:
        chunks, self._chunks = self._chunks, []  # at most once
        self._store._returned(chunks)
