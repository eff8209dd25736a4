"""Comparing data with what the medium holds, to the first differing byte: what COMPARE AND
WRITE, WRITE AND VERIFY / VERIFY with BYTCHK and VERIFY BYTCHK=3 report in a miscompare."""

from __future__ import annotations

from .store import Store


def first_difference(
    current: bytes | bytearray | memoryview, expected: bytes | memoryview
) -> int | None:
    """The offset of the first byte where ``current`` and ``expected`` (of one length) differ,
    or None when they are equal."""
    if memoryview(current) == expected:
        return None
    return next(i for i in range(len(expected)) if current[i] != expected[i])


def compare_with_medium(store: Store, offset: int, expected: bytes | memoryview) -> int | None:
    """``first_difference`` between the medium's bytes at ``offset`` and ``expected``."""
    current = bytearray(len(expected))
    store.read_into(offset, memoryview(current))
    return first_difference(current, expected)
