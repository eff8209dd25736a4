"""What the history records: operations, the target's lives (epochs) and the reservation
states known between PERSISTENT RESERVE OUTs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .values import GOOD, Value


@dataclass
class Op:
    """One operation of one initiator. ``writes``: (disk, lba) -> the value it writes there
    (None: a copy, whose value comes from ``copy_from``). ``reads``: (disk, lba) -> the
    value it returned. Times are time.monotonic()."""

    initiator: str
    seq: int
    name: str
    lun: int
    lba: int = 0
    blocks: int = 0
    epoch: int = 0
    nexus: str = ""
    invoked: float = 0.0
    completed: float = math.inf  # inf: no answer (yet)
    outcome: object = None  # SCSI status, UNKNOWN or HUNG
    sense: str = ""
    writes: dict[tuple[int, int], Value | None] = field(default_factory=dict)
    copy_from: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)
    reads: dict[tuple[int, int], Value] = field(default_factory=dict)
    compare: Value | None = None  # COMPARE AND WRITE: the value it expected
    fua: bool = False
    end: float = math.inf  # a write without status cannot land after this
    note: str = ""
    # reservation admission: disks it reads and disks it writes
    reads_disks: tuple[int, ...] = ()
    writes_disks: tuple[int, ...] = ()
    touches: tuple[int, ...] = ()  # LUN numbers it names (the addressed one first)
    # A reload changed one of its LUNs while it ran: which image it reached is not known.
    # It may have written either; its reads and its status decide nothing.
    ambiguous: bool = False

    @property
    def good(self) -> bool:
        return self.outcome == GOOD and not self.ambiguous

    @property
    def effect_end(self) -> float:
        if self.outcome == GOOD:
            return min(self.completed, self.end)
        return self.end

    def __str__(self) -> str:
        done = "never" if self.completed == math.inf else f"{self.completed:.4f}"
        out = self.outcome if not isinstance(self.outcome, int) else f"status {self.outcome:#04x}"
        extra = f" sense {self.sense}" if self.sense else ""
        extra += f" fenced at {self.end:.4f}" if self.end != math.inf else ""
        extra += f" ({self.note})" if self.note else ""
        return (
            f"{self.initiator} #{self.seq} {self.name} lun {self.lun} lba {self.lba}+{self.blocks}"
            f" e{self.epoch} issued {self.invoked:.4f} answered {done}: {out}{extra}"
        )


@dataclass
class Epoch:
    """One life of the target process: what each disk held when it started."""

    number: int
    started: float
    killed: float = math.inf
    initial: dict[tuple[int, int], Value] = field(default_factory=dict)
    final: dict[tuple[int, int], Value] = field(default_factory=dict)  # read after the kill


@dataclass
class PrState:
    """The reservation state of one disk, known from ``since`` (a PR OUT's GOOD and its read
    back) until ``until`` (the next PR OUT issued, a restart or reload)."""

    disk: int
    since: float
    until: float
    registered: frozenset[str]
    holders: frozenset[str]  # every registrant for the all-registrants types
    kind: int  # 0: no reservation
    source: str

    def allows(self, nexus: str, write: bool) -> bool:
        """SPC-4 table 48 for the six persistent reservation types."""
        if not self.kind or nexus in self.holders:
            return True
        registered = nexus in self.registered
        we, ea, we_ro, ea_ro, we_ar, ea_ar = 1, 3, 5, 6, 7, 8
        if self.kind in (we, ea):
            return not write and self.kind == we
        if self.kind in (we_ro, we_ar):
            return registered or not write
        if self.kind in (ea_ro, ea_ar):
            return registered
        return True
