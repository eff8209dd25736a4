"""The connection's sequence numbers: StatSN, and the CmdSN window (RFC 7143 4.2.2)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pdu import Pdu

_SERIAL_HALF = 1 << 31


def sn_lt(a: int, b: int) -> bool:
    """Serial number arithmetic (RFC 1982) on 32-bit sequence numbers: a < b."""
    return a != b and ((b - a) & 0xFFFFFFFF) < _SERIAL_HALF


class CmdWindow:
    """ExpCmdSN..MaxCmdSN, the next StatSN, and commands that arrived ahead of ExpCmdSN.

    MaxCmdSN is what the session may still take: ``room()`` commands past the last one it
    received (its limit less what it has in progress or not yet sent), so ExpCmdSN moving on
    at dispatch opens no room by itself. ``maxcmdsn`` is the value last advertised; it never
    moves back (an initiator ignores a smaller one), and a command past it is dropped."""

    __slots__ = ("expcmdsn", "held_bytes", "maxcmdsn", "pending", "room", "statsn")

    def __init__(self, room: Callable[[], int]) -> None:
        self.room = room
        self.statsn = 0
        self.expcmdsn = 0
        self.maxcmdsn = 0
        self.pending: dict[int, Pdu] = {}  # CmdSN -> command waiting for the gap to fill
        self.held_bytes = 0  # their size (the session's budget counts it)

    def open_at(self, cmdsn: int) -> None:
        """Login: the window starts at the initiator's first CmdSN."""
        self.expcmdsn = cmdsn
        self.maxcmdsn = (cmdsn - 1) & 0xFFFFFFFF
        self.slide()

    def slide(self) -> None:
        """Raise MaxCmdSN to what the session may take now (it never moves back)."""
        top = (self.expcmdsn - 1 + max(0, self.room())) & 0xFFFFFFFF
        if sn_lt(self.maxcmdsn, top):
            self.maxcmdsn = top

    @property
    def closed(self) -> bool:
        """The initiator may send no command now (MaxCmdSN = ExpCmdSN - 1)."""
        return sn_lt(self.maxcmdsn, self.expcmdsn)

    def next_statsn(self, advance: bool) -> int:
        """The StatSN for a PDU queued now; ``advance`` for a PDU that carries status."""
        statsn = self.statsn
        if advance:
            self.statsn = (statsn + 1) & 0xFFFFFFFF
        self.slide()  # with this PDU's status counted as not yet sent
        return statsn

    def numbers(self) -> tuple[int, int, int]:
        """(ExpCmdSN, StatSN, MaxCmdSN), as the READ path's inner loop takes them."""
        return self.expcmdsn, self.statsn, self.maxcmdsn

    def set_numbers(self, expcmdsn: int, statsn: int, maxcmdsn: int) -> None:
        self.expcmdsn, self.statsn, self.maxcmdsn = expcmdsn, statsn, maxcmdsn

    def accept(self, cmdsn: int) -> bool:
        """A non-immediate command's CmdSN: True if it is the one expected and inside the
        window (ExpCmdSN moves past it), False if not."""
        if cmdsn != self.expcmdsn or sn_lt(self.maxcmdsn, cmdsn):
            return False
        self.expcmdsn = (cmdsn + 1) & 0xFFFFFFFF
        return True

    def ahead(self, cmdsn: int) -> bool:
        """``cmdsn`` lies inside the window, past ExpCmdSN (``hold`` would keep it)."""
        return sn_lt(self.expcmdsn, cmdsn) and not sn_lt(self.maxcmdsn, cmdsn)

    def hold(self, cmdsn: int, cmd: Pdu) -> bool:
        """Keep a command that arrived ahead of ExpCmdSN until the gap fills; False (and not
        kept) if its CmdSN lies outside the window."""
        if not self.ahead(cmdsn):
            return False
        old = self.pending.get(cmdsn)
        if old is not None:  # the same CmdSN again: the later one is kept
            self.held_bytes -= held_size(old)
        self.pending[cmdsn] = cmd
        self.held_bytes += held_size(cmd)
        return True

    def take_due(self) -> Pdu | None:
        """The held command whose turn it is now (ExpCmdSN moves past it), if any."""
        cmd = self.pending.pop(self.expcmdsn, None)
        if cmd is not None:
            self.expcmdsn = (self.expcmdsn + 1) & 0xFFFFFFFF
            self.held_bytes -= held_size(cmd)
        return cmd


def held_size(cmd: Pdu) -> int:
    """The bytes a command held for its CmdSN keeps (header, AHS, data)."""
    return len(cmd.bhs) + len(cmd.ahs) + len(cmd.data)
