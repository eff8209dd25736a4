"""A history checker for the iSCSI target: operations of many initiators, recorded with the
times they were issued and answered and their outcome, then checked against invariants.

- Every block written carries its own name (writer, operation, disk, LBA), so a block read back
  says which write it came from; reads are checked per block for linearizability: a read
  returns the value of a write that precedes or overlaps it, and no write that certainly took
  effect lies wholly between that write and the read.
- Durability: at a SIGKILL the image (page cache dropped) holds, per block, a value that no
  write synced (FUA, or a later GOOD SYNCHRONIZE CACHE) before the kill supersedes.
- Reservations: while the reservation state of a LUN is known (between two PERSISTENT RESERVE
  OUTs, which the workload serializes), a command succeeds exactly where the state allows it;
  a write of a nexus that PREEMPT AND ABORT removed lands before that PREEMPT's GOOD.
- COMPARE AND WRITE is atomic: two that succeed never compare against the same unique value.
- Liveness: every command gets a status, or its connection ends, within a bound.

Each violation names the operations involved (initiator, op, LUN, LBA, times, outcome).
"""

from __future__ import annotations

from .checker import History
from .record import Epoch, Op, PrState
from .values import (
    BLOCK,
    CHECK_CONDITION,
    GOOD,
    HUNG,
    KIND_INIT,
    KIND_SAME,
    KIND_WRITE,
    MAGIC,
    RESERVATION_CONFLICT,
    SAME_LBA,
    UNKNOWN,
    ZERO,
    Value,
    block,
    decode,
    show,
)

__all__ = [
    "BLOCK",
    "CHECK_CONDITION",
    "GOOD",
    "HUNG",
    "KIND_INIT",
    "KIND_SAME",
    "KIND_WRITE",
    "MAGIC",
    "RESERVATION_CONFLICT",
    "SAME_LBA",
    "UNKNOWN",
    "ZERO",
    "Epoch",
    "History",
    "Op",
    "PrState",
    "Value",
    "block",
    "decode",
    "show",
]
