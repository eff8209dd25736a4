"""An iSCSI target (RFC 7143) on asyncio and zerosend: Data-In leaves with zero-copy sends.

Layers, each importing only those below it:

- ``_accel``: the target's Rust pieces (``_native``: the READ inner loop, CRC32C) or, where the
  extension is missing, their pure-Python stand-ins; the only module that imports ``_native``.
- ``wire``: PDUs, the receive reader, the transmit outbox and pool, CmdSN window, negotiation.
- ``storage``: the media behind LUNs, one module per kind, and their disk threads.
- ``scsi``: sense and unit vocabulary, the command table, one module per command family.
- ``session``: one connection: login, READ and write paths, task management, liveness.
- ``service``: the target, its settings, reload, metrics, control socket and command line.
"""

from .service.config import LunSpec, TargetConfig
from .service.target import Target

__all__ = ["LunSpec", "Target", "TargetConfig"]
