"""Thin provisioning (SBC-3 4.7): UNMAP, WRITE SAME(10/16) with and without UNMAP, GET LBA
STATUS, and the VPD pages that advertise them (Block Limits B0, Logical Block Provisioning B2).

A LUN is thin when its store can deallocate ranges (``Store.thin``: writable image files punch
holes, memory LUNs zero the range). Deallocated blocks read as zeros (LBPRZ), so WRITE SAME with
the UNMAP bit deallocates only when the block it repeats is all zeros; any other pattern is
written.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Awaitable

from ..storage import diskio
from ..storage.store import BLOCK_SIZE, Store
from .commands import MAX_PARAMETER_LIST, CommandSet, Family, Handler, ParameterCommand
from .nexus import Nexus
from .sense import (
    DATA_PROTECT,
    ILLEGAL_REQUEST,
    INVALID_FIELD_IN_CDB,
    INVALID_FIELD_IN_PARAMS,
    LBA_OUT_OF_RANGE,
    PARAMETER_LIST_LENGTH_ERROR,
    WRITE_PROTECTED,
    CheckCondition,
)
from .unit import MAX_TRANSFER_BLOCKS, LogicalUnit

UNMAP = 0x42
WRITE_SAME10, WRITE_SAME16 = 0x41, 0x93
GET_LBA_STATUS = 0x12  # service action of SERVICE ACTION IN(16)

#: Limits advertised in the Block Limits VPD page and enforced here.
MAX_UNMAP_LBA_COUNT = 1 << 20  # blocks one UNMAP may deallocate (512 MiB)
MAX_UNMAP_DESCRIPTORS = 256
OPTIMAL_UNMAP_GRANULARITY = 8  # 4 KiB: the file system block a hole is made of
MAX_WRITE_SAME_BLOCKS = MAX_TRANSFER_BLOCKS  # what one WRITE of the same size may move
MAX_COMPARE_AND_WRITE_BLOCKS = 255  # (the field is one byte)
MAX_ATOMIC_TRANSFER_BLOCKS = MAX_PARAMETER_LIST // BLOCK_SIZE  # collected whole: 1 MiB
#: GET LBA STATUS looks this far ahead for the extents it reports.
_STATUS_WINDOW_BLOCKS = 1 << 21
_CHUNK = 1 << 20
_MAPPED, _DEALLOCATED = 0, 1


def refuse_read_only(lu: LogicalUnit, cdb: bytes) -> None:
    """A command that changes the medium, on a read-only LUN."""
    if lu.readonly:
        raise CheckCondition(DATA_PROTECT, WRITE_PROTECTED)


# -- UNMAP


def _unmap_length(cdb: bytes) -> int:
    if cdb[1] & 0x01:  # ANCHOR: anchored blocks are not supported (ANC_SUP is clear)
        raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)
    return int.from_bytes(cdb[7:9], "big")


def unmap(commands: CommandSet, lu: LogicalUnit, cdb: bytes, params: bytes, nexus: Nexus) -> None:
    """Deallocate the ranges of the block descriptors; all are checked before any is done."""
    if not params:  # a parameter list length of zero is not an error: nothing to do
        return
    if len(params) < 8:
        raise CheckCondition(ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
    described = int.from_bytes(params[2:4], "big")
    count = min(described, len(params) - 8) // 16
    if count > MAX_UNMAP_DESCRIPTORS:
        raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_PARAMS)
    ranges = [struct.unpack_from(">QI", params, 8 + 16 * i) for i in range(count)]
    if sum(blocks for _, blocks in ranges) > MAX_UNMAP_LBA_COUNT:
        raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_PARAMS)
    for lba, blocks in ranges:
        lu.check_range(lba, blocks)
    bs = lu.store.block_size
    with lu.media_lock:
        for lba, blocks in ranges:
            if blocks:
                lu.store.discard(lba * bs, blocks * bs)


# -- WRITE SAME


def _write_same_fields(cdb: bytes) -> tuple[int, int, bool, bool]:
    """(LBA, blocks, UNMAP bit, NDOB bit) of WRITE SAME(10/16); checks the flag bits."""
    flags = cdb[1]
    if cdb[0] == WRITE_SAME10:
        lba, blocks = struct.unpack_from(">IxH", cdb, 2)
        ndob = False
    else:
        lba, blocks = struct.unpack_from(">QI", cdb, 2)
        ndob = bool(flags & 0x01)
    unmap_bit = bool(flags & 0x08)
    # WRPROTECT without protection information; ANCHOR (ANC_SUP is clear, and never without
    # UNMAP); NDOB asks for zeros, which only the UNMAP form may leave deallocated.
    if flags & 0xE0 or flags & 0x10:
        raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)
    return lba, blocks, unmap_bit, ndob


def _write_same_length(cdb: bytes) -> int:
    _, _, _, ndob = _write_same_fields(cdb)
    return 0 if ndob else BLOCK_SIZE


def _write_same_range(lu: LogicalUnit, cdb: bytes) -> tuple[int, int]:
    """(LBA, blocks) a WRITE SAME covers (NUMBER OF LOGICAL BLOCKS 0: up to the last block)."""
    lba, blocks, _, _ = _write_same_fields(cdb)
    if lba > lu.store.blocks:
        raise CheckCondition(ILLEGAL_REQUEST, LBA_OUT_OF_RANGE)
    if blocks == 0:
        blocks = lu.store.blocks - lba
    lu.check_range(lba, blocks)
    if blocks > MAX_WRITE_SAME_BLOCKS:
        raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)
    return lba, blocks


def _write_same_check(lu: LogicalUnit, cdb: bytes) -> None:
    _write_same_range(lu, cdb)
    refuse_read_only(lu, cdb)


def write_same(
    commands: CommandSet, lu: LogicalUnit, cdb: bytes, params: bytes, nexus: Nexus
) -> None:
    """Write one block over the range, or deallocate the range when UNMAP is set and the block
    is zeros."""
    _, _, unmap_bit, ndob = _write_same_fields(cdb)
    lba, blocks = _write_same_range(lu, cdb)
    store = lu.store
    bs = store.block_size
    block = bytes(bs) if ndob else params
    if not blocks:
        return
    offset, length = lba * bs, blocks * bs
    with lu.media_lock:
        if (unmap_bit or ndob) and store.thin and not any(block):
            store.discard(offset, length)
            return
        pattern = block * (min(length, _CHUNK) // bs)
        for at in range(offset, offset + length, len(pattern)):
            store.write(at, pattern[: min(len(pattern), offset + length - at)])


# -- GET LBA STATUS


def get_lba_status(commands: CommandSet, lu: LogicalUnit, cdb: bytes) -> bytes | Awaitable[bytes]:
    """The provisioning status of the extents from the starting LBA on: mapped, or deallocated
    (a hole in the image). The walk asks the file system (``lseek``), which may wait for the
    device: for a store that may block it runs in the store's threads, and the command
    completes later (a task in progress until then)."""
    lba, alloc = struct.unpack_from(">QI", cdb, 2)
    store = lu.store
    if lba >= store.blocks:
        raise CheckCondition(ILLEGAL_REQUEST, LBA_OUT_OF_RANGE)
    if store.may_block:
        return diskio.run(store, functools.partial(_lba_status, store, lba, alloc))
    return _lba_status(store, lba, alloc)


def _lba_status(store: Store, lba: int, alloc: int) -> bytes:
    bs = store.block_size
    end = min(store.blocks, lba + _STATUS_WINDOW_BLOCKS)
    most = max(1, (alloc - 8) // 16)
    extents: list[list[int]] = []  # [first LBA, blocks, status]

    def extent(upto: int, status: int) -> None:
        if extents and extents[-1][2] == status:
            extents[-1][1] += upto - at
        else:
            extents.append([at, upto - at, status])

    at = lba
    for data, length in store.allocated(lba * bs, (end - lba) * bs):
        first = max(data // bs, at)
        last = -(-(data + length) // bs)  # a block holding any data is mapped
        if last <= at:
            continue
        if first > at:
            extent(first, _DEALLOCATED)
            at = first
        extent(last, _MAPPED)
        at = last
        if len(extents) > most:
            break
    if at < end:
        extent(end, _DEALLOCATED)
    body = b"".join(struct.pack(">QIB3x", *e) for e in extents[:most])
    return (struct.pack(">I4x", len(body) + 4) + body)[:alloc]


# -- VPD pages


def block_limits(commands: CommandSet, lu: LogicalUnit) -> bytes:
    """Block Limits (B0): transfer, COMPARE AND WRITE, UNMAP, WRITE SAME and WRITE ATOMIC
    limits."""
    body = bytearray(0x3C)
    body[1] = MAX_COMPARE_AND_WRITE_BLOCKS
    struct.pack_into(">H", body, 2, 1)  # optimal transfer length granularity: 1 block
    struct.pack_into(">I", body, 4, MAX_TRANSFER_BLOCKS)  # maximum transfer length
    struct.pack_into(">I", body, 8, 256)  # optimal transfer length (128 KiB)
    if lu.store.thin:
        struct.pack_into(">II", body, 16, MAX_UNMAP_LBA_COUNT, MAX_UNMAP_DESCRIPTORS)
        struct.pack_into(">I", body, 24, OPTIMAL_UNMAP_GRANULARITY)
    struct.pack_into(">Q", body, 32, MAX_WRITE_SAME_BLOCKS)
    # WRITE ATOMIC: no alignment or granularity asked for, no atomic boundaries
    struct.pack_into(">I", body, 40, MAX_ATOMIC_TRANSFER_BLOCKS)
    return bytes(body)


def logical_block_provisioning(commands: CommandSet, lu: LogicalUnit) -> bytes:
    """Logical Block Provisioning (B2): UNMAP and WRITE SAME(16/10) with UNMAP, deallocated
    blocks read as zeros, thin provisioned."""
    if not lu.store.thin:
        return bytes(4)  # fully provisioned
    # LBPU | LBPWS | LBPWS10 | LBPRZ; provisioning type 2: thin
    return bytes((0x00, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0x00))


COMMANDS: dict[int, Handler] = {}
PARAMETER_COMMANDS = {
    UNMAP: ParameterCommand(_unmap_length, unmap, check=refuse_read_only, medium=True),
    **{
        op: ParameterCommand(
            _write_same_length, write_same, check=_write_same_check, exact=True, medium=True
        )
        for op in (WRITE_SAME10, WRITE_SAME16)
    },
}
SERVICE_ACTIONS_IN = {GET_LBA_STATUS: get_lba_status}
VPD_PAGES = {0xB0: block_limits, 0xB2: logical_block_provisioning}
#: What this family adds to the command table (``families``).
FAMILY = Family(
    commands=COMMANDS,
    parameters=PARAMETER_COMMANDS,
    service_actions_in=SERVICE_ACTIONS_IN,
    vpd=VPD_PAGES,
)
