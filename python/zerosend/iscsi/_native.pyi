"""Type stubs of the target's part of the Rust extension, ``zerosend.iscsi._native`` (crate
``zerosend-iscsi``; checked against it with mypy's stubtest). Only ``zerosend.iscsi._accel``
imports it."""

import sys
from collections.abc import Container, Sequence
from typing import Any, final

if sys.version_info >= (3, 12):
    from collections.abc import Buffer
else:
    from typing_extensions import Buffer

__all__ = ["IscsiReadPath", "_encode_data_in", "_encode_scsi_response", "crc32c"]

def crc32c(data: Buffer, value: int = 0) -> int:
    """CRC32C (Castagnoli) of a bytes-like object, continuing from ``value`` (0 to start)."""

@final
class IscsiReadPath:
    """One LUN's READ path on one connection: the inner loop of the target's READ path."""

    def __new__(
        cls,
        fd: int,
        lun: bytes,
        block_size: int,
        blocks: int,
        max_len: int,
        zc_min: int,
        refer_min: int,
    ) -> IscsiReadPath: ...
    def serve(
        self,
        rx: Any,
        start: int,
        end: int,
        out: Any,
        pos: int,
        sn: tuple[int, int, int],
        busy: Sequence[Container[int]] | None = None,
    ) -> tuple[int, int, int, int, int, int, int, bool, int, int, int]:
        """Serves the plain READs at ``rx[start:end]`` into ``out[pos:]``; ``sn`` is (ExpCmdSN,
        StatSN, MaxCmdSN) before the run; the run stops at a command whose ITT is in one of
        ``busy`` (a task in progress has it). Returns the run (``_accel.RUN_FIELDS``)."""

def _encode_data_in(
    flags: int,
    status: int,
    data_len: int,
    lun: bytes,
    itt: int,
    statsn: int,
    expcmdsn: int,
    maxcmdsn: int,
    datasn: int,
    offset: int,
    residual: int,
) -> bytes:
    """For tests: a whole iSCSI Data-In header (48 bytes)."""

def _encode_scsi_response(
    flags: int,
    status: int,
    data_len: int,
    itt: int,
    statsn: int,
    expcmdsn: int,
    maxcmdsn: int,
    expdatasn: int,
    residual: int,
) -> bytes:
    """For tests: a whole iSCSI SCSI Response header (48 bytes)."""
