"""SCSI block commands (SBC-3 / SPC-4 subset) for one logical unit.

READ/WRITE/VERIFY data movement is driven by the connection (Data-In from buffers, Data-Out
into the store); this module decodes their CDBs and answers every other command with a
ready-made data-in buffer or sense data.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .acl import Acl, LunView
from .nexus import Nexus
from .storage.store import Store

if TYPE_CHECKING:
    from .reservations import Reservations

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

VENDOR = b"ZEROSEND"
PRODUCT = b"ZS-ISCSI DISK   "
REVISION = b"0001"

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


def _alloc(cdb: bytes, offset: int, size: int) -> int:
    return int.from_bytes(cdb[offset : offset + size], "big")


class CommandSet:
    """Non-data and data-in commands that return a small buffer."""

    def __init__(
        self, luns: dict[int, LogicalUnit], reservations: Reservations | None = None
    ) -> None:
        from .reservations import Reservations  # (it builds on this module)

        self.luns = luns
        self.reservations = reservations or Reservations(luns)
        # The ACL of an initiator (None: it sees every LUN); the target sets it from ``acls``.
        self.acl_of: Callable[[str], Acl | None] = lambda initiator: None

    def view(self, nexus: Nexus) -> LunView:
        """The LUNs as ``nexus``'s initiator may see them (its ACL's LUN masking)."""
        return LunView(self.luns, self.acl_of(nexus.initiator))

    def admit(self, lu: LogicalUnit, cdb: bytes, nexus: Nexus) -> None:
        """Every command to ``lu``, READ and WRITE included, passes here before it starts;
        raises StatusReply or CheckCondition when ``nexus`` may not run it now."""
        self.reservations.admit(lu, cdb, nexus)

    def execute(self, lu: LogicalUnit | None, cdb: bytes, nexus: Nexus) -> bytes | Awaitable[bytes]:
        """Data-in bytes of a command (b"" for none), or an awaitable of them (``Handler``);
        raises CheckCondition."""
        op = cdb[0]
        if op == 0x12:
            return self.inquiry(lu, cdb)
        if op == 0xA0:
            return self.report_luns(cdb, nexus)
        if op == 0x03:
            return self.request_sense(cdb)
        if lu is None:
            raise CheckCondition(ILLEGAL_REQUEST, LUN_NOT_SUPPORTED)
        nexus_handler = NEXUS_COMMANDS.get(op)
        if nexus_handler is not None:
            return nexus_handler(self, lu, cdb, nexus)
        handler = _HANDLERS.get(op)
        if handler is None:
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_OPCODE)
        return handler(self, lu, cdb)

    # -- SPC --

    def inquiry(self, lu: LogicalUnit | None, cdb: bytes) -> bytes:
        evpd = cdb[1] & 0x01
        page = cdb[2]
        alloc = _alloc(cdb, 3, 2)
        if cdb[1] & 0xFE:
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)
        if lu is None:  # no such LUN: peripheral qualifier 3, device type 0x1f
            if evpd:
                raise CheckCondition(ILLEGAL_REQUEST, LUN_NOT_SUPPORTED)
            data = bytearray(36)
            data[0] = 0x7F
            data[2] = 0x06
            data[3] = 0x02
            data[4] = 31
            return bytes(data[:alloc])
        if not evpd:
            if page:
                raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)
            data = bytearray(96)
            data[0] = 0x00  # connected direct-access block device
            data[2] = 0x06  # SPC-4
            data[3] = 0x12  # HiSup, response data format 2
            data[4] = len(data) - 5
            data[5] = 0x08  # 3PC: EXTENDED COPY
            data[7] = 0x02  # CmdQue
            data[8:16] = VENDOR
            data[16:32] = PRODUCT
            data[32:36] = REVISION
            # version descriptors: SAM-5, iSCSI, SPC-4, SBC-3
            struct.pack_into(">HHHH", data, 58, 0x00A0, 0x0960, 0x0460, 0x04C0)
            return bytes(data[:alloc])
        page_fn = _VPD.get(page)
        if page_fn is None:
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)
        body = page_fn(self, lu)
        head = bytes((0x00, page)) + struct.pack(">H", len(body))
        return (head + body)[:alloc]

    def _vpd_supported(self, lu: LogicalUnit) -> bytes:
        return bytes(sorted(_VPD))

    def _vpd_serial(self, lu: LogicalUnit) -> bytes:
        return lu.serial

    def _vpd_ids(self, lu: LogicalUnit) -> bytes:
        out = bytearray()
        # NAA, binary, associated with the logical unit
        out += bytes((0x01, 0x03, 0x00, len(lu.naa))) + lu.naa
        # T10 vendor ID based, ASCII
        t10 = VENDOR + lu.serial
        out += bytes((0x02, 0x01, 0x00, len(t10))) + t10
        # SCSI name string of the target device, UTF-8, NUL padded to a multiple of 4
        name = lu.target_iqn.encode()
        name += b"\0" * (4 - len(name) % 4)
        out += bytes((0x53, 0xA8, 0x00, len(name))) + name
        # relative target port 1, associated with the target port (protocol iSCSI)
        out += bytes((0x51, 0x94, 0x00, 0x04, 0, 0, 0, 1))
        return bytes(out)

    def _vpd_characteristics(self, lu: LogicalUnit) -> bytes:
        body = bytearray(0x3C)
        struct.pack_into(">H", body, 0, 1)  # non-rotating medium
        return bytes(body)

    def report_luns(self, cdb: bytes, nexus: Nexus) -> bytes:
        select = cdb[2]
        alloc = _alloc(cdb, 6, 4)
        if select not in (0x00, 0x01, 0x02):
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)
        if alloc < 16:
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)
        from .wire.pdu import encode_lun

        seen = self.view(nexus)
        body = b"" if select == 0x01 else b"".join(encode_lun(n) for n in sorted(seen))
        return (struct.pack(">I4x", len(body)) + body)[:alloc]

    def request_sense(self, cdb: bytes) -> bytes:
        # Sense is always returned with the failing command (autosense): nothing is pending.
        alloc = cdb[4]
        if cdb[1] & 0x01:
            return sense_descriptor(NO_SENSE, 0, 0)[:alloc]
        return sense_fixed(NO_SENSE, 0, 0)[:alloc]

    def test_unit_ready(self, lu: LogicalUnit, cdb: bytes) -> bytes:
        return b""

    def mode_sense(self, lu: LogicalUnit, cdb: bytes) -> bytes:
        ten = cdb[0] == 0x5A
        dbd = bool(cdb[1] & 0x08)
        pc = cdb[2] >> 6
        page = cdb[2] & 0x3F
        subpage = cdb[3]
        alloc = _alloc(cdb, 7, 2) if ten else cdb[4]
        if pc == 3:
            raise CheckCondition(ILLEGAL_REQUEST, SAVING_NOT_SUPPORTED)
        if subpage not in (0x00, 0xFF):
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)
        changeable = pc == 1
        pages = {0x08: self._caching_page, 0x0A: self._control_page, 0x1C: self._iec_page}
        if page == 0x3F:
            body = b"".join(fn(lu, changeable) for _, fn in sorted(pages.items()))
        elif page in pages:
            body = pages[page](lu, changeable)
        else:
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)
        dev_specific = (0x80 if lu.readonly else 0x00) | 0x10  # WP, DPOFUA
        blocks = lu.store.blocks
        desc = b""
        if not dbd:
            desc = struct.pack(">I", min(blocks, 0xFFFFFFFF))
            desc += struct.pack(">I", lu.store.block_size & 0xFFFFFF)
        if ten:
            head = struct.pack(">HBBxxH", 6 + len(desc) + len(body), 0, dev_specific, len(desc))
        else:
            head = bytes((3 + len(desc) + len(body), 0, dev_specific, len(desc)))
        return (head + desc + body)[:alloc]

    def _caching_page(self, lu: LogicalUnit, changeable: bool) -> bytes:
        page = bytearray(20)
        page[0], page[1] = 0x08, 0x12
        if not changeable and lu.store.write_cache:
            page[2] = 0x04  # WCE: writes are durable only after SYNCHRONIZE CACHE or FUA
        return bytes(page)

    def _control_page(self, lu: LogicalUnit, changeable: bool) -> bytes:
        page = bytearray(12)
        page[0], page[1] = 0x0A, 0x0A
        if not changeable:
            page[3] = 0x10  # QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
            if lu.readonly:
                page[4] = 0x08  # SWP
            struct.pack_into(">H", page, 10, 0xFFFF)  # busy timeout period: unlimited
        return bytes(page)

    def _iec_page(self, lu: LogicalUnit, changeable: bool) -> bytes:
        page = bytearray(12)
        page[0], page[1] = 0x1C, 0x0A
        return bytes(page)

    # -- SBC --

    def read_capacity10(self, lu: LogicalUnit, cdb: bytes) -> bytes:
        last = lu.store.blocks - 1
        return struct.pack(">II", min(last, 0xFFFFFFFF), lu.store.block_size)

    def service_action_in(self, lu: LogicalUnit, cdb: bytes) -> bytes | Awaitable[bytes]:
        handler = SERVICE_ACTIONS_IN.get(cdb[1] & 0x1F)
        if handler is None:
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)
        return handler(self, lu, cdb)

    def read_capacity16(self, lu: LogicalUnit, cdb: bytes) -> bytes:
        alloc = _alloc(cdb, 10, 4)
        data = bytearray(struct.pack(">QI", lu.store.blocks - 1, lu.store.block_size) + bytes(20))
        if lu.store.thin:
            data[14] = 0xC0  # LBPME (UNMAP, WRITE SAME unmap), LBPRZ (unmapped reads as zeros)
        return bytes(data[:alloc])

    def prefetch(self, lu: LogicalUnit, cdb: bytes) -> bytes:
        rw = decode_rw(cdb)
        lu.check_range(rw.lba, rw.blocks)
        return b""

    def start_stop(self, lu: LogicalUnit, cdb: bytes) -> bytes:
        return b""

    def prevent_allow(self, lu: LogicalUnit, cdb: bytes) -> bytes:
        return b""

    # -- reservations (reservations.py holds their rules)

    def persistent_reserve_in(self, lu: LogicalUnit, cdb: bytes, nexus: Nexus) -> bytes:
        return self.reservations.persistent_reserve_in(lu, cdb)

    def reserve(self, lu: LogicalUnit, cdb: bytes, nexus: Nexus) -> bytes:
        self.reservations.reserve(lu, cdb, nexus)
        return b""

    def release(self, lu: LogicalUnit, cdb: bytes, nexus: Nexus) -> bytes:
        self.reservations.release(lu, cdb, nexus)
        return b""


#: A command's data-in bytes, or what they come from later (work in the store's threads: the
#: command is then a task in progress until they come).
Handler = Callable[[CommandSet, LogicalUnit, bytes], bytes | Awaitable[bytes]]

_HANDLERS: dict[int, Handler] = {
    0x00: CommandSet.test_unit_ready,
    0x1A: CommandSet.mode_sense,
    0x5A: CommandSet.mode_sense,
    0x25: CommandSet.read_capacity10,
    0x9E: CommandSet.service_action_in,
    0x34: CommandSet.prefetch,
    0x90: CommandSet.prefetch,
    0x1B: CommandSet.start_stop,
    0x1E: CommandSet.prevent_allow,
}


@dataclass(frozen=True)
class ParameterCommand:
    """A command that acts once its Data-Out, a parameter list, is whole (UNMAP, PERSISTENT
    RESERVE OUT, ...; SYNCHRONIZE CACHE, with an empty list): the connection collects
    ``length(cdb)`` bytes, then calls ``run(commands, lu, cdb, parameters, nexus)``, which
    raises CheckCondition or StatusReply to fail the command; run on the event loop, it may
    return an awaitable instead, and the status waits for it (and fails with what it raises):
    a state file saved by a thread, a copy in the stores' threads. ``check(lu, cdb)``: what can be
    refused before any data moves (the LBA range, write protection). ``exact``: a Data-Out of
    any other length than ``length(cdb)`` is an error in the CDB (COMPARE AND WRITE, WRITE SAME).
    ``medium``: ``run`` works on media only, never on the target's own state, so it may run in
    the store's threads; it does when the store may block, or always if ``slow`` (it may move
    more data than the event loop should wait for)."""

    length: Callable[[bytes], int]
    run: Callable[[CommandSet, LogicalUnit, bytes, bytes, Nexus], Awaitable[None] | None]
    check: Callable[[LogicalUnit, bytes], None] | None = None
    exact: bool = False
    medium: bool = False
    slow: bool = False

    def off_loop(self, store: Store) -> bool:
        """``run`` goes to ``store``'s threads."""
        return self.medium and (self.slow or store.may_block)


def _sync_range(cdb: bytes) -> tuple[int, int]:
    if cdb[0] == 0x35:
        lba, blocks = struct.unpack_from(">IxH", cdb, 2)
    else:
        lba, blocks = struct.unpack_from(">QI", cdb, 2)
    return lba, blocks


def _check_sync(lu: LogicalUnit, cdb: bytes) -> None:
    lu.check_range(*_sync_range(cdb))


def _synchronize_cache(
    commands: CommandSet, lu: LogicalUnit, cdb: bytes, parameters: bytes, nexus: Nexus
) -> None:
    lba, blocks = _sync_range(cdb)
    bs = lu.store.block_size
    # NUMBER OF LOGICAL BLOCKS 0: from LBA to the end of the medium (SBC-4 5.31)
    lu.store.flush(lba * bs, blocks * bs)


#: Parameter-list commands by opcode (the connection routes these to ``Writes.parameters``).
PARAMETER_COMMANDS: dict[int, ParameterCommand] = {
    0x5F: ParameterCommand(  # PERSISTENT RESERVE OUT
        lambda cdb: int.from_bytes(cdb[5:9], "big"),
        lambda commands, lu, cdb, parameters, nexus: commands.reservations.persistent_reserve_out(
            lu, cdb, parameters, nexus
        ),
    ),
    **{
        op: ParameterCommand(lambda cdb: 0, _synchronize_cache, check=_check_sync, medium=True)
        for op in (0x35, 0x91)  # SYNCHRONIZE CACHE(10), (16): a sync that may wait for a disk
    },
}
#: The largest parameter list the target collects; longer ones are refused in the CDB.
MAX_PARAMETER_LIST = 1 << 20
#: SERVICE ACTION IN(16) (0x9E) by service action.
SERVICE_ACTIONS_IN: dict[int, Handler] = {0x10: CommandSet.read_capacity16}
#: Commands that answer per I_T nexus (``run(commands, lu, cdb, nexus)``): state kept for the
#: initiator port that asked, such as copy results.
NEXUS_COMMANDS: dict[int, Callable[[CommandSet, LogicalUnit, bytes, Nexus], bytes]] = {
    0x5E: CommandSet.persistent_reserve_in,
    0x16: CommandSet.reserve,
    0x56: CommandSet.reserve,
    0x17: CommandSet.release,
    0x57: CommandSet.release,
}

_VPD: dict[int, Callable[[CommandSet, LogicalUnit], bytes]] = {
    0x00: CommandSet._vpd_supported,
    0x80: CommandSet._vpd_serial,
    0x83: CommandSet._vpd_ids,
    0xB1: CommandSet._vpd_characteristics,
}


def implemented(op: int) -> bool:
    """Commands with this operation code run here (REPORT SUPPORTED OPERATION CODES)."""
    return (
        op in (0x12, 0xA0, 0x03)  # INQUIRY, REPORT LUNS, REQUEST SENSE: answered for any LUN
        or op in READ_OPS
        or op in WRITE_OPS
        or op in VERIFY_OPS
        or op in _HANDLERS
        or op in PARAMETER_COMMANDS
        or op in NEXUS_COMMANDS
    )


def _register_families() -> None:
    """The command families in modules of their own add their opcodes to the tables above."""
    from . import atomic, compare, defects, opcodes, provisioning, xcopy

    for family in (provisioning, compare, atomic, xcopy, defects, opcodes):
        _HANDLERS.update(family.COMMANDS)
        PARAMETER_COMMANDS.update(family.PARAMETER_COMMANDS)
    SERVICE_ACTIONS_IN.update(provisioning.SERVICE_ACTIONS_IN)
    NEXUS_COMMANDS.update(xcopy.NEXUS_COMMANDS)
    _VPD.update(provisioning.VPD_PAGES)
    _VPD.update(xcopy.VPD_PAGES)


_register_families()
