"""The target's native pieces, and their pure-Python stand-ins: the one module of the target that
imports ``zerosend.iscsi._native`` (the target's part of the compiled extension, crate
``zerosend-iscsi``). Where the extension is missing (the pure-Python install), ``crc32c`` is
computed here in Python, ``NativeReadPath`` is None (the READ path then runs its Python inner
loop, ``session.readloop``) and no deliberate fault is ever on.

The core (``zerosend``) knows nothing of iSCSI: it neither lists nor stands in for these.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

try:
    from . import _native as _NATIVE
except ImportError:  # no extension: the pure-Python install
    _NATIVE = None  # type: ignore[assignment]

#: What one run of the READ path's inner loop did, native or Python: a plain tuple of
#: ``RUN_FIELDS`` (see ``session.readloop`` for what each field means).
ReadRun = tuple[int, int, int, int, int, int, int, bool, int, int, int]
RUN_FIELDS = ("start", "pos", "expcmdsn", "statsn", "maxcmdsn", "commands", "nbytes", "large",
              "need", "send_from", "send_len")  # fmt: skip

#: The READ path's inner loop in Rust, or None where the extension is missing.
NativeReadPath: type[_NATIVE.IscsiReadPath] | None = (
    None if _NATIVE is None else _NATIVE.IscsiReadPath
)


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_CRC32C = _crc32c_table()


def python_crc32c(data: Any, value: int = 0) -> int:
    """CRC32C (Castagnoli) of a bytes-like object, continuing from ``value``, in Python."""
    table = _CRC32C
    crc = value ^ 0xFFFFFFFF
    with memoryview(data) as view:
        for byte in view.cast("B") if view.format != "B" else view:
            crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


#: CRC32C (Castagnoli) of a bytes-like object, continuing from ``value`` (0 to start).
crc32c: Callable[..., int] = python_crc32c if _NATIVE is None else _NATIVE.crc32c


def _chosen_fault() -> str | None:
    if not os.environ.get("ZEROSEND_MUTANT"):
        return None
    helper = getattr(_NATIVE, "_mutant", None)  # only a mutants build has it
    chosen = None if helper is None else helper()
    return None if chosen is None else str(chosen)


_FAULT = _chosen_fault()


def fault_on(name: str) -> bool:
    """True if ``name`` is the deliberate fault of this process (a ``mutants`` build of the
    extension run with ``ZEROSEND_MUTANT=name``; ``make test-mutants``); always False in a
    release build."""
    return _FAULT == name
