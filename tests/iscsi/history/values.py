"""Block values: every block written carries its own name (kind, writer, epoch, operation,
disk, LBA) repeated over its 512 bytes, so a block read back says which write it came from, and
a torn one shows; and the outcomes an operation can have."""

from __future__ import annotations

import struct

BLOCK = 512
MAGIC = b"ZSHB"
_HEADER = struct.Struct(">4sBBHIIQ8x")  # magic, kind, writer, epoch, seq, disk, lba
assert _HEADER.size == 32
KIND_INIT, KIND_WRITE, KIND_SAME = 0, 1, 2
SAME_LBA = (1 << 64) - 1  # WRITE SAME: one block, written to many LBAs

GOOD, CHECK_CONDITION, RESERVATION_CONFLICT = 0x00, 0x02, 0x18
# Outcomes that are not a SCSI status
UNKNOWN = "unknown"  # no status: aborted, connection lost, target killed
HUNG = "hung"  # no status and no connection end within the bound

# Value of a block: ("zero",), ("tag", kind, writer, epoch, seq, disk, lba), ("torn", hex)
Value = tuple[object, ...]
ZERO: Value = ("zero",)


def block(kind: int, writer: int, epoch: int, seq: int, disk: int, lba: int) -> bytes:
    return _HEADER.pack(MAGIC, kind, writer, epoch, seq, disk, lba) * (BLOCK // _HEADER.size)


def decode(data: bytes) -> Value:
    """The value one block holds."""
    if not any(data):
        return ZERO
    head = data[: _HEADER.size]
    magic, kind, writer, epoch, seq, disk, lba = _HEADER.unpack(head)
    if magic != MAGIC or data != head * (BLOCK // _HEADER.size):
        return ("torn", data[:48].hex())
    return ("tag", kind, writer, epoch, seq, disk, lba)


def show(v: Value) -> str:
    if v[0] == "tag":
        kind, writer, epoch, seq, disk, lba = v[1:]
        what = {KIND_INIT: "initial", KIND_WRITE: "write", KIND_SAME: "write-same"}[int(kind)]  # type: ignore[call-overload]
        at = "" if lba == SAME_LBA else f" lba {lba}"
        return f"{what} of ini{writer} e{epoch} #{seq} (disk {disk}{at})"
    return "zeros" if v == ZERO else f"torn block {v[1]}"
