"""WRITE ATOMIC(16) (SBC-4 5.48): a write that other commands see whole or not at all. Its data
is collected whole, then written in one step under the LUN's ``media_lock`` (see
``compare_and_write``)."""

from __future__ import annotations

import struct

from ..storage.store import BLOCK_SIZE
from .commands import CommandSet, Family, Handler, ParameterCommand
from .nexus import Nexus
from .provisioning import MAX_ATOMIC_TRANSFER_BLOCKS, refuse_read_only
from .sense import ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, CheckCondition
from .unit import LogicalUnit

WRITE_ATOMIC16 = 0x9C


def _fields(cdb: bytes) -> tuple[int, int, bool]:
    """(LBA, blocks, FUA); WRPROTECT and an ATOMIC BOUNDARY (none is supported) are refused."""
    lba, boundary, blocks = struct.unpack_from(">QHH", cdb, 2)
    if cdb[1] & 0xE0 or boundary:
        raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)
    return lba, blocks, bool(cdb[1] & 0x08)


def _length(cdb: bytes) -> int:
    _, blocks, _ = _fields(cdb)
    return blocks * BLOCK_SIZE


def _check(lu: LogicalUnit, cdb: bytes) -> None:
    lba, blocks, _ = _fields(cdb)
    lu.check_range(lba, blocks)
    if blocks > MAX_ATOMIC_TRANSFER_BLOCKS:
        raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)
    refuse_read_only(lu, cdb)


def write_atomic(
    commands: CommandSet, lu: LogicalUnit, cdb: bytes, data: bytes, nexus: Nexus
) -> None:
    lba, blocks, fua = _fields(cdb)
    if not blocks:
        return
    with lu.media_lock:
        lu.store.write(lba * lu.store.block_size, data)
    if fua:
        lu.store.flush()


COMMANDS: dict[int, Handler] = {}
PARAMETER_COMMANDS = {
    WRITE_ATOMIC16: ParameterCommand(_length, write_atomic, check=_check, exact=True, medium=True)
}
#: What this family adds to the command table (``families``).
FAMILY = Family(commands=COMMANDS, parameters=PARAMETER_COMMANDS)
