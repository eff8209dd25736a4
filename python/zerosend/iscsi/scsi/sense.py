"""SCSI status, sense keys and additional sense codes (SPC-4), and the two exceptions that end a
command with them: the vocabulary every command family and the connection answer in."""

from __future__ import annotations

import struct

GOOD = 0x00
CHECK_CONDITION = 0x02
BUSY = 0x08
RESERVATION_CONFLICT = 0x18
TASK_SET_FULL = 0x28

NO_SENSE = 0x00
NOT_READY = 0x02
MEDIUM_ERROR = 0x03
HARDWARE_ERROR = 0x04
ILLEGAL_REQUEST = 0x05
UNIT_ATTENTION = 0x06
DATA_PROTECT = 0x07
ABORTED_COMMAND = 0x0B
MISCOMPARE = 0x0E

# (ASC, ASCQ) pairs
INVALID_OPCODE = (0x20, 0x00)
LBA_OUT_OF_RANGE = (0x21, 0x00)
INVALID_FIELD_IN_CDB = (0x24, 0x00)
LUN_NOT_SUPPORTED = (0x25, 0x00)
INVALID_FIELD_IN_PARAMS = (0x26, 0x00)
PARAMETER_LIST_LENGTH_ERROR = (0x1A, 0x00)
WRITE_PROTECTED = (0x27, 0x00)
SAVING_NOT_SUPPORTED = (0x39, 0x00)
MISCOMPARE_DURING_VERIFY = (0x1D, 0x00)
UNRECOVERED_READ_ERROR = (0x11, 0x00)
WRITE_ERROR = (0x0C, 0x00)
INTERNAL_FAILURE = (0x44, 0x00)
DATA_PHASE_ERROR = (0x4B, 0x00)
POWER_ON_RESET = (0x29, 0x00)


class CheckCondition(Exception):
    """Ends a command with CHECK CONDITION and the given sense."""

    def __init__(
        self, key: int, code: tuple[int, int], info: int | None = None, field: int | None = None
    ) -> None:
        super().__init__(f"sense key 0x{key:x} asc/ascq 0x{code[0]:02x}/0x{code[1]:02x}")
        self.key = key
        self.asc, self.ascq = code
        self.info = info
        self.field = field  # the CDB byte at fault (sense-key specific field pointer)


class StatusReply(Exception):
    """A command ends with this status and no sense data (RESERVATION CONFLICT, BUSY ...)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"status 0x{status:02x}")
        self.status = status


def sense_fixed(
    key: int, asc: int, ascq: int, info: int | None = None, field: int | None = None
) -> bytes:
    s = bytearray(18)
    s[0] = 0x70 | (0x80 if info is not None else 0)
    s[2] = key
    if info is not None:
        struct.pack_into(">I", s, 3, info & 0xFFFFFFFF)
    s[7] = 10
    s[12] = asc
    s[13] = ascq
    if field is not None:  # SKSV, C/D: the field pointer names a byte of the CDB
        s[15] = 0xC0
        struct.pack_into(">H", s, 16, field)
    return bytes(s)


def sense_descriptor(key: int, asc: int, ascq: int) -> bytes:
    return bytes((0x72, key, asc, ascq, 0, 0, 0, 0))
