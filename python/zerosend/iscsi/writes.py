"""Commands that receive data: WRITE, WRITE AND VERIFY, VERIFY with BYTCHK, and commands whose
Data-Out is a parameter list (immediate and unsolicited data, then R2T / Data-Out sequences of at
most MaxBurstLength)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from . import pdu as P
from . import scsi as S
from .compare import or_write
from .host import Connection
from .params import SessionParams
from .responses import Responder, residual_bits
from .samecheck import compare_off_loop
from .stores import Store

log = logging.getLogger("zerosend.iscsi")


class DataError(Exception):
    """Data-Out that breaks the transfer (wrong offset, beyond the length asked for)."""


class _NoStore(Store):
    """The medium of a write that already failed: its data is swallowed."""

    def __init__(self) -> None:
        super().__init__("none")
        self.readonly = True
        self.kind = "none"


class WriteTask:
    """A command that receives data."""

    __slots__ = (
        "aborted",
        "base",
        "burst_end",
        "comparing",
        "datasn",
        "edtl",
        "error",
        "fua",
        "itt",
        "lu",
        "lun",
        "lun_field",
        "miscompare",
        "next_offset",
        "or_data",
        "parameters",
        "r2tsn",
        "run",
        "same_blocks",
        "spdtl",
        "ttt",
        "unsolicited_done",
        "verify",
        "xfer",
    )  # fmt: skip

    def __init__(
        self, itt: int, lu: S.LogicalUnit, lun_field: bytes, base: int, spdtl: int, edtl: int
    ) -> None:
        self.itt = itt
        self.lu = lu
        self.lun = lu.number
        self.lun_field = lun_field
        self.base = base
        self.spdtl = spdtl
        self.edtl = edtl
        self.xfer = min(spdtl, edtl)
        self.verify = False
        self.or_data = False  # ORWRITE: the data is ORed into the blocks
        self.next_offset = 0
        self.unsolicited_done = False
        self.ttt = P.NO_TAG
        self.burst_end = 0
        self.datasn = 0
        self.r2tsn = 0
        self.miscompare: int | None = None
        self.fua = False
        self.error: S.CheckCondition | None = None
        self.aborted = False
        self.same_blocks = 0  # VERIFY BYTCHK=3: one block compared against this many
        self.comparing = False  # that comparison is running off the event loop
        # A parameter-list command: its data is collected here, then handed to ``run``.
        self.parameters: bytearray | None = None
        self.run: Callable[[bytes], None] | None = None


class Writes:
    """The data-receiving commands in progress on one connection, by ITT."""

    def __init__(
        self,
        conn: Connection,
        params: SessionParams,
        responder: Responder,
        stats: dict[str, int],
    ) -> None:
        self.conn = conn
        self.params = params
        self.responder = responder
        self.stats = stats
        self.tasks: dict[int, WriteTask] = {}
        self._ttt = 0

    def __len__(self) -> int:
        return len(self.tasks)

    def command(
        self, req: P.Pdu, lu: S.LogicalUnit, cdb: bytes, edtl: int, lun_field: bytes
    ) -> None:
        """A WRITE, WRITE AND VERIFY or VERIFY from dispatch; raises CheckCondition."""
        if self._rejected(req, edtl):
            return
        rw = S.decode_rw(cdb)
        op = cdb[0]
        verify = op in S.VERIFY_OPS
        bytchk = (rw.flags >> 1) & 3 if verify else 1
        if rw.flags & 0xE0:  # WRPROTECT / VRPROTECT without protection information
            raise S.CheckCondition(S.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_CDB)
        if verify and bytchk == 2:
            raise S.CheckCondition(S.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_CDB)
        lu.check_range(rw.lba, rw.blocks)
        S.check_transfer_length(rw.blocks)
        if not verify and lu.readonly:
            raise S.CheckCondition(S.DATA_PROTECT, S.WRITE_PROTECTED)
        bs = lu.store.block_size
        if verify and bytchk == 0:  # medium verification only: the range check is it
            self.discard_unsolicited(req, edtl)
            rsp = residual_bits(0, edtl, P.RSP_OVERFLOW, P.RSP_UNDERFLOW)
            self.responder.send_status(req.itt, S.GOOD, None, *rsp)
            return
        spdtl = bs if (verify and bytchk == 3) else rw.blocks * bs
        if not req.flags & P.CMD_WRITE:
            edtl = 0
        task = WriteTask(req.itt, lu, lun_field, rw.lba * bs, spdtl, edtl)
        task.verify = verify
        task.or_data = op == S.ORWRITE16
        task.fua = bool(rw.flags & 0x08) or op in (
            S.WRITE_VERIFY10,
            S.WRITE_VERIFY12,
            S.WRITE_VERIFY16,
        )
        if verify and bytchk == 3:
            task.same_blocks = rw.blocks
        self.tasks[req.itt] = task
        if req.data:
            self._accept(task, 0, req.data)
        unsolicited_more = not req.final and not self.params.initial_r2t
        if not unsolicited_more:
            task.unsolicited_done = True
        self._advance(task)

    def parameters(
        self,
        req: P.Pdu,
        lu: S.LogicalUnit,
        length: int,
        edtl: int,
        lun_field: bytes,
        run: Callable[[bytes], None],
    ) -> None:
        """A command whose Data-Out is a parameter list of ``length`` bytes: collect it whole,
        then ``run(parameters)``, which raises CheckCondition or StatusReply to fail it."""
        if length > S.MAX_PARAMETER_LIST:
            raise S.CheckCondition(S.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_CDB)
        if self._rejected(req, edtl):
            return
        if not req.flags & P.CMD_WRITE:
            edtl = 0
        task = WriteTask(req.itt, lu, lun_field, 0, length, edtl)
        task.parameters = bytearray(task.xfer)
        task.run = run
        self.tasks[req.itt] = task
        if req.data:
            self._accept(task, 0, req.data)
        if req.final or self.params.initial_r2t:
            task.unsolicited_done = True
        self._advance(task)

    def _rejected(self, req: P.Pdu, edtl: int) -> bool:
        """Reject a command PDU whose own data breaks the protocol (RFC 7143 11.17.1): the
        command does not run, its data goes nowhere, and the connection carries on."""
        why = self._immediate_data_refused(req, edtl)
        if why is None:
            return False
        log.warning("%s: command ITT 0x%08x rejected: %s", self.conn.name, req.itt, why)
        self.discard_unsolicited(req, edtl)
        self.responder.send_reject(P.REJECT_PROTOCOL_ERROR, req.bhs, why)
        return True

    def _immediate_data_refused(self, req: P.Pdu, edtl: int) -> str | None:
        """Why the command PDU's own data segment breaks RFC 7143 (11.3.1, 13.11, 13.14)."""
        n = len(req.data)
        if not n:
            return None
        if not req.flags & P.CMD_WRITE:
            return f"{n} bytes of data on a command without the W bit"
        if not self.params.immediate_data:
            return f"{n} bytes of immediate data after ImmediateData=No"
        if n > edtl:
            return f"{n} bytes of immediate data beyond the expected transfer length {edtl}"
        if n > self.params.first_burst:
            return f"{n} bytes of immediate data beyond FirstBurstLength {self.params.first_burst}"
        return None

    def discard_unsolicited(self, req: P.Pdu, edtl: int) -> None:
        """A failed write may still be followed by unsolicited Data-Out: swallow it quietly."""
        if req.flags & P.CMD_WRITE and not req.final and not self.params.initial_r2t:
            task = WriteTask(req.itt, S.LogicalUnit(-1, _NoStore(), ""), b"", 0, 0, edtl)
            task.aborted = True
            self.tasks[req.itt] = task

    def _accept(self, task: WriteTask, offset: int, data: memoryview | bytes) -> None:
        """Move received write data to the medium (only the part inside the SCSI transfer)."""
        end = offset + len(data)
        if offset != task.next_offset:
            raise DataError(f"data at offset {offset}, expected {task.next_offset}")
        if end > task.edtl:
            raise DataError(f"data beyond the expected transfer length {task.edtl}")
        task.next_offset = end
        usable = min(end, task.xfer) - offset
        if usable <= 0 or task.error is not None or task.aborted:
            return
        chunk = data[:usable] if usable < len(data) else data
        if task.parameters is not None:
            task.parameters[offset : offset + usable] = chunk
            return
        store = task.lu.store
        at = task.base + offset
        try:
            if task.verify:
                if task.same_blocks:
                    self._verify_same(task, bytes(chunk))
                    return
                current = bytearray(len(chunk))
                store.read_into(at, memoryview(current))
                if memoryview(current) != chunk and task.miscompare is None:
                    first = next(i for i in range(len(chunk)) if current[i] != chunk[i])
                    task.miscompare = offset + first
            elif task.or_data:
                or_write(task.lu, at, chunk)
                self.stats["write_bytes"] += usable
            else:
                with task.lu.media_lock:
                    store.write(at, chunk)
                self.stats["write_bytes"] += usable
        except OSError as e:
            log.error("%s: write of %d bytes at %d failed: %s", self.conn.name, usable, at, e)
            task.error = S.CheckCondition(S.MEDIUM_ERROR, S.WRITE_ERROR)

    def _verify_same(self, task: WriteTask, block: bytes) -> None:
        """Compare off the event loop; the command completes when the comparison has."""
        task.comparing = True
        future = compare_off_loop(task.lu.store, task.base, block, task.same_blocks)

        def compared(f: asyncio.Future[int | None]) -> None:
            task.comparing = False
            if f.cancelled():
                task.error = S.CheckCondition(S.ABORTED_COMMAND, S.INTERNAL_FAILURE)
            elif (exc := f.exception()) is not None:
                log.error("%s: VERIFY read failed: %s", self.conn.name, exc)
                task.error = S.CheckCondition(S.MEDIUM_ERROR, S.UNRECOVERED_READ_ERROR)
            else:
                task.miscompare = f.result()
            if self.tasks.get(task.itt) is task:  # not aborted meanwhile
                self._advance(task)

        future.add_done_callback(compared)

    def data_out(self, req: P.Pdu) -> None:
        itt = req.itt
        task = self.tasks.get(itt)
        if task is None:
            # Unsolicited data for a command that already failed, or data after an abort.
            return
        ttt = req.u32(20)
        datasn = req.u32(36)
        offset = req.u32(40)
        if ttt != task.ttt or (ttt == P.NO_TAG and task.unsolicited_done):
            if task.aborted:
                return
            self._fail(task, f"Data-Out with unexpected TTT 0x{ttt:08x}")
            return
        if datasn != task.datasn:
            self._fail(task, f"Data-Out DataSN {datasn}, expected {task.datasn}")
            return
        task.datasn += 1
        end = offset + len(req.data)
        try:
            # Judged before a byte is written: refused data never reaches the medium.
            first_burst = self.params.first_burst
            if ttt == P.NO_TAG and end > first_burst:
                raise DataError(f"unsolicited data beyond FirstBurstLength {first_burst}")
            if ttt != P.NO_TAG and end > task.burst_end:
                raise DataError(f"Data-Out beyond the R2T's desired length (ends at {end})")
            self._accept(task, offset, req.data)
        except DataError as e:
            self._fail(task, str(e))
            return
        if req.final:
            if ttt == P.NO_TAG:
                task.unsolicited_done = True
            else:
                task.ttt = P.NO_TAG
            task.datasn = 0
            self._advance(task)

    def _fail(self, task: WriteTask, why: str) -> None:
        log.warning("%s: write ITT 0x%08x failed: %s", self.conn.name, task.itt, why)
        self.tasks.pop(task.itt, None)
        if not task.aborted:
            cc = S.CheckCondition(S.ABORTED_COMMAND, S.DATA_PHASE_ERROR)
            self.responder.send_check(task.itt, cc)
        task.aborted = True

    def _advance(self, task: WriteTask) -> None:
        """After a sequence ends: ask for more with an R2T, or complete the command."""
        if task.aborted or task.comparing or not task.unsolicited_done or task.ttt != P.NO_TAG:
            return
        send_check = self.responder.send_check
        if task.next_offset < task.xfer:
            length = min(self.params.max_burst, task.xfer - task.next_offset)
            self._ttt = (self._ttt + 1) & 0x7FFFFFFF
            task.ttt = self._ttt
            task.datasn = 0
            task.burst_end = task.next_offset + length
            hdr = P.r2t(task.lun_field, task.itt, task.ttt, task.r2tsn, task.next_offset, length)
            task.r2tsn += 1
            self.responder.send_pdu(hdr, advance=False)
            return
        del self.tasks[task.itt]
        flags, residual = residual_bits(task.spdtl, task.edtl, P.RSP_OVERFLOW, P.RSP_UNDERFLOW)
        if task.error is not None:
            send_check(task.itt, task.error, flags, residual)
            return
        if task.miscompare is not None:
            cc = S.CheckCondition(S.MISCOMPARE, S.MISCOMPARE_DURING_VERIFY, task.miscompare)
            send_check(task.itt, cc, flags, residual)
            return
        if task.run is not None and task.parameters is not None:
            try:
                task.run(bytes(task.parameters))
            except S.CheckCondition as failure:
                send_check(task.itt, failure, flags, residual)
                return
            except OSError as e:
                log.error(
                    "%s: command 0x%08x failed on the medium: %s", self.conn.name, task.itt, e
                )
                send_check(
                    task.itt, S.CheckCondition(S.MEDIUM_ERROR, S.WRITE_ERROR), flags, residual
                )
                return
            except S.StatusReply as reply:
                self.responder.send_status(task.itt, reply.status, None, flags, residual)
                return
        if task.fua and not task.verify:
            try:
                task.lu.store.flush(task.base, task.xfer)
            except OSError as e:
                log.error("%s: flush failed: %s", self.conn.name, e)
                cc = S.CheckCondition(S.MEDIUM_ERROR, S.WRITE_ERROR)
                send_check(task.itt, cc, flags, residual)
                return
        self.responder.send_status(task.itt, S.GOOD, None, flags, residual)

    # -- task management

    def cancel(self, itt: int) -> bool:
        """ABORT TASK: forget the write (no status follows)."""
        task = self.tasks.pop(itt, None)
        if task is None:
            return False
        task.aborted = True
        return True

    def abort(self, lun: int | None) -> None:
        """Forget the writes in progress (of ``lun``, or all)."""
        for itt, task in list(self.tasks.items()):
            if lun is None or task.lun == lun:
                task.aborted = True
                del self.tasks[itt]
