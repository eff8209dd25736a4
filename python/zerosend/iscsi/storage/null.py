"""Null LUNs: read zeros, discard writes (to measure the target itself)."""

from __future__ import annotations

from .store import BLOCK_SIZE, Store, _zero_views


class NullStore(Store):
    """Reads zeros, discards writes: measures the target itself."""

    kind = "null"
    can_discard = True

    def __init__(self, size: int) -> None:
        super().__init__(f"null:{size}")
        self.size = size - size % BLOCK_SIZE

    def segments(self, offset: int, length: int) -> list[memoryview]:
        return _zero_views(length)

    def read_into(self, offset: int, view: memoryview) -> None:
        view[:] = bytes(len(view))

    def write(self, offset: int, data: memoryview | bytes) -> None:
        pass

    def discard(self, offset: int, length: int) -> None:
        pass

    def allocated(self, offset: int, length: int) -> list[tuple[int, int]]:
        return []
