"""The connection as its READ and write paths see it: what they need of their session."""

from __future__ import annotations

from collections.abc import Container, Sequence
from typing import Protocol

from .latency import LunLatency


class Connection(Protocol):
    """What the READ and write paths need of their session."""

    @property
    def name(self) -> str: ...
    @property
    def closing(self) -> bool: ...
    def abort_connection(self) -> None: ...
    def itts_in_progress(self) -> Sequence[Container[int]] | None:
        """The ITTs of the tasks in progress (None when there are none): a new command that
        reuses one is rejected (RFC 7143 11.17.1)."""
        ...

    @property
    def latency(self) -> dict[int, LunLatency]:
        """The histograms of its target's LUNs, by number (empty: not measured)."""
