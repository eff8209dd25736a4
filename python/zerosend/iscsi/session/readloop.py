"""The READ path's inner loop in Python: the same algorithm as the Rust one
(``_accel.NativeReadPath``, crate ``zerosend-iscsi``, ``read_path.rs``), step for step,
for builds and comparisons without it (setting ``read_loop = "python"``).

A run serves the plain READ(10)/READ(16) commands at the start of the receive buffer: each is
read from the image straight into the transmit buffer, behind the Data-In header (with status)
written in front of it. "Plain": a non-immediate SCSI Command for this LUN with the Read bit
only, no AHS or data segment, CmdSN equal to ExpCmdSN, no RDPROTECT, a transfer length equal to
the Expected Data Transfer Length, inside the LUN, not empty and at most ``max_len`` bytes. The
run stops at the first command that is not plain, at one past MaxCmdSN (the run never raises
MaxCmdSN: the window is the caller's), at one that does not fit (``need`` then says how much
room it wants), at a read that fails, comes up short or would wait for the disk (only what the
page cache holds is read here: ``preadv2(RWF_NOWAIT)``), and right after a read of
``zc_min`` bytes or more. A read of ``refer_min`` bytes or more is not read at all: its header
is written and the run ends with ``send_from``/``send_len``, for the caller to send those bytes
straight from its mapping of the image.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Container, Sequence
from typing import Any

from .._accel import ReadRun
from ..scsi.unit import READ10, READ16
from ..wire import pdu as P
from ..wire.window import sn_lt

# SCSI Command BHS up to the CDB: opcode byte, flags, AHS+DSL, LUN, ITT, EDTL, CmdSN
_CMD = struct.Struct(">BB2xI8sIII")
_READ10 = struct.Struct(">xBIxH")  # flags, LBA, transfer length
_READ16 = struct.Struct(">xBQI")
_DATAIN_GOOD = P.F_FINAL | P.DATAIN_STATUS


class ReadLoop:
    """One LUN's inner loop on one connection (the arguments of ``_accel.NativeReadPath``).

    ``serve`` returns the run as ``_accel.ReadRun``: the receive buffer's new ``start``, the
    transmit buffer's new fill ``pos``, ``expcmdsn``, ``statsn``, ``maxcmdsn``, ``commands``,
    ``nbytes``, ``large`` (the last command read ``zc_min`` bytes or more), ``need`` (room the
    next command wants if the run stopped for lack of it, else 0), and ``send_from`` /
    ``send_len`` (with ``send_len`` > 0: the last command's data was not read; the caller sends
    ``send_len`` bytes of the image from ``send_from`` after its header)."""

    def __init__(
        self, fd: int, lun: bytes, block_size: int, blocks: int, max_len: int, zc_min: int,
        refer_min: int,
    ) -> None:  # fmt: skip
        if len(lun) != 8:
            raise ValueError("lun must be the 8-byte LUN field")
        if fd < 0 or block_size <= 0:
            raise ValueError("fd and block_size must be positive")
        self.fd = fd
        self.lun = bytes(lun)
        self.block_size = block_size
        self.blocks = blocks
        self.max_len = min(max_len, 0xFFFFFF)
        self.zc_min = zc_min
        self.refer_min = refer_min

    def serve(
        self,
        rx: Any,
        start: int,
        end: int,
        out: Any,
        pos: int,
        sn: tuple[int, int, int],
        busy: Sequence[Container[int]] | None = None,
    ) -> ReadRun:
        expcmdsn, statsn, maxcmdsn = sn
        out = memoryview(out)  # slices of it are views, not copies
        bs = self.block_size
        at = start
        commands = nbytes = need = send_from = send_len = 0
        large = False
        while end - at >= P.BHS_LEN and not sn_lt(maxcmdsn, expcmdsn):
            op, flags, lengths, lun, itt, edtl, cmdsn = _CMD.unpack_from(rx, at)
            if op != P.OP_SCSI_CMD or flags & (P.CMD_READ | P.CMD_WRITE) != P.CMD_READ:
                break
            if lengths or lun != self.lun or cmdsn != expcmdsn:
                break
            if busy and any(itt in tasks for tasks in busy):
                break  # an ITT in progress: the general path rejects it
            code = rx[at + 32]
            if code == READ10:
                cflags, lba, blocks = _READ10.unpack_from(rx, at + 32)
            elif code == READ16:
                cflags, lba, blocks = _READ16.unpack_from(rx, at + 32)
            else:
                break
            n = blocks * bs
            if cflags & 0xE0 or not n or n != edtl or lba + blocks > self.blocks:
                break
            if n > self.max_len:
                break
            refer = n >= self.refer_min
            length = 0 if refer else n
            if len(out) - pos < P.BHS_LEN + length:
                need = P.BHS_LEN + length
                break
            data_at = pos + P.BHS_LEN
            if not refer and not self._read(out[data_at : data_at + n], lba * bs):
                break
            answer_statsn = statsn
            statsn = (statsn + 1) & 0xFFFFFFFF
            expcmdsn = (expcmdsn + 1) & 0xFFFFFFFF
            P.data_in_into(out, pos, _DATAIN_GOOD, 0, n, lun, itt, answer_statsn, expcmdsn,
                           maxcmdsn, 0, 0, 0)  # fmt: skip
            at += P.BHS_LEN
            pos = data_at + length
            commands += 1
            nbytes += n
            if refer:
                send_from, send_len = lba * bs, n
            large = n >= self.zc_min
            if refer or large:
                break
        return (at, pos, expcmdsn, statsn, maxcmdsn, commands, nbytes, large, need, send_from,
                send_len)  # fmt: skip

    def _read(self, view: memoryview, offset: int) -> bool:
        """Fill ``view`` from the page cache; False if the image ends first, the read fails or
        it would wait for the disk."""
        done = 0
        try:
            while done < len(view):
                got = os.preadv(self.fd, [view[done:]], offset + done, os.RWF_NOWAIT)
                if got == 0:
                    return False
                done += got
        except OSError:
            return False
        return True
