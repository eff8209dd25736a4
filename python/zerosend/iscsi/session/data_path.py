"""The connection as its READ and write paths see it: what they need of their session."""

from __future__ import annotations

from typing import Protocol


class Connection(Protocol):
    """What the READ and write paths need of their session."""

    @property
    def name(self) -> str: ...
    @property
    def closing(self) -> bool: ...
    def abort_connection(self) -> None: ...
