"""Per-initiator access (``acls``): who may log in from where, with which CHAP credentials,
and which LUNs each initiator sees and may write (LUN masking, as LIO's ACLs and tgt's
``initiator-name``/``initiator-address`` do).

A session looks its LUNs up through a ``LunView``: the target's LUNs as its initiator's ACL
shows them (hidden ones absent, read-only ones wrapped), so the READ fast path, the write path,
REPORT LUNS and EXTENDED COPY all see the same masked set.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from ..wire.chap import Credentials
    from .unit import LogicalUnit

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Acl:
    """One initiator's access. ``luns`` None: every LUN; ``addresses`` empty: from anywhere."""

    initiator: str
    chap: Credentials | None = None
    mutual_chap: Credentials | None = None
    luns: frozenset[int] | None = None
    readonly_luns: frozenset[int] = frozenset()
    readonly: bool = False
    addresses: tuple[Network, ...] = ()

    def sees(self, lun: int) -> bool:
        return self.luns is None or lun in self.luns

    def writes(self, lun: int) -> bool:
        return not self.readonly and lun not in self.readonly_luns

    def admits(self, address: str) -> bool:
        """Whether a connection from ``address`` (an IP, no port) may log in."""
        if not self.addresses:
            return True
        try:
            ip = ipaddress.ip_address(address.strip("[]"))
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # a v4 peer on a dual-stack socket
        return any(ip in net for net in self.addresses)


def peer_address(peer: str) -> str:
    """The address of ``HOST:PORT`` or ``[V6]:PORT`` (a session's peer)."""
    host = peer.rpartition(":")[0]
    return host.strip("[]")


class ReadOnlyUnit:
    """A logical unit as an initiator with read-only access sees it: everything delegates to
    the unit (its locks, its reservation state, its admission flag), but it is read-only, so
    every write path refuses with DATA PROTECT and MODE SENSE shows WP."""

    readonly = True

    def __init__(self, unit: LogicalUnit) -> None:
        self._unit = unit

    def __getattr__(self, name: str) -> Any:
        return getattr(self._unit, name)


class LunView(Mapping[int, "LogicalUnit"]):
    """The target's LUNs (``luns``, the live dict a reload changes) through ``acl`` (None:
    all of them, as they are)."""

    def __init__(self, luns: Mapping[int, LogicalUnit], acl: Acl | None = None) -> None:
        self._luns = luns
        self.acl = acl
        self._wrapped: dict[int, tuple[LogicalUnit, Any]] = {}

    def __getitem__(self, lun: int) -> LogicalUnit:
        unit = self._luns[lun]
        acl = self.acl
        if acl is None:
            return unit
        if not acl.sees(lun):
            raise KeyError(lun)
        if acl.writes(lun):
            return unit
        cached = self._wrapped.get(lun)
        if cached is None or cached[0] is not unit:  # (a reload replaced the unit)
            cached = self._wrapped[lun] = (unit, ReadOnlyUnit(unit))
        # (a stand-in for the unit: it answers every attribute the unit does)
        return cast("LogicalUnit", cached[1])

    def serve(self, luns: Mapping[int, LogicalUnit], acl: Acl | None) -> None:
        """Look up ``luns`` through ``acl`` from now on (a login picked its target)."""
        self._luns = luns
        self.acl = acl
        self._wrapped.clear()

    def get(self, lun: int, default: Any = None) -> Any:
        if self.acl is None:  # (the common case, on every command: one dict lookup)
            return self._luns.get(lun, default)
        try:
            return self[lun]
        except KeyError:
            return default

    def __iter__(self) -> Iterator[int]:
        acl = self.acl
        return iter([n for n in self._luns if acl is None or acl.sees(n)])

    def __len__(self) -> int:
        return sum(1 for _ in self)
