"""The connection as its READ and write paths see it: what they need of their session."""

from __future__ import annotations

from typing import Protocol

from .latency import LunLatency


class Connection(Protocol):
    """What the READ and write paths need of their session."""

    @property
    def name(self) -> str: ...
    @property
    def closing(self) -> bool: ...
    def abort_connection(self) -> None: ...
    @property
    def latency(self) -> dict[int, LunLatency]:
        """The histograms of its target's LUNs, by number (empty: not measured)."""
