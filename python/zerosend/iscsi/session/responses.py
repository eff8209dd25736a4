"""Queueing responses: control PDUs, Data-In, SCSI Response with status or sense, Reject.

Every PDU gets its sequence numbers (``CmdWindow``) right when it is queued, so they follow
submission order, and its digests when the session negotiated them.
"""

from __future__ import annotations

import logging
import struct
from time import perf_counter
from typing import Any

from .._accel import crc32c
from ..scsi.sense import CHECK_CONDITION, GOOD, CheckCondition, sense_fixed
from ..wire import pdu as P
from ..wire.outbox import ZC_MIN, Outbox
from ..wire.params import SessionParams
from ..wire.window import CmdWindow
from .latency import Histogram

log = logging.getLogger("zerosend.iscsi")


class Responder:
    """Builds and queues the PDUs one connection sends."""

    def __init__(
        self, outbox: Outbox, window: CmdWindow, params: SessionParams, stats: dict[str, int]
    ) -> None:
        self.outbox = outbox
        self.window = window
        self.params = params
        self.stats = stats
        # Commands being timed (metrics on): ITT -> (start, histogram, LUN); observed when
        # their status is queued
        self.timing: dict[int, tuple[float, Histogram, int]] = {}

    def _digested(self, hdr: bytearray) -> bytearray:
        if self.params.header_digest:
            hdr += crc32c(hdr).to_bytes(4, "little")
        return hdr

    def send_pdu(self, hdr: bytearray, data: bytes = b"", advance: bool = True) -> None:
        """Queue a control PDU (its data is small: it goes by copy). ``advance``: it carries
        status, so StatSN moves on."""
        w = self.window
        P.stamp(hdr, w.next_statsn(advance), w.expcmdsn, w.maxcmdsn)
        iov: list[Any] = [self._digested(hdr)]
        if data:
            iov.append(data)
            pad = P.pad_for(len(data))
            if pad:
                iov.append(pad)
            if self.params.data_digest:
                iov.append(crc32c(pad, crc32c(data)).to_bytes(4, "little"))
        self.outbox.queue(iov)

    async def send_now(self, hdr: bytearray, data: bytes = b"") -> None:
        """Queue a PDU, send the outbox and wait until the kernel released it."""
        self.send_pdu(hdr, data)
        released = self.outbox.flush_released()
        if released is not None:
            await released

    def send_data_in(
        self,
        itt: int,
        lun_field: bytes,
        segments: list[memoryview],
        total: int,
        offset: int,
        datasn: int,
        status: tuple[int, int] | None,
    ) -> int:
        """Queue Data-In PDUs for ``segments`` (``total`` bytes at buffer ``offset``); the last
        PDU carries status when ``status`` is (flags, residual). Returns the next DataSN."""
        if self.timing and status is not None:
            self.timed(itt)
        p = self.params
        mrdsl = p.initiator_max_recv_dsl
        burst = p.max_burst
        w = self.window
        seg_i, seg_off = 0, 0
        remaining = total
        while remaining > 0:
            n = min(mrdsl, remaining, burst - offset % burst)
            iov: list[Any] = [None]
            got = 0
            while got < n:
                seg = segments[seg_i]
                take = min(len(seg) - seg_off, n - got)
                iov.append(seg[seg_off : seg_off + take] if take != len(seg) else seg)
                got += take
                seg_off += take
                if seg_off == len(seg):
                    seg_i, seg_off = seg_i + 1, 0
            remaining -= n
            end_of_burst = (offset + n) % burst == 0
            flags = P.F_FINAL if (end_of_burst or remaining == 0) else 0
            residual = 0
            with_status = remaining == 0 and status is not None
            if with_status:
                assert status is not None
                st_flags, residual = status
                flags |= P.F_FINAL | P.DATAIN_STATUS | st_flags
            statsn = w.next_statsn(with_status)
            hdr = bytearray(P.BHS_LEN)
            P.data_in_into(hdr, 0, flags, 0, n, lun_field, itt, statsn, w.expcmdsn, w.maxcmdsn,
                           datasn, offset, residual)  # fmt: skip
            iov[0] = self._digested(hdr)
            pad = P.pad_for(n)
            if pad:
                iov.append(pad)
            if p.data_digest:
                value = 0
                for part in iov[1:]:
                    value = crc32c(part, value)
                iov.append(value.to_bytes(4, "little"))
            self.outbox.queue(iov, large=n >= ZC_MIN)
            self.stats["zc_sends"] += 1
            offset += n
            datasn += 1
        return datasn

    def send_status(
        self,
        itt: int,
        status: int,
        sense: bytes | None,
        flags: int = 0,
        residual: int = 0,
        expdatasn: int = 0,
    ) -> None:
        data = b""
        if sense:
            data = struct.pack(">H", len(sense)) + sense
        if status == CHECK_CONDITION:  # (for the metrics)
            self.stats["check_conditions"] = self.stats.get("check_conditions", 0) + 1
        if self.timing:
            self.timed(itt)
        hdr = P.scsi_response(itt, status, flags, residual, expdatasn, len(data))
        self.send_pdu(hdr, data)

    def timed(self, itt: int) -> None:
        """The status of ``itt`` is queued now: its latency is observed (if it is timed)."""
        started = self.timing.pop(itt, None)
        if started is not None:
            started[1].observe(perf_counter() - started[0])

    def untime(self, lun: int | None) -> None:
        """Aborted tasks (of ``lun``, or all) send no status: forget their starts."""
        if lun is None:
            self.timing.clear()
        else:
            for itt in [i for i, t in self.timing.items() if t[2] == lun]:
                del self.timing[itt]

    def send_check(self, itt: int, cc: CheckCondition, flags: int = 0, residual: int = 0) -> None:
        sense = sense_fixed(cc.key, cc.asc, cc.ascq, cc.info, cc.field)
        self.send_status(itt, CHECK_CONDITION, sense, flags, residual)

    def send_reject(self, reason: int, bhs: bytes, why: str) -> None:
        log.warning("%s: reject (reason 0x%02x): %s", self.outbox.name, reason, why)
        self.stats["rejects"] = self.stats.get("rejects", 0) + 1
        self.send_pdu(P.reject(reason, bhs), bytes(bhs[: P.BHS_LEN]))

    def reply_data(self, itt: int, lun_field: bytes, data: bytes, edtl: int) -> None:
        """A command's small data-in (INQUIRY, MODE SENSE ...) with GOOD status."""
        n = len(data)
        flags, residual = residual_bits(n, edtl, P.DATAIN_OVERFLOW, P.DATAIN_UNDERFLOW)
        n = min(n, edtl)
        if n == 0:
            self.send_status(itt, GOOD, None, flags, residual)
            return
        self.send_data_in(itt, lun_field, [memoryview(data)[:n]], n, 0, 0, (flags, residual))


def residual_bits(spdtl: int, edtl: int, overflow: int, underflow: int) -> tuple[int, int]:
    """(flags, residual) of a transfer of ``spdtl`` bytes the initiator expected as ``edtl``."""
    if spdtl > edtl:
        return overflow, spdtl - edtl
    if spdtl < edtl:
        return underflow, edtl - spdtl
    return 0, 0
