"""The command families a target answers, and its command set built from them: the one place that
knows every family (the table they register into knows none)."""

from __future__ import annotations

from . import atomic, compare_and_write, defects, provisioning, report_opcodes, xcopy
from .commands import BASE, CommandSet, CommandTable, Family
from .reservations import Reservations
from .unit import LogicalUnit

FAMILIES: tuple[Family, ...] = (
    BASE,
    provisioning.FAMILY,
    compare_and_write.FAMILY,
    atomic.FAMILY,
    xcopy.FAMILY,
    defects.FAMILY,
    report_opcodes.FAMILY,
)


def command_set(
    luns: dict[int, LogicalUnit], reservations: Reservations | None = None
) -> CommandSet:
    """A command set for ``luns`` answering every family's commands."""
    return CommandSet(luns, CommandTable(FAMILIES), reservations)
