"""The protocols between the target's parts: the target as a session sees it, and the
session as its READ and write paths see it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .config import TargetConfig
    from .login import LoginPolicy
    from .scsi.commands import CommandSet
    from .scsi.unit import LogicalUnit
    from .session import Session
    from .wire.bufpool import MmapPool


class SessionHost(Protocol):
    """The target as its sessions see it: shared resources, and the session registry."""

    @property
    def config(self) -> TargetConfig:
        """The settings; sessions read how to transmit (backend, zero-copy probe)."""

    @property
    def policy(self) -> LoginPolicy:
        """Who may log in, and how."""

    @property
    def luns(self) -> dict[int, LogicalUnit]: ...

    @property
    def commands(self) -> CommandSet:
        """The SCSI commands that are not READ or WRITE."""

    @property
    def pool(self) -> MmapPool:
        """Transmit buffers, shared by every session (each through its ``share()``)."""

    @property
    def stopping(self) -> bool:
        """Shutting down: sessions end once idle."""

    def session_started(self, session: Session, initiator: str, isid: bytes) -> int:
        """A login reached full feature phase: register it (reinstating an older session of
        the same initiator and ISID) and return its TSIH."""

    def session_of(self, initiator: str, isid: bytes) -> Session | None:
        """The logged-in session of this I_T nexus, if any (a new login reinstates it)."""

    def session_ended(self, session: Session) -> None: ...

    def abort_tasks(self, lun: int | None, only: Session | None) -> None:
        """Abort the tasks of ``lun`` (None: all) in session ``only`` (None: in every one)."""

    def reset_logical_units(self, lun: int | None) -> None:
        """LOGICAL UNIT RESET of ``lun`` (None: a target reset): SPC-2 reservations end, every
        nexus gets a unit attention."""

    def reset(self) -> None:
        """TARGET COLD RESET: drop every connection."""

    def others_logged_in(self, session: Session) -> bool:
        """A normal session other than ``session`` is logged in: a reset would reach it."""


class Connection(Protocol):
    """What the READ and write paths need of their session."""

    @property
    def name(self) -> str: ...
    @property
    def closing(self) -> bool: ...
    def abort_connection(self) -> None: ...
