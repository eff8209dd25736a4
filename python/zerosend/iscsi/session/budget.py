"""What one session has queued and in flight, and so how many more commands it may take.

A session may have at most ``commands`` commands queued or in progress (``--session-commands``):
a command counts from its dispatch until the kernel released the send carrying its status, so
an initiator that stops reading cannot make the target queue more. While the bytes it has
submitted and not yet released reach ``max_bytes`` (``--session-bytes``) it may take none. Its
CmdSN window (``CmdWindow.room``) is what is left.

What the session holds on the receive side counts in the same bytes: the buffers of parameter
lists being collected (``hold``: past the budget such a command is refused) and the commands
held for their CmdSN (``CmdWindow.held_bytes``: past the budget the session is ended, see
``fits``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from typing import Any

from ..wire.window import CmdWindow

_SN_MASK = 0xFFFFFFFF


class SessionBudget:
    """The statuses and bytes one session has submitted and the kernel not yet released."""

    __slots__ = ("_counted", "bytes", "commands", "lists", "max_bytes", "on_release",
                 "released", "sends", "statuses", "window")  # fmt: skip

    def __init__(self, window: CmdWindow, commands: int, max_bytes: int) -> None:
        self.window = window
        self.commands = commands
        self.max_bytes = max_bytes
        self.statuses = 0  # status PDUs submitted, not yet released
        self.bytes = 0  # bytes submitted, not yet released
        self.sends = 0  # sends submitted, not yet released
        self.released = 0  # sends released so far: the session's progress
        self.lists = 0  # bytes of parameter-list buffers held
        self._counted: int | None = None  # StatSN up to which statuses are counted (submitted)
        self.on_release: Callable[[], None] | None = None

    def start(self) -> None:
        """Login is over: count statuses from the next StatSN on."""
        self._counted = self.window.statsn

    @property
    def held(self) -> int:
        """Bytes held on the receive side: parameter lists, commands held for their CmdSN."""
        return self.lists + self.window.held_bytes

    def fits(self, nbytes: int) -> bool:
        """``nbytes`` more held stay within the budget (or nothing else is held: one always
        fits, so a list larger than the budget is not refused forever)."""
        held = self.held
        return held == 0 or self.bytes + held + nbytes <= self.max_bytes

    def hold(self, nbytes: int) -> bool:
        """Count a parameter-list buffer of ``nbytes``; False (not counted) past the budget."""
        if nbytes and not self.fits(nbytes):
            return False
        self.lists += nbytes
        return True

    def unhold(self, nbytes: int) -> None:
        self.lists -= nbytes

    def room(self, tasks: int) -> int:
        """Commands the session may still take, with ``tasks`` commands in progress."""
        if self.bytes + self.held >= self.max_bytes:
            return 0
        unsent = 0 if self._counted is None else (self.window.statsn - self._counted) & _SN_MASK
        return self.commands - tasks - self.statuses - unsent

    def submitted(self, fut: asyncio.Future[Any], _zerocopy: bool, parts: list[Any]) -> None:
        """A send went to the socket (``Outbox.on_submit``): count it until it is released."""
        if fut.done():  # released within the call (a copy): nothing to count
            if self._counted is not None:
                self._counted = self.window.statsn
            self.released += 1
            if self.on_release is not None:
                self.on_release()
            return
        statuses = 0
        if self._counted is not None:
            statsn = self.window.statsn
            statuses = (statsn - self._counted) & _SN_MASK
            self._counted = statsn
        nbytes = sum(map(len, parts))
        self.statuses += statuses
        self.bytes += nbytes
        self.sends += 1
        fut.add_done_callback(partial(self._released, statuses, nbytes))

    def _released(self, statuses: int, nbytes: int, _fut: asyncio.Future[Any]) -> None:
        self.statuses -= statuses
        self.bytes -= nbytes
        self.sends -= 1
        self.released += 1
        if self.on_release is not None:
            self.on_release()
