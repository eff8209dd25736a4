"""REPORT SUPPORTED OPERATION CODES (SPC-4 6.35, MAINTENANCE IN service action 0Ch): every
command the target runs, with the CDB bits it looks at (CDB usage data) and, when asked
(RCTD), command timeouts.

What is reported follows what is dispatched (``CommandTable.implemented``), so a command family that
registers its opcodes is reported with them; the usage data of each CDB is written down here.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable

from .commands import CommandSet, CommandTable, Family, Handler, ParameterCommand
from .sense import ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, CheckCondition
from .unit import LogicalUnit

MAINTENANCE_IN = 0xA3
REPORT_SUPPORTED_OPERATION_CODES = 0x0C

_ALL, _ONE, _ONE_WITH_ACTION, _ONE_EITHER = 0, 1, 2, 3
_SUPPORTED, _NOT_SUPPORTED = 0x03, 0x01


def _usage(text: str) -> bytes:
    return bytes.fromhex(text)


_LBA8 = "ff" * 8
# CDB usage data: a bit is set where the target evaluates the CDB's bit. Byte 1 of reads and
# writes carries DPO and FUA (18h), which MODE SENSE's DPOFUA promises; WRPROTECT (e0h) is
# evaluated (to refuse protection information).
_RW10 = "{op} {b1} ff ff ff ff 00 ff ff 00"
_RW12 = "{op} {b1} ff ff ff ff ff ff ff ff 00 00"
_RW16 = "{op} {b1} " + _LBA8 + " ff ff ff ff 00 00"
USAGE: dict[tuple[int, int | None], bytes] = {
    (0x00, None): _usage("00 00 00 00 00 00"),  # TEST UNIT READY
    (0x03, None): _usage("03 01 00 00 ff 00"),  # REQUEST SENSE
    (0x08, None): _usage("08 1f ff ff ff 00"),  # READ(6)
    (0x0A, None): _usage("0a 1f ff ff ff 00"),  # WRITE(6)
    (0x12, None): _usage("12 01 ff ff ff 00"),  # INQUIRY
    (0x16, None): _usage("16 00 00 00 00 00"),  # RESERVE(6)
    (0x17, None): _usage("17 00 00 00 00 00"),  # RELEASE(6)
    (0x1A, None): _usage("1a 08 ff ff ff 00"),  # MODE SENSE(6)
    (0x1B, None): _usage("1b 00 00 00 00 00"),  # START STOP UNIT
    (0x1E, None): _usage("1e 00 00 00 00 00"),  # PREVENT ALLOW MEDIUM REMOVAL
    (0x25, None): _usage("25 00 00 00 00 00 00 00 00 00"),  # READ CAPACITY(10)
    (0x28, None): _usage(_RW10.format(op="28", b1="18")),  # READ(10)
    (0x2A, None): _usage(_RW10.format(op="2a", b1="f8")),  # WRITE(10)
    (0x2E, None): _usage(_RW10.format(op="2e", b1="f0")),  # WRITE AND VERIFY(10)
    (0x2F, None): _usage(_RW10.format(op="2f", b1="f6")),  # VERIFY(10)
    (0x34, None): _usage(_RW10.format(op="34", b1="00")),  # PRE-FETCH(10)
    (0x35, None): _usage(_RW10.format(op="35", b1="00")),  # SYNCHRONIZE CACHE(10)
    (0x37, None): _usage("37 00 1f 00 00 00 00 ff ff 00"),  # READ DEFECT DATA(10)
    (0x41, None): _usage(_RW10.format(op="41", b1="f8")),  # WRITE SAME(10)
    (0x42, None): _usage("42 01 00 00 00 00 00 ff ff 00"),  # UNMAP
    (0x56, None): _usage("56 00 00 00 00 00 00 00 00 00"),  # RESERVE(10)
    (0x57, None): _usage("57 00 00 00 00 00 00 00 00 00"),  # RELEASE(10)
    (0x5A, None): _usage("5a 08 ff ff 00 00 00 ff ff 00"),  # MODE SENSE(10)
    **{  # PERSISTENT RESERVE IN
        (0x5E, action): _usage("5e 1f 00 00 00 00 00 ff ff 00") for action in range(4)
    },
    **{  # PERSISTENT RESERVE OUT
        (0x5F, action): _usage("5f 1f ff 00 00 ff ff ff ff 00") for action in range(8)
    },
    (0x83, 0x00): _usage("83 1f 00 00 00 00 00 00 00 00 ff ff ff ff 00 00"),  # EXTENDED COPY
    (0x84, 0x00): _usage("84 1f ff 00 00 00 00 00 00 00 ff ff ff ff 00 00"),  # COPY STATUS
    (0x84, 0x03): _usage("84 1f 00 00 00 00 00 00 00 00 ff ff ff ff 00 00"),  # OP. PARAMETERS
    (0x88, None): _usage(_RW16.format(op="88", b1="18")),  # READ(16)
    (0x89, None): _usage("89 f8 " + _LBA8 + " 00 00 00 ff 00 00"),  # COMPARE AND WRITE
    (0x8A, None): _usage(_RW16.format(op="8a", b1="f8")),  # WRITE(16)
    (0x8B, None): _usage(_RW16.format(op="8b", b1="f8")),  # ORWRITE(16)
    (0x8E, None): _usage(_RW16.format(op="8e", b1="f0")),  # WRITE AND VERIFY(16)
    (0x8F, None): _usage(_RW16.format(op="8f", b1="f6")),  # VERIFY(16)
    (0x90, None): _usage(_RW16.format(op="90", b1="00")),  # PRE-FETCH(16)
    (0x91, None): _usage(_RW16.format(op="91", b1="00")),  # SYNCHRONIZE CACHE(16)
    (0x93, None): _usage(_RW16.format(op="93", b1="f9")),  # WRITE SAME(16)
    (0x9C, None): _usage("9c f8 " + _LBA8 + " ff ff ff ff 00 00"),  # WRITE ATOMIC(16)
    (0x9E, 0x10): _usage("9e 1f " + "00" * 8 + " ff ff ff ff 00 00"),  # READ CAPACITY(16)
    (0x9E, 0x12): _usage("9e 1f " + _LBA8 + " ff ff ff ff 00 00"),  # GET LBA STATUS
    (0xA0, None): _usage("a0 00 ff 00 00 00 ff ff ff ff 00 00"),  # REPORT LUNS
    (0xA3, 0x0C): _usage("a3 1f 87 ff ff ff ff ff ff ff 00 00"),  # this command
    (0xA8, None): _usage(_RW12.format(op="a8", b1="18")),  # READ(12)
    (0xAA, None): _usage(_RW12.format(op="aa", b1="f8")),  # WRITE(12)
    (0xAE, None): _usage(_RW12.format(op="ae", b1="f0")),  # WRITE AND VERIFY(12)
    (0xAF, None): _usage(_RW12.format(op="af", b1="f6")),  # VERIFY(12)
    (0xB7, None): _usage("b7 1f ff ff ff ff ff ff ff ff 00 00"),  # READ DEFECT DATA(12)
}
#: Opcodes whose commands are told apart by a service action in byte 1.
_WITH_ACTIONS = frozenset(op for op, action in USAGE if action is not None)
#: Recommended command timeouts in seconds (the rest: _DEFAULT_TIMEOUT); no nominal time.
_TIMEOUTS = {0x35: 60, 0x91: 60, 0x41: 60, 0x93: 60, 0x42: 60, 0x83: 120}
_DEFAULT_TIMEOUT = 30


def _supported(table: CommandTable, op: int, action: int | None) -> bool:
    if (op, action) not in USAGE or not table.implemented(op):
        return False
    if op == 0x9E:
        return action in table.service_actions_in
    if op == MAINTENANCE_IN:
        return action in MAINTENANCE_IN_ACTIONS
    return True


def _timeouts(op: int) -> bytes:
    return struct.pack(">HxxII", 0x0A, 0, _TIMEOUTS.get(op, _DEFAULT_TIMEOUT))


def report_supported_operation_codes(commands: CommandSet, lu: LogicalUnit, cdb: bytes) -> bytes:
    rctd = bool(cdb[2] & 0x80)
    options = cdb[2] & 0x07
    op = cdb[3]
    (action, alloc) = struct.unpack_from(">HI", cdb, 4)
    if options == _ALL:
        body = bytearray()
        for code, sa in sorted(USAGE, key=lambda key: (key[0], key[1] or 0)):
            if not _supported(commands.table, code, sa):
                continue
            flags = (0x02 if rctd else 0) | (0x01 if sa is not None else 0)
            body += struct.pack(">BxHxBH", code, sa or 0, flags, len(USAGE[code, sa]))
            if rctd:
                body += _timeouts(code)
        return (struct.pack(">I", len(body)) + body)[:alloc]
    # The field pointer tells this refusal from "no such service action" (byte 1).
    if (
        (options == _ONE and op in _WITH_ACTIONS)
        or (options == _ONE_WITH_ACTION and op not in _WITH_ACTIONS)
        or options not in (_ONE, _ONE_WITH_ACTION, _ONE_EITHER)
    ):
        raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, field=2)
    key = (op, action if op in _WITH_ACTIONS else None)
    if not _supported(commands.table, *key):
        return bytes((0, _NOT_SUPPORTED, 0, 0))[:alloc]
    usage = USAGE[key]
    data = bytes(((0x80 if rctd else 0), _SUPPORTED)) + struct.pack(">H", len(usage)) + usage
    if rctd:
        data += _timeouts(op)
    return data[:alloc]


def maintenance_in(commands: CommandSet, lu: LogicalUnit, cdb: bytes) -> bytes | Awaitable[bytes]:
    handler = MAINTENANCE_IN_ACTIONS.get(cdb[1] & 0x1F)
    if handler is None:
        raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, field=1)
    return handler(commands, lu, cdb)


#: MAINTENANCE IN (A3h) by service action.
MAINTENANCE_IN_ACTIONS: dict[int, Handler] = {
    REPORT_SUPPORTED_OPERATION_CODES: report_supported_operation_codes
}
COMMANDS: dict[int, Handler] = {MAINTENANCE_IN: maintenance_in}
PARAMETER_COMMANDS: dict[int, ParameterCommand] = {}
#: What this family adds to the command table (``families``).
FAMILY = Family(commands=COMMANDS, parameters=PARAMETER_COMMANDS)
