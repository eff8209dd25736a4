"""The READ path: every READ command of one connection.

Plain reads (in order, one Data-In PDU with status, from an image read with pread) are served
in runs straight out of the receive buffer by the inner loop, ``serve_run``; it runs in Rust
(``_accel.NativeReadPath``, where the extension is there) or, with ``read_loop = "python"``, in
Python (``readloop.ReadLoop``, the same algorithm). Whatever the inner loop leaves (residuals,
several PDUs, stores with their own memory, errors, digests) arrives through the session's
dispatch at ``command``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Container, Mapping, Sequence
from time import perf_counter
from typing import Any, Protocol

from .._accel import NativeReadPath, ReadRun
from ..scsi.sense import (
    GOOD,
    ILLEGAL_REQUEST,
    INVALID_FIELD_IN_CDB,
    MEDIUM_ERROR,
    UNRECOVERED_READ_ERROR,
    CheckCondition,
    StatusReply,
)
from ..scsi.unit import LogicalUnit, check_transfer_length, decode_rw
from ..storage import diskio
from ..storage.file import FileStore
from ..storage.store import Store
from ..wire import pdu as P
from ..wire.bufpool import PoolShare
from ..wire.outbox import ZC_MIN, Outbox
from ..wire.params import SessionParams
from ..wire.reader import PduReader
from ..wire.window import CmdWindow
from .data_path import Connection
from .latency import READ, Histogram
from .readloop import ReadLoop
from .responses import Responder, residual_bits

log = logging.getLogger("zerosend.iscsi")


class _InnerLoop(Protocol):
    def serve(
        self,
        rx: Any,
        start: int,
        end: int,
        out: Any,
        pos: int,
        sn: tuple[int, int, int],
        busy: Sequence[Container[int]] | None = None,
    ) -> ReadRun: ...


# a LUN's inner loop, image, logical unit, and its READ latency histogram (None: not measured)
_Entry = tuple[_InnerLoop, FileStore, LogicalUnit, Histogram | None]


class Reads:
    """The READ commands of one connection."""

    def __init__(
        self,
        conn: Connection,
        luns: Mapping[int, LogicalUnit],
        pool: PoolShare,
        params: SessionParams,
        reader: PduReader,
        window: CmdWindow,
        responder: Responder,
        stats: dict[str, int],
        *,
        native: bool = True,
        sendfile: bool = False,
    ) -> None:
        """``native``: the Rust inner loop where it is there (else the Python one);
        ``sendfile``: large READs of read-only images leave with sendfile(2)."""
        self.conn = conn
        self.native = native and NativeReadPath is not None
        self.sendfile = sendfile
        self.luns = luns
        self.pool = pool
        self.params = params
        self.reader = reader
        self.window = window
        self.responder = responder
        self.outbox: Outbox = responder.outbox
        self.stats = stats
        self.loop = asyncio.get_running_loop()
        self._inner: dict[bytes, _Entry | None] = {}  # by LUN field
        self._last_lun = bytes(8)  # the LUN field last looked up, and its entry
        self._last: _Entry | None = None
        self.tasks: dict[int, tuple[asyncio.Task[None], int]] = {}  # ITT -> multi-buffer read
        # The inner loop stopped at a READ for want of a buffer (the session's share is used up)
        self.starved = False

    def __len__(self) -> int:
        return len(self.tasks)

    # -- the inner loop

    def serve_run(self) -> bool:
        """Serve the plain READs at the reader's start; False if the first one is not plain
        (the general path then takes it)."""
        self.starved = False
        if self.window.pending:
            return False
        rd = self.reader
        entry = self._last
        if entry is None or not rd.buf.startswith(self._last_lun, rd.start + 8):
            lun_field = bytes(rd.buf[rd.start + 8 : rd.start + 16])
            try:
                entry = self._inner[lun_field]
            except KeyError:
                entry = self._inner[lun_field] = self._inner_loop(lun_field)
            self._last_lun, self._last = lun_field, entry
            if entry is None:
                return False
        inner, store, lu, timed = entry
        if lu.admission_required:  # a reservation or unit attention: each READ is admitted
            return False
        began = perf_counter() if timed is not None else 0.0
        window, outbox, stats = self.window, self.outbox, self.stats
        # A READ that reuses the ITT of a task in progress is the general path's to reject
        busy = self.conn.itts_in_progress()
        outbox.ensure_packing()  # (a packing buffer that stays unused goes back at the flush)
        served = False
        while True:
            out, pos = outbox.packing()
            run = inner.serve(rd.buf, rd.start, rd.end, out, pos, window.numbers(), busy)
            (start, pos, expcmdsn, statsn, maxcmdsn, commands, nbytes, large, need, send_from,
             send_len) = run  # fmt: skip
            if commands:
                rd.start = start
                outbox.packed(pos, large)
                window.set_numbers(expcmdsn, statsn, maxcmdsn)
                stats["commands"] += commands
                stats["read_bytes"] += nbytes
                stats["zc_sends"] += commands
                if timed is not None:  # one observation for the run: its READs came together
                    timed.observe(perf_counter() - began, commands)
                served = True
                if send_len:  # sent from the image's pages, right behind its header
                    loan = store.borrow(send_from, send_len)
                    if loan is None:
                        outbox.send_file(store.fd, send_from, send_len)
                    else:
                        outbox.queue(loan.views, large=True)
                        outbox.hold(loan)
            if not need:
                return served
            if not outbox.new_packing(need):
                # Out of buffers: the session waits for one (``wait_for_buffer``) rather than
                # take READs it could not serve; larger ones go the general way.
                self.starved = need <= self.pool.size
                return served

    async def wait_for_buffer(self) -> None:
        """After ``serve_run`` starved: send what is queued (its buffers come back with it),
        then wait for a buffer to pack the next READs into."""
        self.outbox.flush()
        lease = await self.pool.acquire()
        if not self.outbox.new_packing(0, lease):
            lease.release()

    def _inner_loop(self, lun_field: bytes) -> _Entry | None:
        lu = self.luns.get(P.decode_lun(lun_field))
        if lu is None or not isinstance(lu.store, FileStore) or not lu.store.nowait:
            return None  # (a store whose reads may always wait goes through the general path)
        store = lu.store
        p = self.params
        longest = min(p.initiator_max_recv_dsl, p.max_burst)
        # Large reads of a read-only image go straight from its pages: zero-copy from its
        # mapping, or with sendfile.
        refer_min = ZC_MIN if store.lends or (self.sendfile and store.readonly) else 0xFFFFFFFF
        kind: Callable[..., _InnerLoop] = ReadLoop
        if self.native and NativeReadPath is not None:
            kind = NativeReadPath
        inner = kind(store.fd, lun_field, store.block_size, store.blocks, longest, ZC_MIN,
                     refer_min)  # fmt: skip
        latency = self.conn.latency.get(P.decode_lun(lun_field))
        return inner, store, lu, None if latency is None else latency.commands[READ]

    def luns_cached(self) -> set[int]:
        """The LUNs whose image the inner loop holds (a reload that removes one ends the
        connection before the image is closed)."""
        return {P.decode_lun(f) for f, entry in self._inner.items() if entry is not None}

    # -- every other READ

    def command(self, req: P.Pdu, lu: LogicalUnit, cdb: bytes, edtl: int, lun_field: bytes) -> None:
        """A READ(6/10/12/16) from dispatch; raises CheckCondition."""
        rw = decode_rw(cdb)
        if rw.flags & 0xE0:  # RDPROTECT without protection information
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)
        lu.check_range(rw.lba, rw.blocks)
        check_transfer_length(rw.blocks)
        bs = lu.store.block_size
        spdtl = rw.blocks * bs
        if not req.flags & P.CMD_READ and spdtl:
            # A read whose PDU says no data-in: nothing can be sent
            edtl = 0
        n = min(spdtl, edtl)
        status = residual_bits(spdtl, edtl, P.DATAIN_OVERFLOW, P.DATAIN_UNDERFLOW)
        itt = req.itt
        if n == 0:
            self.responder.send_status(itt, GOOD, None, *status)
            return
        offset = rw.lba * bs
        store = lu.store
        self.stats["read_bytes"] += n
        loan = store.borrow(offset, n)
        if loan is not None:  # memory the store owns: sent as is, unchanged until released
            self.responder.send_data_in(itt, lun_field, loan.views, n, 0, 0, status)
            self.outbox.hold(loan)
            return
        if n <= self.pool.size:
            lease = self.pool.try_acquire()
            if lease is not None:
                view = lease.view[:n]
                try:
                    cached = store.read_cached(offset, view)
                except OSError as e:
                    lease.release()
                    self._read_failed(itt, offset, n, e)
                    return
                if cached:
                    self.responder.send_data_in(itt, lun_field, [view], n, 0, 0, status)
                    self.outbox.hold(lease)  # released with the send carrying it
                    return
                lease.release()  # read by the task (a task cancelled before it runs frees nothing)
        task = self.loop.create_task(self._read_task(itt, lun_field, store, offset, n, status))
        self.tasks[itt] = (task, P.decode_lun(lun_field))
        task.add_done_callback(lambda t: self._done(itt, t))

    def _done(self, itt: int, task: asyncio.Task[None]) -> None:
        if itt in self.tasks and self.tasks[itt][0] is task:
            del self.tasks[itt]
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: read task failed: %s", self.conn.name, task.exception())
            self.conn.abort_connection()

    def _read_failed(self, itt: int, offset: int, n: int, e: OSError) -> None:
        log.error("%s: read of %d bytes at %d failed: %s", self.conn.name, n, offset, e)
        self.responder.send_check(itt, CheckCondition(MEDIUM_ERROR, UNRECOVERED_READ_ERROR))

    async def _read_task(
        self,
        itt: int,
        lun_field: bytes,
        store: Store,
        offset: int,
        total: int,
        status: tuple[int, int],
    ) -> None:
        """A read larger than one pooled buffer, one that waits for a free buffer, or one the
        page cache cannot serve at once (read in the store's threads: ``diskio``)."""
        pool = self.pool
        pos = datasn = 0
        while pos < total and not self.conn.closing:
            n = min(pool.size, total - pos)
            lease = pool.try_acquire()
            if lease is None:
                self.outbox.flush()  # what is queued may hold the buffers this read waits for
                lease = await pool.acquire()
            view = lease.view[:n]
            try:
                if not store.read_cached(offset + pos, view):
                    # if cancelled meanwhile, the lease goes back when the thread is done
                    await diskio.read_into(store, offset + pos, view, lease)
            except OSError as e:
                lease.release()
                self.tasks.pop(itt, None)
                self._read_failed(itt, offset + pos, n, e)
                return
            if self.conn.closing:
                lease.release()
                return
            last = pos + n == total
            datasn = self.responder.send_data_in(
                itt, lun_field, [view], n, pos, datasn, status if last else None
            )
            if last:  # its status now counts in the session's budget: no longer a task
                self.tasks.pop(itt, None)
            self.outbox.hold(lease)  # released with the send carrying its last PDU
            self.outbox.flush()
            pos += n

    # -- data-in commands that complete later

    def later(self, itt: int, lun_field: bytes, coming: Awaitable[bytes], edtl: int) -> None:
        """A command whose data-in comes from work in the store's threads (``scsi.Handler``,
        GET LBA STATUS's walk): a task in progress like a READ until it comes, so the CmdSN
        window counts it, ABORT TASK, LOGICAL UNIT RESET and the session's end cancel it (no
        data follows), and its ITT is in use meanwhile."""
        task = self.loop.create_task(self._later_task(itt, lun_field, coming, edtl))
        self.tasks[itt] = (task, P.decode_lun(lun_field))
        task.add_done_callback(lambda t: self._done(itt, t))

    async def _later_task(
        self, itt: int, lun_field: bytes, coming: Awaitable[bytes], edtl: int
    ) -> None:
        try:
            data = await coming
        except CheckCondition as cc:
            self.tasks.pop(itt, None)
            self.responder.send_check(itt, cc)
        except StatusReply as reply:
            self.tasks.pop(itt, None)
            self.responder.send_status(itt, reply.status, None)
        except OSError as e:
            log.error("%s: command ITT 0x%08x failed on the medium: %s", self.conn.name, itt, e)
            self.tasks.pop(itt, None)
            medium = CheckCondition(MEDIUM_ERROR, UNRECOVERED_READ_ERROR)
            self.responder.send_check(itt, medium)
        else:
            if self.conn.closing:
                return
            self.tasks.pop(itt, None)  # its status now counts in the session's budget
            self.responder.reply_data(itt, lun_field, data, edtl)
        self.outbox.flush()

    # -- task management

    def cancel(self, itt: int) -> bool:
        """ABORT TASK of a read in progress: no status follows the Data-In already sent."""
        entry = self.tasks.get(itt)
        if entry is None:
            return False
        entry[0].cancel()
        return True

    def abort(self, lun: int | None) -> None:
        """Cancel the reads in progress (of ``lun``, or all)."""
        for task, task_lun in list(self.tasks.values()):
            if lun is None or task_lun == lun:
                task.cancel()
