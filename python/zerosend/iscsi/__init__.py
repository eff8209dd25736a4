"""An iSCSI target (RFC 7143) on asyncio and zerosend: Data-In leaves with zero-copy sends.

Where things are:

- ``config``: the settings (each defined once: command-line option and TOML key), ``__main__``
  the command line; ``target``: listening socket, session registry, LUNs, shutdown.
- ``session``: one connection: login (``login``, ``params``, ``chap``), then the full feature
  phase's dispatch; it reaches the target only through ``host.SessionHost``.
- Receiving: ``reader`` (PDUs out of one receive buffer), ``pdu`` (header layout and builders);
  ``window``: StatSN, the CmdSN window, serial number arithmetic.
- Sharing the target: ``budget`` (what a session has in flight: the room in its CmdSN window),
  ``bufpool`` (each session's share of the transmit buffers), ``liveness`` (keepalive,
  TCP_USER_TIMEOUT, NOP-In pings, resetting a dead peer's connection).
- Answering: ``responses`` (every PDU the target sends, stamped and digested) into ``outbox``
  (one vectored send per batch, pooled buffers from ``bufpool`` released after the kernel did).
- Commands: ``reads`` (the READ path; its inner loop is Rust's ``IscsiReadPath`` or
  ``readloop``), ``writes`` (Data-Out, R2T), ``taskmgmt``, ``scsi`` (every other command, and
  the tables the command families register in: ``provisioning`` (UNMAP, WRITE SAME, GET LBA
  STATUS), ``compare`` (COMPARE AND WRITE, ORWRITE), ``atomic`` (WRITE ATOMIC), ``xcopy``
  (EXTENDED COPY, RECEIVE COPY RESULTS), ``defects``, ``opcodes`` (REPORT SUPPORTED OPERATION
  CODES)), ``stores`` (the media behind LUNs).
"""

from .service.config import LunSpec, TargetConfig
from .service.target import Target

__all__ = ["LunSpec", "Target", "TargetConfig"]
