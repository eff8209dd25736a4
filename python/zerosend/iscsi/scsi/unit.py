"""A logical unit and the READ/WRITE/VERIFY CDBs that move its data (SBC-3): the opcodes, their
decoding, and the range checks every command on a unit makes."""

from __future__ import annotations

import hashlib
import struct
import threading
from dataclasses import dataclass, field

from ..storage.store import Store
from .sense import ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, LBA_OUT_OF_RANGE, CheckCondition

READ6, READ10, READ12, READ16 = 0x08, 0x28, 0xA8, 0x88
WRITE6, WRITE10, WRITE12, WRITE16 = 0x0A, 0x2A, 0xAA, 0x8A
WRITE_VERIFY10, WRITE_VERIFY12, WRITE_VERIFY16 = 0x2E, 0xAE, 0x8E
VERIFY10, VERIFY12, VERIFY16 = 0x2F, 0xAF, 0x8F
ORWRITE16 = 0x8B
READ_OPS = frozenset((READ6, READ10, READ12, READ16))
WRITE_OPS = frozenset(
    (WRITE6, WRITE10, WRITE12, WRITE16, WRITE_VERIFY10, WRITE_VERIFY12, WRITE_VERIFY16, ORWRITE16)
)
VERIFY_OPS = frozenset((VERIFY10, VERIFY12, VERIFY16))
MAX_TRANSFER_BLOCKS = 16384  # 8 MiB with 512-byte blocks; advertised in VPD B0


@dataclass(slots=True)
class Rw:
    """A decoded READ/WRITE/VERIFY CDB."""

    lba: int
    blocks: int
    flags: int  # byte 1: protect bits, DPO, FUA, BYTCHK


def decode_rw(cdb: bytes) -> Rw:
    op = cdb[0]
    if op in (READ6, WRITE6):
        lba = ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
        blocks = cdb[4] or 256
        return Rw(lba, blocks, 0)
    group = op >> 5
    if group in (1, 2):  # 10-byte CDBs
        lba, blocks = struct.unpack_from(">IxH", cdb, 2)
    elif group == 5:  # 12-byte
        lba, blocks = struct.unpack_from(">II", cdb, 2)
    else:  # 16-byte
        lba, blocks = struct.unpack_from(">QI", cdb, 2)
    return Rw(lba, blocks, cdb[1])


@dataclass
class LogicalUnit:
    number: int
    store: Store
    target_iqn: str
    # Held by every change to the medium (plain writes included) so that the read-compare-write
    # commands (COMPARE AND WRITE, ORWRITE) are atomic however the writes are scheduled.
    media_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    # A READ may be refused or draw a unit attention: the READ fast path leaves it to admit().
    admission_required: bool = False
    # Set by the operator (``serial``, ``wwn`` hex): the identity multipath keys on stays
    # when the image moves or the target is renamed.
    serial_text: str = ""
    wwn: str = ""

    def __post_init__(self) -> None:
        digest = hashlib.sha256(
            f"{self.target_iqn}/{self.number}/{self.store.name}".encode()
        ).digest()
        # NAA 6 (IEEE registered extended) needs an OUI; use a locally administered looking value.
        self.naa = bytes((0x60 | (digest[0] & 0x0F),)) + digest[1:16]
        self.serial = digest[16:24].hex().upper().encode()
        if self.wwn:
            self.naa = bytes.fromhex(self.wwn)
        if self.serial_text:
            self.serial = self.serial_text.encode()

    @property
    def readonly(self) -> bool:
        return self.store.readonly

    def check_range(self, lba: int, blocks: int) -> None:
        if lba + blocks > self.store.blocks or lba >= 1 << 64:
            raise CheckCondition(ILLEGAL_REQUEST, LBA_OUT_OF_RANGE)


def check_transfer_length(blocks: int) -> None:
    """A READ, WRITE or VERIFY longer than the MAXIMUM TRANSFER LENGTH we advertise in the Block
    Limits page is refused (SBC-4 6.6.4) rather than served."""
    if blocks > MAX_TRANSFER_BLOCKS:
        raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)
