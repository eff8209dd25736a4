"""The connection's sequence numbers: StatSN, and the CmdSN window (RFC 7143 4.2.2)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pdu import Pdu

# A fixed window: the commands an initiator may have outstanding are bounded by it, and the
# memory they pin by the shared buffer pool. (A window shrunk by busy work would need an
# unsolicited NOP-In to reopen once the work is done, or the initiator stalls.)
CMD_WINDOW = 128
_SERIAL_HALF = 1 << 31


def sn_lt(a: int, b: int) -> bool:
    """Serial number arithmetic (RFC 1982) on 32-bit sequence numbers: a < b."""
    return a != b and ((b - a) & 0xFFFFFFFF) < _SERIAL_HALF


class CmdWindow:
    """ExpCmdSN..MaxCmdSN, the next StatSN, and commands that arrived ahead of ExpCmdSN."""

    __slots__ = ("expcmdsn", "maxcmdsn", "pending", "statsn")

    def __init__(self) -> None:
        self.statsn = 0
        self.expcmdsn = 0
        self.maxcmdsn = 0
        self.pending: dict[int, Pdu] = {}  # CmdSN -> command waiting for the gap to fill

    def open_at(self, cmdsn: int) -> None:
        """Login: the window starts at the initiator's first CmdSN."""
        self.expcmdsn = cmdsn
        self.maxcmdsn = (cmdsn + CMD_WINDOW - 1) & 0xFFFFFFFF

    def slide(self) -> None:
        """Keep MaxCmdSN a whole window past ExpCmdSN (it never moves back)."""
        top = (self.expcmdsn + CMD_WINDOW - 1) & 0xFFFFFFFF
        if sn_lt(self.maxcmdsn, top):
            self.maxcmdsn = top

    def next_statsn(self, advance: bool) -> int:
        """The StatSN for a PDU queued now; ``advance`` for a PDU that carries status."""
        self.slide()
        statsn = self.statsn
        if advance:
            self.statsn = (statsn + 1) & 0xFFFFFFFF
        return statsn

    def numbers(self) -> tuple[int, int, int]:
        """(ExpCmdSN, StatSN, MaxCmdSN), as the READ path's inner loop takes them."""
        return self.expcmdsn, self.statsn, self.maxcmdsn

    def set_numbers(self, expcmdsn: int, statsn: int, maxcmdsn: int) -> None:
        self.expcmdsn, self.statsn, self.maxcmdsn = expcmdsn, statsn, maxcmdsn

    def accept(self, cmdsn: int) -> bool:
        """A non-immediate command's CmdSN: True if it is the one expected (ExpCmdSN moves
        past it), False if not."""
        if cmdsn != self.expcmdsn:
            return False
        self.expcmdsn = (cmdsn + 1) & 0xFFFFFFFF
        return True

    def hold(self, cmdsn: int, cmd: Pdu) -> bool:
        """Keep a command that arrived ahead of ExpCmdSN until the gap fills; False (and not
        kept) if its CmdSN lies outside the window."""
        if not (sn_lt(self.expcmdsn, cmdsn) and not sn_lt(self.maxcmdsn, cmdsn)):
            return False
        self.pending[cmdsn] = cmd
        return True

    def take_due(self) -> Pdu | None:
        """The held command whose turn it is now (ExpCmdSN moves past it), if any."""
        cmd = self.pending.pop(self.expcmdsn, None)
        if cmd is not None:
            self.expcmdsn = (self.expcmdsn + 1) & 0xFFFFFFFF
        return cmd
