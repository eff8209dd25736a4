"""Opening a LUN's store from its command-line form, and sizes as they are written."""

from __future__ import annotations

import re

from .file import FileStore
from .memory import MemoryStore
from .null import NullStore
from .qcow2 import QCOW2_MAGIC, Qcow2Store
from .store import Store, StoreError

_SIZE_RE = re.compile(r"^(\d+)([KMGT]?)(i?B)?$", re.IGNORECASE)


def parse_size(text: str) -> int:
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise ValueError(f"bad size {text!r} (e.g. 512M, 4G)")
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(m.group(1)) * mult


def open_store(spec: str, readonly: bool = False, mapped: bool = False) -> Store:
    """Open a LUN from its command-line form: a path, ``mem:SIZE`` or ``null:SIZE``.
    qcow2 images are detected by their magic and are always read-only."""
    store: Store
    if spec.startswith(("mem:", "null:")):
        kind, _, size = spec.partition(":")
        store = MemoryStore(parse_size(size)) if kind == "mem" else NullStore(parse_size(size))
        store.readonly = readonly
        return store
    try:
        with open(spec, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise StoreError(f"cannot open LUN image {spec}: {e.strerror}") from e
    if magic == QCOW2_MAGIC:
        return Qcow2Store(spec)
    return FileStore(spec, readonly=readonly, mapped=mapped)
