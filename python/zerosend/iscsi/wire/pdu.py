"""iSCSI PDU layout (RFC 7143 section 11): opcodes, header parsing and header building.

Every PDU starts with a 48-byte Basic Header Segment (BHS). Builders here return the BHS as a
``bytearray`` so callers can hand it to ``send_zc`` together with the data segment, padding and
digests as one vectored send, without ever copying the data segment.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

BHS_LEN = 48
NO_TAG = 0xFFFFFFFF

# Initiator opcodes
OP_NOP_OUT = 0x00
OP_SCSI_CMD = 0x01
OP_TMF_REQ = 0x02
OP_LOGIN_REQ = 0x03
OP_TEXT_REQ = 0x04
OP_DATA_OUT = 0x05
OP_LOGOUT_REQ = 0x06
OP_SNACK = 0x10
# Target opcodes
OP_NOP_IN = 0x20
OP_SCSI_RSP = 0x21
OP_TMF_RSP = 0x22
OP_LOGIN_RSP = 0x23
OP_TEXT_RSP = 0x24
OP_DATA_IN = 0x25
OP_LOGOUT_RSP = 0x26
OP_R2T = 0x31
OP_ASYNC = 0x32
OP_REJECT = 0x3F

OPCODE_NAMES = {
    OP_NOP_OUT: "NOP-Out",
    OP_SCSI_CMD: "SCSI-Command",
    OP_TMF_REQ: "TMF-Request",
    OP_LOGIN_REQ: "Login-Request",
    OP_TEXT_REQ: "Text-Request",
    OP_DATA_OUT: "Data-Out",
    OP_LOGOUT_REQ: "Logout-Request",
    OP_SNACK: "SNACK",
}

# Reject reasons (11.17.1)
REJECT_DATA_DIGEST = 0x02
REJECT_SNACK = 0x03
REJECT_PROTOCOL_ERROR = 0x04
REJECT_NOT_SUPPORTED = 0x05
REJECT_IMMEDIATE = 0x06
REJECT_TASK_IN_PROGRESS = 0x07
REJECT_INVALID_FIELD = 0x09
REJECT_WAITING_LOGOUT = 0x0C

# Data-In / SCSI Response flag bits
F_FINAL = 0x80
DATAIN_ACK = 0x40
DATAIN_OVERFLOW = 0x04
DATAIN_UNDERFLOW = 0x02
DATAIN_STATUS = 0x01
RSP_OVERFLOW = 0x04
RSP_UNDERFLOW = 0x02

# SCSI Command flag bits
CMD_READ = 0x40
CMD_WRITE = 0x20

_U32 = struct.Struct(">I")
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")


class PduError(Exception):
    """A PDU that breaks the protocol; ``reason`` is the Reject reason to answer with."""

    def __init__(self, message: str, reason: int = REJECT_PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.reason = reason


def pad_for(length: int) -> bytes:
    """Zero padding that brings a data segment to a 4-byte boundary."""
    return _PAD[length & 3]


def padded(length: int) -> int:
    return (length + 3) & ~3


@dataclass(slots=True)
class Pdu:
    """One received PDU. ``bhs`` is a private copy; ``data`` may be a view into the receive
    buffer that is valid only until the next PDU is read (copy it to keep it)."""

    bhs: bytes
    ahs: bytes
    data: memoryview | bytes

    @property
    def opcode(self) -> int:
        return self.bhs[0] & 0x3F

    @property
    def immediate(self) -> bool:
        return bool(self.bhs[0] & 0x40)

    @property
    def flags(self) -> int:
        return self.bhs[1]

    @property
    def final(self) -> bool:
        return bool(self.bhs[1] & F_FINAL)

    @property
    def itt(self) -> int:
        value: int = _U32.unpack_from(self.bhs, 16)[0]
        return value

    @property
    def lun_field(self) -> bytes:
        return self.bhs[8:16]

    def u32(self, offset: int) -> int:
        value: int = _U32.unpack_from(self.bhs, offset)[0]
        return value

    @property
    def name(self) -> str:
        return OPCODE_NAMES.get(self.opcode, f"opcode 0x{self.opcode:02x}")


def header_lengths(bhs: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(AHS length in bytes, data segment length) from a BHS."""
    return bhs[4] * 4, (bhs[5] << 16) | (bhs[6] << 8) | bhs[7]


def decode_lun(field: bytes) -> int:
    """LUN number from the 8-byte LUN field (SAM peripheral and flat addressing)."""
    method = field[0] >> 6
    if method == 0:  # peripheral device addressing: bus 0 only
        return field[1] if field[0] == 0 else -1
    if method == 1:  # flat space addressing
        return ((field[0] & 0x3F) << 8) | field[1]
    return -1


def encode_lun(lun: int) -> bytes:
    if lun < 256:
        return bytes((0, lun, 0, 0, 0, 0, 0, 0))
    return bytes((0x40 | (lun >> 8), lun & 0xFF, 0, 0, 0, 0, 0, 0))


def _bhs(opcode: int, flags: int, dsl: int) -> bytearray:
    h = bytearray(BHS_LEN)
    h[0] = opcode
    h[1] = flags
    h[5] = (dsl >> 16) & 0xFF
    h[6] = (dsl >> 8) & 0xFF
    h[7] = dsl & 0xFF
    return h


# Each builder but ``data_in_into`` leaves StatSN/ExpCmdSN/MaxCmdSN (bytes 24..35) for the
# connection to stamp right before the PDU is queued, so sequence numbers follow submission order.
_SN = struct.Struct(">III")


def stamp(h: bytearray, statsn: int, expcmdsn: int, maxcmdsn: int) -> None:
    _SN.pack_into(h, 24, statsn, expcmdsn, maxcmdsn)


# The whole Data-In header: opcode, flags, status, AHS+DSL, LUN, ITT, TTT, StatSN, ExpCmdSN,
# MaxCmdSN, DataSN, buffer offset, residual
_DATAIN = struct.Struct(">BBxBI8sIIIIIIII")


def data_in_into(
    h: bytearray | memoryview,
    at: int,
    flags: int,
    status: int,
    dsl: int,
    lun: bytes,
    itt: int,
    statsn: int,
    expcmdsn: int,
    maxcmdsn: int,
    datasn: int,
    offset: int,
    residual: int,
) -> None:
    """Write a whole Data-In header at ``h[at:at+48]``. StatSN is sent only with the S bit
    (``DATAIN_STATUS``); it is reserved otherwise."""
    if not flags & DATAIN_STATUS:
        statsn = 0
    _DATAIN.pack_into(h, at, OP_DATA_IN, flags, status, dsl & 0xFFFFFF, lun, itt, NO_TAG,
                      statsn, expcmdsn, maxcmdsn, datasn, offset, residual)  # fmt: skip


def scsi_response(
    itt: int, status: int, flags: int, residual: int, expdatasn: int, dsl: int
) -> bytearray:
    h = _bhs(OP_SCSI_RSP, F_FINAL | flags, dsl)
    h[2] = 0  # command completed at target
    h[3] = status
    _U32.pack_into(h, 16, itt)
    _U32.pack_into(h, 36, expdatasn)
    _U32.pack_into(h, 44, residual)
    return h


def r2t(lun: bytes, itt: int, ttt: int, r2tsn: int, offset: int, length: int) -> bytearray:
    h = _bhs(OP_R2T, F_FINAL, 0)
    h[8:16] = lun
    _U32.pack_into(h, 16, itt)
    _U32.pack_into(h, 20, ttt)
    struct.pack_into(">III", h, 36, r2tsn, offset, length)
    return h


def nop_in(lun: bytes, itt: int, ttt: int, dsl: int) -> bytearray:
    h = _bhs(OP_NOP_IN, F_FINAL, dsl)
    h[8:16] = lun
    _U32.pack_into(h, 16, itt)
    _U32.pack_into(h, 20, ttt)
    return h


def tmf_response(itt: int, response: int) -> bytearray:
    h = _bhs(OP_TMF_RSP, F_FINAL, 0)
    h[2] = response
    _U32.pack_into(h, 16, itt)
    return h


def text_response(itt: int, final: bool, cont: bool, ttt: int, dsl: int) -> bytearray:
    h = _bhs(OP_TEXT_RSP, (F_FINAL if final else 0) | (0x40 if cont else 0), dsl)
    _U32.pack_into(h, 16, itt)
    _U32.pack_into(h, 20, ttt)
    return h


def logout_response(itt: int, response: int, time2wait: int = 0, time2retain: int = 0) -> bytearray:
    h = _bhs(OP_LOGOUT_RSP, F_FINAL, 0)
    h[2] = response
    _U32.pack_into(h, 16, itt)
    struct.pack_into(">HH", h, 40, time2wait, time2retain)
    return h


def reject(reason: int, rejected_bhs: bytes) -> bytearray:
    h = _bhs(OP_REJECT, F_FINAL, BHS_LEN)
    h[2] = reason
    _U32.pack_into(h, 16, NO_TAG)
    return h


ASYNC_DROP_SESSION = 3  # AsyncEvent: the target drops all connections of the session


def async_drop_session(time2wait: int, time2retain: int) -> bytearray:
    """Async Message (11.9) announcing that the target ends the session; the initiator may log
    in again after ``time2wait`` seconds."""
    h = _bhs(OP_ASYNC, F_FINAL, 0)
    _U32.pack_into(h, 16, NO_TAG)
    h[36] = ASYNC_DROP_SESSION
    struct.pack_into(">HHH", h, 38, 0, time2wait, time2retain)
    return h


def login_response(
    flags: int,
    isid: bytes,
    tsih: int,
    itt: int,
    status_class: int,
    status_detail: int,
    dsl: int,
) -> bytearray:
    h = _bhs(OP_LOGIN_RSP, flags, dsl)
    h[2] = 0  # Version-max
    h[3] = 0  # Version-active
    h[8:14] = isid
    struct.pack_into(">H", h, 14, tsih)
    _U32.pack_into(h, 16, itt)
    h[36] = status_class
    h[37] = status_detail
    return h


# Text key=value data segments (section 6)


def parse_text(data: bytes | memoryview) -> list[tuple[str, str]]:
    """Split a text data segment into (key, value) pairs; raises PduError on garbage."""
    pairs: list[tuple[str, str]] = []
    for item in bytes(data).split(b"\0"):
        if not item:
            continue
        key, sep, value = item.partition(b"=")
        if not sep or not key:
            raise PduError(f"malformed text key/value {item[:40]!r}", REJECT_INVALID_FIELD)
        try:
            pairs.append((key.decode("utf-8"), value.decode("utf-8")))
        except UnicodeDecodeError as e:
            raise PduError(f"text key/value is not UTF-8: {e}", REJECT_INVALID_FIELD) from e
    return pairs


def build_text(pairs: list[tuple[str, str]]) -> bytes:
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs)
