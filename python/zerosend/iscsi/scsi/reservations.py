"""Reservations of the logical units: persistent reservations (SPC-4, PERSISTENT RESERVE
IN/OUT), SPC-2 reservations (RESERVE/RELEASE 6 and 10), the unit attentions they and resets
raise for the other I_T nexuses, and the state file that keeps persistent reservations across a
restart when an initiator asked for it (APTPL). One concept: every rule here decides whether an
I_T nexus may use a logical unit now, and all of them read and change the same registrations.

Registrations belong to an I_T nexus: the initiator port (iSCSI name + ISID) and the target
port. SPC-4 keeps them across the loss of the nexus (logout, dropped connection, reset): an
initiator that logs in again with the same name and ISID is the same nexus and finds its
registration and reservation. A login with a new ISID is a new initiator port and so a new
I_T nexus: it is not registered, and it sees the reservation as any other unregistered nexus
does, until it registers itself. SPC-2 reservations end with the nexus, with a logical unit
reset and with a target reset.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..storage import diskio
from .nexus import Nexus
from .sense import (
    HARDWARE_ERROR,
    ILLEGAL_REQUEST,
    INTERNAL_FAILURE,
    INVALID_FIELD_IN_CDB,
    INVALID_FIELD_IN_PARAMS,
    RESERVATION_CONFLICT,
    UNIT_ATTENTION,
    CheckCondition,
    StatusReply,
)
from .unit import READ10, READ_OPS, VERIFY_OPS, WRITE10, LogicalUnit

log = logging.getLogger("zerosend.iscsi")

PERSISTENT_RESERVE_IN, PERSISTENT_RESERVE_OUT = 0x5E, 0x5F
RESERVE6, RELEASE6, RESERVE10, RELEASE10 = 0x16, 0x17, 0x56, 0x57
LEGACY_OPS = frozenset((RESERVE6, RELEASE6, RESERVE10, RELEASE10))

# Persistent reservation types (the TYPE field of PERSISTENT RESERVE OUT)
WRITE_EXCLUSIVE = 0x1
EXCLUSIVE_ACCESS = 0x3
WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 0x5
EXCLUSIVE_ACCESS_REGISTRANTS_ONLY = 0x6
WRITE_EXCLUSIVE_ALL_REGISTRANTS = 0x7
EXCLUSIVE_ACCESS_ALL_REGISTRANTS = 0x8
TYPE_NAMES = {1: "WE", 3: "EA", 5: "WE-RO", 6: "EA-RO", 7: "WE-AR", 8: "EA-AR"}
TYPES = frozenset(TYPE_NAMES)
_ALL_REGISTRANTS = frozenset((7, 8))
_WRITE_EXCLUSIVE = frozenset((1, 5, 7))  # the others exclude reads as well

# PERSISTENT RESERVE IN service actions
READ_KEYS, READ_RESERVATION, REPORT_CAPABILITIES, READ_FULL_STATUS = 0, 1, 2, 3
# PERSISTENT RESERVE OUT service actions
REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_AND_ABORT = 0, 1, 2, 3, 4, 5
REGISTER_AND_IGNORE_EXISTING_KEY, REGISTER_AND_MOVE = 6, 7
ACTION_NAMES = ("REGISTER", "RESERVE", "RELEASE", "CLEAR", "PREEMPT", "PREEMPT AND ABORT",
                "REGISTER AND IGNORE EXISTING KEY", "REGISTER AND MOVE")  # fmt: skip

# Unit attentions (ASC, ASCQ)
RESET_OCCURRED = (0x29, 0x00)  # POWER ON, RESET, OR BUS DEVICE RESET OCCURRED
RESERVATIONS_PREEMPTED = (0x2A, 0x03)
RESERVATIONS_RELEASED = (0x2A, 0x04)
REGISTRATIONS_PREEMPTED = (0x2A, 0x05)
REPORTED_LUNS_DATA_CHANGED = (0x3F, 0x0E)
# Other sense codes
PARAMETER_LIST_LENGTH_ERROR = (0x1A, 0x00)
INVALID_RELEASE = (0x26, 0x04)  # INVALID RELEASE OF PERSISTENT RESERVATION
INSUFFICIENT_REGISTRATION_RESOURCES = (0x55, 0x04)

BASIC_PARAMETERS = 24  # the PERSISTENT RESERVE OUT parameter list without TransportIDs
MAX_REGISTRATIONS = 256  # per logical unit
MAX_ATTENTIONS = 8  # pending per I_T nexus and logical unit; older ones are dropped
ISCSI_PROTOCOL = 0x5
TARGET_PORT = 1  # the relative target port identifier of the one portal group

# Commands a nexus may run whatever the reservation (SPC-4's and SBC-3's tables of commands
# allowed in the presence of persistent reservations); PERSISTENT RESERVE OUT follows its own
# rules, RESERVE and RELEASE the SPC-2 ones.
_ALWAYS = (
    frozenset((0x00, 0x03, 0x12, 0x25, 0x4D, 0xA0, PERSISTENT_RESERVE_IN, PERSISTENT_RESERVE_OUT))
    | LEGACY_OPS
)
# Commands that only read: allowed through Write Exclusive reservations, refused by Exclusive
# Access ones (READ, VERIFY, PRE-FETCH, MODE SENSE, READ BUFFER, RECEIVE DIAGNOSTIC RESULTS,
# READ DEFECT DATA, READ LONG, READ ATTRIBUTE, RECEIVE COPY RESULTS).
_READS = (
    READ_OPS
    | VERIFY_OPS
    | frozenset((0x34, 0x90, 0x1A, 0x5A, 0x3C, 0x1C, 0x37, 0xB7, 0x3E, 0x8C, 0x84))
)
_SERVICE_ACTION_IN = 0x9E  # READ CAPACITY(16) is allowed, GET LBA STATUS only reads
_MAINTENANCE_IN = 0xA3  # REPORT TARGET PORT GROUPS is allowed; the REPORT SUPPORTED ... read
# Commands a nexus may still send to a logical unit another nexus reserved with RESERVE
_LEGACY_ALLOWED = frozenset((0x03, 0x12, 0xA0, RELEASE6, RELEASE10))
_NO_ATTENTION = frozenset((0x03, 0x12, 0xA0))  # INQUIRY, REPORT LUNS, REQUEST SENSE (SAM-5)
# How a copy's reads and writes of a LUN are judged: as READ(10) and WRITE(10)
_MEDIUM_READ, _MEDIUM_WRITE = bytes((READ10,)) + bytes(9), bytes((WRITE10,)) + bytes(9)


def _access(cdb: bytes) -> str:
    """How a command touches the medium, for the reservation rules: "any" (never conflicts),
    "read" (conflicts with Exclusive Access types only) or "write"."""
    op = cdb[0]
    if op in _ALWAYS:
        return "any"
    if op in _READS:
        return "read"
    if op == _SERVICE_ACTION_IN:
        return "any" if cdb[1] & 0x1F == 0x10 else "read"
    if op == _MAINTENANCE_IN:
        return "any" if cdb[1] & 0x1F == 0x0A else "read"
    if op == 0x1B and cdb[4] & 0x01 and not cdb[4] & 0xF0:  # START STOP UNIT: start only
        return "any"
    if op == 0x1E and not cdb[4] & 0x03:  # PREVENT ALLOW MEDIUM REMOVAL: allow
        return "any"
    return "write"


def _conflict() -> StatusReply:
    return StatusReply(RESERVATION_CONFLICT)


def _invalid_cdb() -> CheckCondition:
    return CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)


def _invalid_parameters() -> CheckCondition:
    return CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_PARAMS)


def transport_id(nexus: Nexus) -> bytes:
    """The iSCSI TransportID of an initiator port (SPC-4, format 01b): the name, ",i,0x"
    and the ISID, NUL-terminated and padded to a multiple of four (at least 20 bytes)."""
    name = nexus.initiator_port.encode() + b"\0"
    name += b"\0" * (-len(name) % 4)
    name += b"\0" * max(0, 20 - len(name))
    return bytes((0x40 | ISCSI_PROTOCOL, 0)) + struct.pack(">H", len(name)) + name


def parse_transport_id(data: bytes) -> Nexus:
    """The initiator port an iSCSI TransportID (format 01b) names; CheckCondition otherwise."""
    if len(data) < 4 or data[0] != 0x40 | ISCSI_PROTOCOL:
        raise _invalid_parameters()
    (length,) = struct.unpack_from(">H", data, 2)
    text = data[4 : 4 + length].split(b"\0", 1)[0].decode(errors="replace")
    name, sep, isid = text.rpartition(",i,0x")
    if not sep or not name or len(isid) != 12:
        raise _invalid_parameters()
    try:
        return Nexus(name, bytes.fromhex(isid))
    except ValueError:
        raise _invalid_parameters() from None


@dataclass
class UnitState:
    """The reservations of one logical unit."""

    lu: LogicalUnit
    generation: int = 0  # PRgeneration: counts the PERSISTENT RESERVE OUTs that changed things
    registrations: dict[Nexus, int] = field(default_factory=dict)  # in registration order
    type: int = 0  # the persistent reservation's type; 0: none
    holder: Nexus | None = None  # its holder, for the types other than all registrants
    aptpl: bool = False  # the last APTPL bit received: the state survives a restart
    legacy_holder: Nexus | None = None  # the holder of an SPC-2 reservation

    @property
    def key(self) -> str:
        """The unit's name in the state file: its LUN and its image."""
        return f"{self.lu.number}:{self.lu.store.name}"

    def holds(self, nexus: Nexus) -> bool:
        """``nexus`` holds the persistent reservation (every registrant does, for the all
        registrants types)."""
        if self.type in _ALL_REGISTRANTS:
            return nexus in self.registrations
        return self.type != 0 and self.holder == nexus

    def reservation_key(self) -> int:
        """The key READ RESERVATION reports: the holder's, or 0 for all registrants types."""
        if self.type in _ALL_REGISTRANTS or self.holder is None:
            return 0
        return self.registrations[self.holder]

    def release(self) -> None:
        self.type, self.holder = 0, None

    def describe(self) -> str:
        held = "no reservation"
        if self.type:
            who = "all registrants" if self.holder is None else self.holder.initiator_port
            held = f"{TYPE_NAMES[self.type]} reservation held by {who}"
        persist = ", kept across restarts" if self.aptpl else ""
        return f"{len(self.registrations)} registered, {held}{persist}"

    def check_access(self, cdb: bytes, nexus: Nexus) -> None:
        """Raise RESERVATION CONFLICT when ``nexus`` may not run ``cdb`` now."""
        op = cdb[0]
        if self.legacy_holder is not None:
            if self.legacy_holder == nexus:
                # SPC-4: under an SPC-2 reservation every PERSISTENT RESERVE command
                # conflicts, whoever sends it.
                if op in (PERSISTENT_RESERVE_IN, PERSISTENT_RESERVE_OUT):
                    raise _conflict()
            elif op not in _LEGACY_ALLOWED:
                raise _conflict()
            return
        if op in LEGACY_OPS and self.registrations:
            # ... and while any nexus is registered, every RESERVE and RELEASE conflicts.
            raise _conflict()
        if self.type == 0 or self.holds(nexus):
            return
        if self.type not in (WRITE_EXCLUSIVE, EXCLUSIVE_ACCESS) and nexus in self.registrations:
            return  # registrants only: every registrant has access
        access = _access(cdb)
        if access == "write" or (access == "read" and self.type not in _WRITE_EXCLUSIVE):
            raise _conflict()

    @property
    def restricts(self) -> bool:
        """Some command of some nexus may conflict."""
        return self.type != 0 or self.legacy_holder is not None or bool(self.registrations)

    @property
    def may_refuse_reads(self) -> bool:
        """A READ of some nexus may conflict."""
        return self.legacy_holder is not None or self.type not in _WRITE_EXCLUSIVE | {0}

    # -- the state file

    def dump(self) -> dict[str, Any]:
        order = list(self.registrations)
        return {
            "generation": self.generation,
            "type": self.type,
            "holder": order.index(self.holder) if self.holder in self.registrations else None,
            "registrations": [
                {"initiator": n.initiator, "isid": n.isid.hex(), "tpgt": n.tpgt, "key": key}
                for n, key in self.registrations.items()
            ],
        }

    def restore(self, saved: Any) -> None:
        """The saved state; raises ValueError (or KeyError, TypeError) on a malformed one."""
        generation, kind, holder = saved["generation"], saved["type"], saved["holder"]
        if not isinstance(generation, int) or kind not in TYPES | {0}:
            raise ValueError(f"generation {generation!r}, type {kind!r}")
        registrations: dict[Nexus, int] = {}
        for r in saved["registrations"]:
            nexus = Nexus(str(r["initiator"]), bytes.fromhex(r["isid"]), int(r["tpgt"]))
            key = r["key"]
            if not isinstance(key, int) or not 0 < key < 1 << 64 or len(nexus.isid) != 6:
                raise ValueError(f"registration {r!r}")
            registrations[nexus] = key
        order = list(registrations)
        if (
            kind
            and kind not in _ALL_REGISTRANTS
            and not (isinstance(holder, int) and 0 <= holder < len(order))
        ):
            raise ValueError(f"holder {holder!r}")
        self.generation = generation & 0xFFFFFFFF
        self.registrations = registrations
        self.type = kind if registrations else 0
        self.holder = order[holder] if self.type and self.type not in _ALL_REGISTRANTS else None
        self.aptpl = True


@dataclass
class _Effects:
    """What a PERSISTENT RESERVE OUT does besides changing the state: done once the new state
    is saved."""

    attentions: list[tuple[Nexus, tuple[int, int]]] = field(default_factory=list)
    aborted: list[Nexus] = field(default_factory=list)

    def notify(self, nexuses: Iterable[Nexus], code: tuple[int, int], sender: Nexus) -> None:
        self.attentions += [(n, code) for n in nexuses if n != sender]


class Reservations:
    """The reservations of every logical unit of the target, and the unit attentions pending
    per I_T nexus. ``state_path``: where persistent reservations with APTPL are kept (None:
    APTPL is not offered). ``abort_tasks(nexus, lun)`` aborts the tasks of a nexus (PREEMPT AND
    ABORT)."""

    def __init__(
        self,
        luns: dict[int, LogicalUnit],
        state_path: str | None = None,
        abort_tasks: Callable[[Nexus, int], None] | None = None,
    ) -> None:
        self.units = {number: UnitState(lu) for number, lu in luns.items()}
        self.state_path = state_path
        self.abort_tasks = abort_tasks or (lambda nexus, lun: None)
        self._attentions: dict[tuple[int, Nexus], list[tuple[int, int]]] = {}
        self._other_saved: dict[str, Any] = {}  # saved units of images not served now
        self._saving = False  # a PERSISTENT RESERVE OUT's state is being written
        self._turns: deque[asyncio.Future[None]] = deque()  # the ones waiting meanwhile
        if state_path is not None:
            self._load(state_path)

    # -- admission

    def admit(self, lu: LogicalUnit, cdb: bytes, nexus: Nexus) -> None:
        """Raise the pending unit attention of ``nexus``, or RESERVATION CONFLICT."""
        lun = lu.number
        if self._attentions and cdb[0] not in _NO_ATTENTION:
            pending = self._attentions.get((lun, nexus))
            if pending:
                code = pending.pop(0)
                if not pending:
                    del self._attentions[(lun, nexus)]
                    self._update_guard(lun)
                raise CheckCondition(UNIT_ATTENTION, code)
        unit = self.units[lun]
        if unit.restricts:
            unit.check_access(cdb, nexus)

    def admit_medium(self, lu: LogicalUnit, nexus: Nexus, writes: bool) -> None:
        """RESERVATION CONFLICT when ``nexus`` may not read (or write) ``lu``'s medium: for
        EXTENDED COPY, which reads and writes LUNs it is not addressed to, judged as a READ or
        WRITE of the same nexus would be. (Unit attentions are reported by the addressed LUN.)"""
        unit = self.units[lu.number]
        if unit.restricts:
            unit.check_access(_MEDIUM_WRITE if writes else _MEDIUM_READ, nexus)

    def _attend(self, lun: int, nexus: Nexus, code: tuple[int, int]) -> None:
        pending = self._attentions.setdefault((lun, nexus), [])
        if code not in pending:
            pending.append(code)
            del pending[:-MAX_ATTENTIONS]
        self.units[lun].lu.admission_required = True

    def _update_guard(self, lun: int) -> None:
        """The READ fast path skips admission while nothing could refuse a command."""
        unit = self.units[lun]
        unit.lu.admission_required = unit.may_refuse_reads or any(
            key[0] == lun for key in self._attentions
        )

    # -- reload

    def luns_changed(self, gone: Iterable[int], added: dict[int, LogicalUnit]) -> None:
        """A reload took away the LUNs ``gone`` (removed or replaced) and brought ``added``.
        The reservations of a LUN go with it (those kept across restarts stay in the state
        file, for when its image is served again) and so do its pending unit attentions; an
        added LUN starts with none, or with the ones its image kept across restarts."""
        for lun in gone:
            unit = self.units.pop(lun)
            if unit.aptpl:
                self._other_saved[unit.key] = unit.dump()
            for pending in [k for k in self._attentions if k[0] == lun]:
                del self._attentions[pending]
        for lun, lu in added.items():
            unit = self.units[lun] = UnitState(lu)
            saved = self._other_saved.get(unit.key)
            if saved is not None:
                try:
                    unit.restore(saved)
                except (ValueError, KeyError, TypeError, AttributeError) as e:
                    unit = self.units[lun] = UnitState(lu)
                    log.error("reservation state %s: the entry of %s is corrupt (%s: %s); LUN "
                              "%d starts with no reservations, the entry is kept", self.state_path,
                              unit.key, type(e).__name__, e, lun)  # fmt: skip
                else:
                    del self._other_saved[unit.key]
                    log.info("LUN %d: persistent reservations restored: %s", lun,
                             unit.describe())  # fmt: skip
            self._update_guard(lun)

    def inventory_changed(self, nexuses: Iterable[Nexus]) -> None:
        """LUNs were added or removed: every logical unit tells every nexus REPORTED LUNS DATA
        HAS CHANGED (SAM-5 5.15), so initiators rescan instead of missing the new LUNs."""
        nexuses = list(nexuses)
        for number in self.units:
            for nexus in nexuses:
                self._attend(number, nexus, REPORTED_LUNS_DATA_CHANGED)
            self._update_guard(number)

    # -- nexus loss and resets

    def nexus_lost(self, nexus: Nexus) -> None:
        """The I_T nexus ended: its SPC-2 reservations end with it, its unit attentions too.
        Persistent reservations and registrations stay (SPC-4)."""
        for lun, unit in self.units.items():
            if unit.legacy_holder == nexus:
                unit.legacy_holder = None
            self._attentions.pop((lun, nexus), None)
            self._update_guard(lun)

    def reset(self, lun: int | None, nexuses: Iterable[Nexus]) -> None:
        """A logical unit reset (of ``lun``) or a target reset (None): SPC-2 reservations end
        and every nexus is told of the reset by a unit attention."""
        targets = self.units if lun is None else {lun: self.units[lun]}
        nexuses = list(nexuses)
        for number, unit in targets.items():
            unit.legacy_holder = None
            for nexus in nexuses:
                self._attend(number, nexus, RESET_OCCURRED)
            self._update_guard(number)

    # -- RESERVE and RELEASE (SPC-2)

    def reserve(self, lu: LogicalUnit, cdb: bytes, nexus: Nexus) -> None:
        """RESERVE(6/10) of the whole logical unit (no extents, no third party)."""
        if (cdb[0] == RESERVE6 and cdb[1] & 0x01) or (cdb[0] == RESERVE10 and cdb[1] & 0x12):
            raise _invalid_cdb()
        unit = self.units[lu.number]
        # admit() refused every other nexus already, and every nexus while one is registered.
        unit.legacy_holder = nexus
        self._update_guard(lu.number)

    def release(self, lu: LogicalUnit, cdb: bytes, nexus: Nexus) -> None:
        """RELEASE(6/10): ends the caller's reservation; from another nexus, it does nothing."""
        if (cdb[0] == RELEASE6 and cdb[1] & 0x01) or (cdb[0] == RELEASE10 and cdb[1] & 0x12):
            raise _invalid_cdb()
        unit = self.units[lu.number]
        if unit.legacy_holder == nexus:
            unit.legacy_holder = None
            self._update_guard(lu.number)

    # -- PERSISTENT RESERVE IN

    def persistent_reserve_in(self, lu: LogicalUnit, cdb: bytes) -> bytes:
        unit = self.units[lu.number]
        action = cdb[1] & 0x1F
        (alloc,) = struct.unpack_from(">H", cdb, 7)
        generation = unit.generation
        if action == READ_KEYS:
            keys = b"".join(struct.pack(">Q", k) for k in unit.registrations.values())
            data = struct.pack(">II", generation, len(keys)) + keys
        elif action == READ_RESERVATION:
            body = b""
            if unit.type:
                body = struct.pack(">Q4xxB2x", unit.reservation_key(), unit.type)
            data = struct.pack(">II", generation, len(body)) + body
        elif action == REPORT_CAPABILITIES:
            # ATP_C (one target port: all of them is this one), PTPL_C when there is a state
            # file; TMV, ALLOW COMMANDS 010b (see _access), PTPL_A; the six types.
            capable = 0x04 | (0x01 if self.state_path else 0)
            active = 0x80 | (0x2 << 4) | (0x01 if unit.aptpl else 0)
            data = struct.pack(">HBBBBH", 8, capable, active, 0xEA, 0x01, 0)
        elif action == READ_FULL_STATUS:
            out = bytearray()
            for nexus, key in unit.registrations.items():
                holder = unit.holds(nexus)
                tid = transport_id(nexus)
                out += struct.pack(">Q4xBB4xHI", key, 0x01 if holder else 0,
                                   unit.type if holder else 0, TARGET_PORT, len(tid))  # fmt: skip
                out += tid
            data = struct.pack(">II", generation, len(out)) + out
        else:
            raise _invalid_cdb()
        return data[:alloc]

    # -- PERSISTENT RESERVE OUT

    def persistent_reserve_out(
        self, lu: LogicalUnit, cdb: bytes, parameters: bytes, nexus: Nexus
    ) -> Awaitable[None] | None:
        """PERSISTENT RESERVE OUT; raises CheckCondition or StatusReply. None: done, the
        command's GOOD may go now. Otherwise the command ends with the coroutine returned: once
        the new state is durable in the state file (written by a thread, never on the event
        loop) and, for PREEMPT AND ABORT, once the preempted nexuses' writes already in a
        disk's hands landed (after the GOOD, nothing of theirs may reach the medium). While a
        save is under way, later PERSISTENT RESERVE OUTs wait their turn, in order: each one
        judges the state the previous one left, and the file is written in the same order."""
        if self._saving or self._turns:
            return self._in_turn(lu, cdb, parameters, nexus)
        return self._out(lu, cdb, parameters, nexus)

    async def _in_turn(self, lu: LogicalUnit, cdb: bytes, parameters: bytes, nexus: Nexus) -> None:
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._turns.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            self._turns.remove(turn)
            self._next_turn()  # (it may have been this one's turn)
            raise
        self._turns.remove(turn)
        try:
            later = self._out(lu, cdb, parameters, nexus)
        finally:
            self._next_turn()  # (none goes while this one is saving)
        if later is not None:
            await later

    def _next_turn(self) -> None:
        if not self._saving and self._turns and not self._turns[0].done():
            self._turns[0].set_result(None)

    def _out(
        self, lu: LogicalUnit, cdb: bytes, parameters: bytes, nexus: Nexus
    ) -> Awaitable[None] | None:
        unit = self.units[lu.number]
        action = cdb[1] & 0x1F
        scope, kind = cdb[2] >> 4, cdb[2] & 0x0F
        if action > REGISTER_AND_MOVE:
            raise _invalid_cdb()
        if len(parameters) < BASIC_PARAMETERS or (
            action != REGISTER_AND_MOVE and len(parameters) != BASIC_PARAMETERS
        ):
            raise CheckCondition(ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
        key, service_key = struct.unpack_from(">QQ", parameters)
        if action == REGISTER_AND_MOVE:
            aptpl = bool(parameters[17] & 0x01)
        else:
            if parameters[20] & 0x08:  # SPEC_I_PT: registering other nexuses is not offered
                raise _invalid_parameters()
            aptpl = bool(parameters[20] & 0x01)
        if aptpl and self.state_path is None and action in (
            REGISTER, REGISTER_AND_IGNORE_EXISTING_KEY, REGISTER_AND_MOVE
        ):  # fmt: skip
            raise _invalid_parameters()  # PTPL_C is 0: nowhere to keep the state
        registered = unit.registrations.get(nexus)
        if action in (REGISTER, REGISTER_AND_IGNORE_EXISTING_KEY):
            if action == REGISTER and key != (registered or 0):
                raise _conflict()
            if registered is None and service_key == 0:
                return None  # unregistering a nexus that is not registered: nothing to do
        elif registered is None or key != registered:
            raise _conflict()
        if action in (RESERVE, RELEASE) or (action in (PREEMPT, PREEMPT_AND_ABORT) and unit.type):
            if scope != 0:
                raise _invalid_cdb()
            if kind not in TYPES:
                raise _invalid_cdb()
        before = (unit.generation, dict(unit.registrations), unit.type, unit.holder, unit.aptpl)
        effects = _Effects()
        changes = True
        if action in (REGISTER, REGISTER_AND_IGNORE_EXISTING_KEY):
            self._register(unit, nexus, service_key, effects)
            unit.aptpl = aptpl
        elif action == RESERVE:
            self._reserve(unit, nexus, kind)
            changes = False
        elif action == RELEASE:
            self._release(unit, nexus, kind, effects)
            changes = False
        elif action == CLEAR:
            effects.notify(unit.registrations, RESERVATIONS_PREEMPTED, nexus)
            unit.registrations.clear()
            unit.release()
        elif action in (PREEMPT, PREEMPT_AND_ABORT):
            gone = self._preempt(unit, nexus, service_key, kind, effects)
            if action == PREEMPT_AND_ABORT:
                effects.aborted = [n for n in gone if n != nexus]
        else:
            self._move(unit, nexus, service_key, parameters)
            unit.aptpl = aptpl
        if changes:
            unit.generation = (unit.generation + 1) & 0xFFFFFFFF
        self._update_guard(lu.number)  # commands are judged by the new state from now on
        what = f"{ACTION_NAMES[action]} from {nexus.initiator_port}"
        if unit.aptpl or before[4]:
            self._saving = True
            return self._saved(unit, before, self._state_text(), effects, what)
        return self._effects(unit, effects, what)

    async def _saved(
        self,
        unit: UnitState,
        before: tuple[int, dict[Nexus, int], int, Nexus | None, bool],
        text: str,
        effects: _Effects,
        what: str,
    ) -> None:
        """The state file written with ``text``; then the command's effects. If it cannot be
        written, the unit goes back to ``before`` and the command fails."""
        lun = unit.lu.number
        try:
            try:
                await asyncio.get_running_loop().run_in_executor(None, self._write_state, text)
            except OSError as e:
                log.error("cannot save the reservations to %s: %s", self.state_path, e)
                unit.generation, unit.registrations, unit.type, unit.holder, unit.aptpl = before
                if self.units.get(lun) is unit:
                    self._update_guard(lun)
                raise CheckCondition(HARDWARE_ERROR, INTERNAL_FAILURE) from e
            later = self._effects(unit, effects, what)
        finally:
            self._saving = False
            self._next_turn()
        if later is not None:
            await later

    def _effects(self, unit: UnitState, effects: _Effects, what: str) -> Awaitable[None] | None:
        """Unit attentions, and the aborts of PREEMPT AND ABORT: what waits for their writes
        already in a disk's hands (None: nothing)."""
        lun = unit.lu.number
        if self.units.get(lun) is not unit:
            return None  # a reload took the LUN away while its state was being saved
        for other, code in effects.attentions:
            self._attend(lun, other, code)
        for other in dict.fromkeys(effects.aborted):
            self.abort_tasks(other, lun)
        self._update_guard(lun)
        log.info("LUN %d: PERSISTENT RESERVE OUT %s: %s", lun, what, unit.describe())
        if not effects.aborted:
            return None
        landing = diskio.changes([unit.lu.store])
        return _landed(landing) if landing else None

    def _register(self, unit: UnitState, nexus: Nexus, service_key: int, fx: _Effects) -> None:
        if service_key:
            if nexus not in unit.registrations and len(unit.registrations) >= MAX_REGISTRATIONS:
                raise CheckCondition(ILLEGAL_REQUEST, INSUFFICIENT_REGISTRATION_RESOURCES)
            unit.registrations[nexus] = service_key
            return
        # Unregistering: the holder's reservation goes with it (for all registrants types,
        # with the last registrant); registrants only types tell the others it was released.
        kind, holds = unit.type, unit.holds(nexus)
        del unit.registrations[nexus]
        if holds and (kind not in _ALL_REGISTRANTS or not unit.registrations):
            unit.release()
            if kind in (WRITE_EXCLUSIVE_REGISTRANTS_ONLY, EXCLUSIVE_ACCESS_REGISTRANTS_ONLY):
                fx.notify(unit.registrations, RESERVATIONS_RELEASED, nexus)

    def _reserve(self, unit: UnitState, nexus: Nexus, kind: int) -> None:
        if unit.type == 0:
            unit.type = kind
            unit.holder = None if kind in _ALL_REGISTRANTS else nexus
        elif not unit.holds(nexus) or unit.type != kind:
            raise _conflict()

    def _release(self, unit: UnitState, nexus: Nexus, kind: int, fx: _Effects) -> None:
        if not unit.holds(nexus):
            return  # no reservation, or another nexus's: nothing to release
        if kind != unit.type:
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_RELEASE)
        if unit.type not in (WRITE_EXCLUSIVE, EXCLUSIVE_ACCESS):
            fx.notify(unit.registrations, RESERVATIONS_RELEASED, nexus)
        unit.release()

    def _preempt(
        self, unit: UnitState, nexus: Nexus, service_key: int, kind: int, fx: _Effects
    ) -> list[Nexus]:
        """PREEMPT (SPC-4): remove the registrations of ``service_key`` and, when it
        is the reservation's key (or 0 for an all registrants reservation), take over the
        reservation with type ``kind``. Returns the nexuses whose registrations went."""
        old_type = unit.type
        if old_type in _ALL_REGISTRANTS:
            takes_over = service_key == 0
        else:
            takes_over = old_type != 0 and service_key == unit.reservation_key()
        if service_key == 0 and not takes_over:
            raise _invalid_parameters()
        if takes_over:
            gone = [n for n, k in unit.registrations.items()
                    if n != nexus and (service_key == 0 or k == service_key)]  # fmt: skip
        else:
            gone = [n for n, k in unit.registrations.items() if k == service_key]
            if not gone:
                raise _conflict()
        for other in gone:
            del unit.registrations[other]
        fx.notify(gone, REGISTRATIONS_PREEMPTED, nexus)
        if takes_over:
            unit.type = kind
            unit.holder = None if kind in _ALL_REGISTRANTS else nexus
            if kind != old_type:
                fx.notify(unit.registrations, RESERVATIONS_RELEASED, nexus)
        elif unit.type and not unit.registrations:
            unit.release()  # an all registrants reservation loses its last registrant
        return gone

    def _move(self, unit: UnitState, nexus: Nexus, service_key: int, parameters: bytes) -> None:
        """REGISTER AND MOVE: register the nexus a TransportID names and hand it the
        reservation; UNREG also unregisters the sender."""
        if not unit.holds(nexus) or unit.type in _ALL_REGISTRANTS:
            raise _conflict()
        (port, length) = struct.unpack_from(">HI", parameters, 18)
        if len(parameters) != BASIC_PARAMETERS + length:
            raise CheckCondition(ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
        if service_key == 0 or port != TARGET_PORT:
            raise _invalid_parameters()
        destination = parse_transport_id(parameters[BASIC_PARAMETERS:])
        if destination == nexus:
            raise _invalid_parameters()
        if destination not in unit.registrations and len(unit.registrations) >= MAX_REGISTRATIONS:
            raise CheckCondition(ILLEGAL_REQUEST, INSUFFICIENT_REGISTRATION_RESOURCES)
        unit.registrations[destination] = service_key
        unit.holder = destination
        if parameters[17] & 0x02:  # UNREG
            del unit.registrations[nexus]

    # -- the state file

    def _load(self, path: str) -> None:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            log.info("no saved persistent reservations at %s: starting with none", path)
            return
        except OSError as e:
            raise ValueError(f"cannot read the reservation state {path}: {e.strerror}") from e
        try:
            saved = json.loads(text)
            if saved.get("format") != "zerosend-iscsi reservations" or saved["version"] != 1:
                raise ValueError("not a reservation state file of version 1")
            units = dict(saved["units"])
            by_key = {unit.key: unit for unit in self.units.values()}
            for key, state in units.items():
                if key in by_key:
                    by_key[key].restore(state)
                    self._update_guard(by_key[key].lu.number)
                else:
                    self._other_saved[key] = state
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(
                f"reservation state {path} is corrupt ({type(e).__name__}: {e}); it holds the "
                "persistent reservations initiators asked to keep across restarts: restore it, "
                "or move it aside to start with none"
            ) from e
        for key in self._other_saved:
            log.warning("reservation state %s: %s is not served now; its entry is kept", path, key)
        restored = [u.key for u in self.units.values() if u.aptpl]
        if restored:
            log.info("persistent reservations restored from %s for %s", path, ", ".join(restored))

    def _state_text(self) -> str:
        """The state file's text: every unit whose last APTPL was set, and the saved units
        of images not served now."""
        units = dict(self._other_saved)
        units.update({u.key: u.dump() for u in self.units.values() if u.aptpl})
        return json.dumps(
            {"format": "zerosend-iscsi reservations", "version": 1, "units": units}, indent=1
        )

    def _write_state(self, text: str) -> None:
        """Write the state file (in a thread: it waits for the disk): a temporary file, fsync,
        rename over the old one, fsync of the directory."""
        assert self.state_path is not None
        path = self.state_path
        directory = os.path.dirname(os.path.abspath(path))
        temporary = f"{path}.tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


async def _landed(landing: list[asyncio.Future[Any]]) -> None:
    await asyncio.wait(landing)
