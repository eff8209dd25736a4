"""The I_T nexus: which initiator port a command comes through (SPC-4 keys reservations, unit
attentions and task ownership on it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Nexus:
    """An initiator port (iSCSI name + ISID) talking to the target's portal group."""

    initiator: str
    isid: bytes
    tpgt: int = 1

    @property
    def initiator_port(self) -> str:
        """The SCSI initiator port name (RFC 7143 13.2: ``<name>,i,0x<ISID>``)."""
        return f"{self.initiator},i,0x{self.isid.hex()}"


#: Commands from before login completes, or from tools that drive the command set directly.
NO_NEXUS = Nexus("", b"\0" * 6, 0)
