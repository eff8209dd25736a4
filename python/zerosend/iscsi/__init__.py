"""An iSCSI target (RFC 7143) on asyncio and zerosend: Data-In leaves with zero-copy sends.

Layers, each importing only those below it:

- ``wire``: PDUs, the receive reader, the transmit outbox and pool, CmdSN window, negotiation.
- ``storage``: the media behind LUNs, one module per kind, and their disk threads.
- ``scsi``: sense and unit vocabulary, the command table, one module per command family.
- ``session``: one connection: login, READ and write paths, task management, liveness.
- ``service``: the target, its settings, reload, metrics, control socket and command line.
"""

from .service.config import LunSpec, TargetConfig
from .service.target import Target

__all__ = ["LunSpec", "Target", "TargetConfig"]
