"""EXTENDED COPY (LID1, SPC-4 6.4) between the target's own LUNs, and RECEIVE COPY RESULTS
(6.18: OPERATING PARAMETERS, COPY STATUS): the initiator names a source and a destination and
the target moves the blocks itself (VMware's XCOPY clone offload), without the data crossing
the network.

Copy targets are identification descriptors (type E4h) naming a LUN by the NAA designator of its
Device Identification VPD page; segments are block-to-block (type 02h). A copy runs to the end
within the command, so COPY STATUS always reports a finished copy.
"""

from __future__ import annotations

import functools
import struct
import threading
from collections.abc import Awaitable
from dataclasses import dataclass

from ..storage import diskio
from .commands import CommandSet, Family, Handler, ParameterCommand
from .nexus import Nexus
from .sense import (
    DATA_PROTECT,
    ILLEGAL_REQUEST,
    INVALID_FIELD_IN_CDB,
    INVALID_FIELD_IN_PARAMS,
    PARAMETER_LIST_LENGTH_ERROR,
    WRITE_PROTECTED,
    CheckCondition,
)
from .unit import MAX_TRANSFER_BLOCKS, LogicalUnit

EXTENDED_COPY = 0x83
RECEIVE_COPY_RESULTS = 0x84
EXTENDED_COPY_LID1 = 0x00  # service action
COPY_STATUS, OPERATING_PARAMETERS = 0x00, 0x03  # RECEIVE COPY RESULTS service actions

IDENTIFICATION_DESCRIPTOR = 0xE4
BLOCK_TO_BLOCK = 0x02
_TARGET_DESCRIPTOR_LEN = 32
_SEGMENT_DESCRIPTOR_LEN = 28
_HEADER_LEN = 16

#: Limits reported by OPERATING PARAMETERS and enforced here.
MAX_TARGET_DESCRIPTORS = 4
MAX_SEGMENT_DESCRIPTORS = 16
MAX_DESCRIPTOR_LIST_LENGTH = 1024
MAX_SEGMENT_BYTES = MAX_TRANSFER_BLOCKS * 512  # 8 MiB: what one segment holds in memory

COPY_ABORTED = 0x0A
TOO_MANY_TARGET_DESCRIPTORS = (0x26, 0x06)
UNSUPPORTED_TARGET_DESCRIPTOR_TYPE = (0x26, 0x07)
TOO_MANY_SEGMENT_DESCRIPTORS = (0x26, 0x08)
UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE = (0x26, 0x09)
UNREACHABLE_COPY_TARGET = (0x08, 0x04)
NO_ADDITIONAL_SENSE = (0x00, 0x00)

_COMPLETED, _COMPLETED_WITH_ERRORS = 0x01, 0x02
_HOLD = 0  # LIST ID USAGE 00b: the result is held for RECEIVE COPY RESULTS (10b, 11b: not)
_RESERVED_USAGE = 1
#: Results held per target; the oldest go first beyond this many (there is no hook for the end
#: of an I_T nexus here, which would discard them).
MAX_HELD_RESULTS = 1024


@dataclass
class CopyResult:
    """What COPY STATUS reports for one list identifier of one initiator port."""

    status: int
    segments: int
    nbytes: int


class CopyResults:
    """The copy results a command set (a target) holds, by (initiator port, list identifier)
    (``CommandSet.state``). Copies run in the LUNs' threads (``diskio``), several at once: their
    results change under ``lock``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.held: dict[tuple[str, int], CopyResult] = {}


def _parameter_length(cdb: bytes) -> int:
    if cdb[1] & 0x1F != EXTENDED_COPY_LID1:
        raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)
    return int.from_bytes(cdb[10:14], "big")


def _aborted(code: tuple[int, int]) -> CheckCondition:
    return CheckCondition(COPY_ABORTED, code)


def _copy_target(commands: CommandSet, descriptor: bytes, nexus: Nexus) -> LogicalUnit:
    """The LUN an identification target descriptor names."""
    if descriptor[1] & 0x1F:  # peripheral device type: block devices only
        raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_PARAMS)
    designator_type, length = descriptor[5] & 0x0F, descriptor[7]
    designator = bytes(descriptor[8 : 8 + min(length, 20)])
    if designator_type == 0x03:  # NAA
        for lu in commands.view(nexus).values():  # only LUNs its ACL shows, read-only as there
            if lu.naa == designator:
                (block_size,) = struct.unpack(">I", b"\0" + descriptor[29:32])
                if block_size != lu.store.block_size:
                    raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_PARAMS)
                return lu
    raise _aborted(UNREACHABLE_COPY_TARGET)


@dataclass(frozen=True)
class _Segment:
    source: LogicalUnit
    destination: LogicalUnit
    blocks: int
    source_lba: int
    destination_lba: int


def _parse(commands: CommandSet, params: bytes, nexus: Nexus) -> tuple[int, int, list[_Segment]]:
    """(list identifier, LIST ID USAGE, segments) of a parameter list; every descriptor is
    checked before any data moves."""
    if len(params) < _HEADER_LEN:
        raise CheckCondition(ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
    list_id, flags = params[0], params[1]
    (targets_len,) = struct.unpack_from(">H", params, 2)
    segments_len, inline_len = struct.unpack_from(">II", params, 8)
    if inline_len or (flags >> 3) & 0x03 == _RESERVED_USAGE:
        raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_PARAMS)
    if len(params) < _HEADER_LEN + targets_len + segments_len:
        raise CheckCondition(ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
    if targets_len + segments_len > MAX_DESCRIPTOR_LIST_LENGTH:
        raise CheckCondition(ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
    if targets_len % _TARGET_DESCRIPTOR_LEN:
        raise CheckCondition(ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
    if targets_len // _TARGET_DESCRIPTOR_LEN > MAX_TARGET_DESCRIPTORS:
        raise CheckCondition(ILLEGAL_REQUEST, TOO_MANY_TARGET_DESCRIPTORS)
    if segments_len // _SEGMENT_DESCRIPTOR_LEN > MAX_SEGMENT_DESCRIPTORS:
        raise CheckCondition(ILLEGAL_REQUEST, TOO_MANY_SEGMENT_DESCRIPTORS)
    targets: list[LogicalUnit] = []
    for at in range(_HEADER_LEN, _HEADER_LEN + targets_len, _TARGET_DESCRIPTOR_LEN):
        descriptor = params[at : at + _TARGET_DESCRIPTOR_LEN]
        if descriptor[0] != IDENTIFICATION_DESCRIPTOR:
            raise CheckCondition(ILLEGAL_REQUEST, UNSUPPORTED_TARGET_DESCRIPTOR_TYPE)
        targets.append(_copy_target(commands, descriptor, nexus))
    segments: list[_Segment] = []
    at, end = _HEADER_LEN + targets_len, _HEADER_LEN + targets_len + segments_len
    while at < end:
        if at + 4 > end:
            raise CheckCondition(ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
        kind, _, length = struct.unpack_from(">BBH", params, at)
        if kind != BLOCK_TO_BLOCK:
            raise CheckCondition(ILLEGAL_REQUEST, UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE)
        if length != _SEGMENT_DESCRIPTOR_LEN - 4 or at + _SEGMENT_DESCRIPTOR_LEN > end:
            raise CheckCondition(ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
        source, destination, blocks, source_lba, destination_lba = struct.unpack_from(
            ">HH2xHQQ", params, at + 4
        )
        if source >= len(targets) or destination >= len(targets):
            raise _aborted(UNREACHABLE_COPY_TARGET)
        src, dst = targets[source], targets[destination]
        if blocks * src.store.block_size > MAX_SEGMENT_BYTES:
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_PARAMS)
        for lu, lba in ((src, source_lba), (dst, destination_lba)):
            if lba + blocks > lu.store.blocks:
                raise _aborted(NO_ADDITIONAL_SENSE)  # (SPC-4: the INFORMATION-less form)
        if dst.readonly:
            raise CheckCondition(DATA_PROTECT, WRITE_PROTECTED)
        segments.append(_Segment(src, dst, blocks, source_lba, destination_lba))
        at += _SEGMENT_DESCRIPTOR_LEN
    return list_id, (flags >> 3) & 0x03, segments


def extended_copy(
    commands: CommandSet, lu: LogicalUnit, cdb: bytes, params: bytes, nexus: Nexus
) -> Awaitable[None] | None:
    """Check the parameter list and admit the copy on the event loop, then run every segment,
    in order, in the threads of ``lu``'s image; the result is held for RECEIVE COPY RESULTS
    unless LIST ID USAGE says otherwise. The copy reads and writes LUNs it is not addressed to:
    each is judged as a READ or a WRITE of ``nexus`` would be, here where reservations change,
    and the copy counts as a change of its destinations' media until it ended (a PREEMPT AND
    ABORT, reset or abort there waits for it)."""
    if not params:  # a parameter list length of zero: no copy
        return None
    list_id, usage, segments = _parse(commands, params, nexus)
    admit = commands.reservations.admit_medium
    for segment in segments:
        admit(segment.source, nexus, writes=False)
        admit(segment.destination, nexus, writes=True)
    result = CopyResult(_COMPLETED_WITH_ERRORS, 0, 0)
    results = commands.state(CopyResults)
    if usage == _HOLD:
        with results.lock:
            held = results.held
            held.pop((nexus.initiator_port, list_id), None)
            held[nexus.initiator_port, list_id] = result
            if len(held) > MAX_HELD_RESULTS:
                del held[next(iter(held))]
    destinations = {id(s.destination.store): s.destination.store for s in segments}
    job = functools.partial(_copy, segments, result, results.lock)
    return diskio.run(lu.store, job, changes=True, also=destinations.values())


def _copy(segments: list[_Segment], result: CopyResult, lock: threading.Lock) -> None:
    for segment in segments:
        _copy_segment(segment)
        with lock:
            result.segments += 1
            result.nbytes += segment.blocks * segment.source.store.block_size
    with lock:
        result.status = _COMPLETED


def _copy_segment(segment: _Segment) -> None:
    # The whole segment is read before it is written: source and destination may overlap.
    src, dst = segment.source.store, segment.destination.store
    data = bytearray(segment.blocks * src.block_size)
    src.read_into(segment.source_lba * src.block_size, memoryview(data))
    with segment.destination.media_lock:
        dst.write(segment.destination_lba * dst.block_size, memoryview(data))


def receive_copy_results(commands: CommandSet, lu: LogicalUnit, cdb: bytes, nexus: Nexus) -> bytes:
    action, list_id = cdb[1] & 0x1F, cdb[2]
    (alloc,) = struct.unpack_from(">I", cdb, 10)
    if action == OPERATING_PARAMETERS:
        body = bytearray(44)
        body[4] = 0x01  # SNLID: LIST ID USAGE 11b (no list identifier) is supported
        struct.pack_into(">HHII", body, 8, MAX_TARGET_DESCRIPTORS, MAX_SEGMENT_DESCRIPTORS,
                         MAX_DESCRIPTOR_LIST_LENGTH, MAX_SEGMENT_BYTES)  # fmt: skip
        struct.pack_into(">HBBBB", body, 34, 1, 1, 9, 9, 9)  # one copy at a time; 2^9 units
        codes = bytes((BLOCK_TO_BLOCK, IDENTIFICATION_DESCRIPTOR))
        body[43] = len(codes)
        data = bytes(body) + codes
    elif action == COPY_STATUS:
        results = commands.state(CopyResults)
        with results.lock:
            result = results.held.get((nexus.initiator_port, list_id))
        if result is None:
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)
        units, count = (0x00, result.nbytes)  # bytes, or KiB (F1h) where they do not fit
        if count >= 1 << 32:
            units, count = 0xF1, count >> 10
        data = bytes(4) + struct.pack(">BHBI", result.status, result.segments, units, count)
    else:
        raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)
    return (struct.pack(">I", len(data) - 4) + data[4:])[:alloc]


def third_party_copy(commands: CommandSet, lu: LogicalUnit) -> bytes:
    """Third-party Copy VPD page (8Fh): its Supported Commands descriptor names the copy
    commands and service actions above."""
    # each command: operation code, number of service actions, the service actions
    supported = bytes((EXTENDED_COPY, 1, EXTENDED_COPY_LID1)) + bytes(
        (RECEIVE_COPY_RESULTS, 2, COPY_STATUS, OPERATING_PARAMETERS)
    )
    body = bytes((len(supported),)) + supported
    body += bytes(-len(body) % 4)  # descriptors are a multiple of four bytes long
    return struct.pack(">HH", 0x0001, len(body)) + body


COMMANDS: dict[int, Handler] = {}
PARAMETER_COMMANDS = {
    # (run on the event loop: it admits the copy there and hands the copy to the threads)
    EXTENDED_COPY: ParameterCommand(_parameter_length, extended_copy)
}
NEXUS_COMMANDS = {RECEIVE_COPY_RESULTS: receive_copy_results}
VPD_PAGES = {0x8F: third_party_copy}
#: What this family adds to the command table (``families``).
FAMILY = Family(
    commands=COMMANDS, parameters=PARAMETER_COMMANDS, nexus=NEXUS_COMMANDS, vpd=VPD_PAGES
)
