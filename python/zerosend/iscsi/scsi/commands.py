"""The command set: the dispatch table command families register into, and the commands of
SPC-4 / SBC-3 every logical unit answers (INQUIRY, REPORT LUNS, MODE SENSE, READ CAPACITY, ...).

READ/WRITE/VERIFY data movement is driven by the connection (Data-In from buffers, Data-Out
into the store); every other command is answered here with a ready-made data-in buffer or
sense data, by this module's handlers or by a family's (``families`` lists them). The table
never imports a family: it is built from the list it is given.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..storage.store import Store
from ..wire.pdu import encode_lun
from .acl import Acl, LunView
from .nexus import Nexus
from .reservations import Reservations
from .sense import (
    ILLEGAL_REQUEST,
    INVALID_FIELD_IN_CDB,
    INVALID_OPCODE,
    LUN_NOT_SUPPORTED,
    NO_SENSE,
    SAVING_NOT_SUPPORTED,
    CheckCondition,
    sense_descriptor,
    sense_fixed,
)
from .unit import READ_OPS, VERIFY_OPS, WRITE_OPS, LogicalUnit, decode_rw

VENDOR = b"ZEROSEND"
PRODUCT = b"ZS-ISCSI DISK   "
REVISION = b"0001"
#: The largest parameter list the target collects; longer ones are refused in the CDB.
MAX_PARAMETER_LIST = 1 << 20

T = TypeVar("T")


def _alloc(cdb: bytes, offset: int, size: int) -> int:
    return int.from_bytes(cdb[offset : offset + size], "big")


class CommandSet:
    """Non-data and data-in commands that return a small buffer."""

    def __init__(
        self,
        luns: dict[int, LogicalUnit],
        table: CommandTable,
        reservations: Reservations | None = None,
    ) -> None:
        self.luns = luns
        self.table = table
        self.reservations = reservations or Reservations(luns)
        self._state: dict[type[Any], Any] = {}
        # The ACL of an initiator (None: it sees every LUN); the target sets it from ``acls``.
        self.acl_of: Callable[[str], Acl | None] = lambda initiator: None

    def state(self, kind: type[T]) -> T:
        """The state a command family keeps for this command set (its ``kind()``, made on first
        use): it lives and goes with the command set, in no table of the family's own."""
        held = self._state.get(kind)
        if held is None:
            held = self._state[kind] = kind()
        return held

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
        nexus_handler = self.table.nexus.get(op)
        if nexus_handler is not None:
            return nexus_handler(self, lu, cdb, nexus)
        handler = self.table.handlers.get(op)
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
        page_fn = self.table.vpd.get(page)
        if page_fn is None:
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)
        body = page_fn(self, lu)
        head = bytes((0x00, page)) + struct.pack(">H", len(body))
        return (head + body)[:alloc]

    def _vpd_supported(self, lu: LogicalUnit) -> bytes:
        return bytes(sorted(self.table.vpd))

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
        handler = self.table.service_actions_in.get(cdb[1] & 0x1F)
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


NexusHandler = Callable[[CommandSet, LogicalUnit, bytes, Nexus], bytes]
VpdPage = Callable[[CommandSet, LogicalUnit], bytes]


@dataclass(frozen=True)
class Family:
    """What a command family adds to the table, each by opcode: ``commands`` answered with a
    data-in buffer; ``parameters``: commands run once their parameter list is in (the connection
    routes them to ``Writes.parameters``); ``service_actions_in``: SERVICE ACTION IN(16) (0x9E)
    by service action; ``nexus``: commands answered per I_T nexus (state kept for the initiator
    port that asked, such as copy results); ``vpd``: INQUIRY's vital product data pages."""

    commands: Mapping[int, Handler] = field(default_factory=dict)
    parameters: Mapping[int, ParameterCommand] = field(default_factory=dict)
    service_actions_in: Mapping[int, Handler] = field(default_factory=dict)
    nexus: Mapping[int, NexusHandler] = field(default_factory=dict)
    vpd: Mapping[int, VpdPage] = field(default_factory=dict)


class CommandTable:
    """Every command of a command set by opcode, from the families it is given."""

    def __init__(self, families: Iterable[Family]) -> None:
        self.handlers: dict[int, Handler] = {}
        self.parameters: dict[int, ParameterCommand] = {}
        self.service_actions_in: dict[int, Handler] = {}
        self.nexus: dict[int, NexusHandler] = {}
        self.vpd: dict[int, VpdPage] = {}
        for family in families:
            self.handlers.update(family.commands)
            self.parameters.update(family.parameters)
            self.service_actions_in.update(family.service_actions_in)
            self.nexus.update(family.nexus)
            self.vpd.update(family.vpd)

    def implemented(self, op: int) -> bool:
        """Commands with this operation code run here (REPORT SUPPORTED OPERATION CODES)."""
        return (
            op in (0x12, 0xA0, 0x03)  # INQUIRY, REPORT LUNS, REQUEST SENSE: answered for any LUN
            or op in READ_OPS
            or op in WRITE_OPS
            or op in VERIFY_OPS
            or op in self.handlers
            or op in self.parameters
            or op in self.nexus
        )


#: The commands of this module: SPC-4 and SBC-3's basics, reservations' entry points.
BASE = Family(
    commands={
        0x00: CommandSet.test_unit_ready,
        0x1A: CommandSet.mode_sense,
        0x5A: CommandSet.mode_sense,
        0x25: CommandSet.read_capacity10,
        0x9E: CommandSet.service_action_in,
        0x34: CommandSet.prefetch,
        0x90: CommandSet.prefetch,
        0x1B: CommandSet.start_stop,
        0x1E: CommandSet.prevent_allow,
    },
    parameters={
        0x5F: ParameterCommand(  # PERSISTENT RESERVE OUT
            lambda cdb: int.from_bytes(cdb[5:9], "big"),
            lambda commands, lu, cdb, parameters, nexus: (
                commands.reservations.persistent_reserve_out(lu, cdb, parameters, nexus)
            ),
        ),
        **{
            op: ParameterCommand(lambda cdb: 0, _synchronize_cache, check=_check_sync, medium=True)
            for op in (0x35, 0x91)  # SYNCHRONIZE CACHE(10), (16): a sync that may wait for a disk
        },
    },
    service_actions_in={0x10: CommandSet.read_capacity16},
    nexus={
        0x5E: CommandSet.persistent_reserve_in,
        0x16: CommandSet.reserve,
        0x56: CommandSet.reserve,
        0x17: CommandSet.release,
        0x57: CommandSet.release,
    },
    vpd={
        0x00: CommandSet._vpd_supported,
        0x80: CommandSet._vpd_serial,
        0x83: CommandSet._vpd_ids,
        0xB1: CommandSet._vpd_characteristics,
    },
)
