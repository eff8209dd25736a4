"""Commands that change the medium according to what it holds: COMPARE AND WRITE (SBC-3 5.2,
the atomic test-and-set clusters lock with, VMware's ATS) and ORWRITE (5.9, data ORed into the
blocks).

Both read, decide and write while holding the LUN's ``media_lock``, which every other change to
the medium also takes: the compare and the write are one step for every other session, whether
writes run on the event loop (memory LUNs) or in the store's threads (``diskio``).
COMPARE AND WRITE runs once its Data-Out is complete; ORWRITE, which may be as long as a WRITE,
streams: each Data-Out PDU is ORed in as one step.
"""

from __future__ import annotations

import struct

from ..storage.first_difference import compare_with_medium
from ..storage.store import BLOCK_SIZE
from .commands import CommandSet, Family, Handler, ParameterCommand
from .nexus import Nexus
from .provisioning import MAX_COMPARE_AND_WRITE_BLOCKS, refuse_read_only
from .sense import (
    ILLEGAL_REQUEST,
    INVALID_FIELD_IN_CDB,
    MISCOMPARE,
    MISCOMPARE_DURING_VERIFY,
    CheckCondition,
)
from .unit import LogicalUnit

COMPARE_AND_WRITE = 0x89


def _caw_fields(cdb: bytes) -> tuple[int, int, bool]:
    """(LBA, blocks, FUA) of COMPARE AND WRITE; checks the CDB."""
    if cdb[1] & 0xE0:  # WRPROTECT without protection information
        raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)
    (lba,) = struct.unpack_from(">Q", cdb, 2)
    blocks = cdb[13]
    if blocks > MAX_COMPARE_AND_WRITE_BLOCKS:
        raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)
    return lba, blocks, bool(cdb[1] & 0x08)


def _caw_length(cdb: bytes) -> int:
    _, blocks, _ = _caw_fields(cdb)
    return 2 * blocks * BLOCK_SIZE  # the verify instance, then the write instance


def _caw_check(lu: LogicalUnit, cdb: bytes) -> None:
    lba, blocks, _ = _caw_fields(cdb)
    lu.check_range(lba, blocks)
    refuse_read_only(lu, cdb)


def compare_and_write(
    commands: CommandSet, lu: LogicalUnit, cdb: bytes, data: bytes, nexus: Nexus
) -> None:
    """Write the second half of ``data`` if the blocks hold the first half; else MISCOMPARE
    with the offset of the first differing byte, and the blocks are left alone."""
    lba, blocks, fua = _caw_fields(cdb)
    if not blocks:
        return
    store = lu.store
    length = blocks * store.block_size
    expected, new = memoryview(data)[:length], memoryview(data)[length:]
    with lu.media_lock:
        first = compare_with_medium(store, lba * store.block_size, expected)
        if first is not None:
            raise CheckCondition(MISCOMPARE, MISCOMPARE_DURING_VERIFY, first)
        store.write(lba * store.block_size, new)
    if fua:
        store.flush()


def or_write(lu: LogicalUnit, offset: int, data: memoryview | bytes) -> None:
    """ORWRITE's data arriving for [offset, offset+len(data)): ORed into what is there."""
    store = lu.store
    current = bytearray(len(data))
    with lu.media_lock:
        store.read_into(offset, memoryview(current))
        merged = int.from_bytes(current, "little") | int.from_bytes(data, "little")
        store.write(offset, merged.to_bytes(len(data), "little"))


COMMANDS: dict[int, Handler] = {}
PARAMETER_COMMANDS = {
    COMPARE_AND_WRITE: ParameterCommand(
        _caw_length, compare_and_write, check=_caw_check, exact=True, medium=True
    )
}
#: What this family adds to the command table (``families``).
FAMILY = Family(commands=COMMANDS, parameters=PARAMETER_COMMANDS)
