"""Commands that receive data: WRITE, WRITE AND VERIFY, VERIFY with BYTCHK, and commands whose
Data-Out is a parameter list (immediate and unsolicited data, then R2T / Data-Out sequences of at
most MaxBurstLength). One concept: a data-receiving task's life from its CDB to its status;
the medium work it drives (compare, OR, parameter commands) lives in ``scsi``.

Write data goes to the medium on the event loop while the store takes it without waiting (an
image's page cache: ``Store.writes_on_loop``). Otherwise, and for a store that may block, each
Data-Out's data is copied out of the receive buffer and written (or compared) in the store's
threads (``diskio``), and so is the work done at the end (FUA's sync, a parameter command's
``run``); a command's status waits for all of it. A connection stops reading while more than
``BACKLOG`` bytes of its data wait for a disk.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from ..scsi.commands import MAX_PARAMETER_LIST
from ..scsi.compare_and_write import or_write
from ..scsi.sense import (
    ABORTED_COMMAND,
    DATA_PHASE_ERROR,
    DATA_PROTECT,
    GOOD,
    ILLEGAL_REQUEST,
    INTERNAL_FAILURE,
    INVALID_FIELD_IN_CDB,
    MEDIUM_ERROR,
    MISCOMPARE,
    MISCOMPARE_DURING_VERIFY,
    TASK_SET_FULL,
    UNRECOVERED_READ_ERROR,
    WRITE_ERROR,
    WRITE_PROTECTED,
    CheckCondition,
    StatusReply,
)
from ..scsi.unit import (
    ORWRITE16,
    VERIFY_OPS,
    WRITE_VERIFY10,
    WRITE_VERIFY12,
    WRITE_VERIFY16,
    LogicalUnit,
    check_transfer_length,
    decode_rw,
)
from ..scsi.verify_bytchk3 import compare_off_loop
from ..storage import diskio
from ..storage.first_difference import compare_with_medium
from ..storage.store import Store
from ..wire import pdu as P
from ..wire.params import SessionParams
from .data_path import Connection
from .responses import Responder, residual_bits

log = logging.getLogger("zerosend.iscsi")

#: Data-Out bytes one connection may have waiting for its stores' threads before it stops
#: reading from the initiator (the initiator's own window then holds it back).
BACKLOG = 16 << 20
#: What the statuses of parameter commands wait for (``ParameterCommand.run``'s awaitables)
_finishing: set[asyncio.Future[None]] = set()
#: Failed commands whose unsolicited Data-Out is swallowed (``Writes.discarding``); past this
#: the oldest is forgotten (its data, if it still comes, goes nowhere all the same).
DISCARDING_MAX = 256


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
        "budget",
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
        "off_loop",
        "or_data",
        "parameters",
        "pending",
        "r2tsn",
        "run",
        "same_blocks",
        "spdtl",
        "stray",
        "ttt",
        "unsolicited_done",
        "verify",
        "xfer",
    )  # fmt: skip

    def __init__(
        self, itt: int, lu: LogicalUnit, lun_field: bytes, base: int, spdtl: int, edtl: int
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
        self.error: CheckCondition | None = None
        self.aborted = False
        self.same_blocks = 0  # VERIFY BYTCHK=3: one block compared against this many
        self.comparing = False  # that comparison is running off the event loop
        # A parameter-list command: its data is collected here, then handed to ``run``.
        self.parameters: bytearray | None = None
        self.run: Callable[[bytes], Awaitable[None] | None] | None = None
        self.budget: ListBudget | None = None  # where the parameter buffer is counted
        # A command that reused this ITT was rejected: its unsolicited Data-Out (TTT 0xffffffff
        # after this task's own unsolicited data ended) is swallowed until its final PDU.
        self.stray = False
        # Data-Out, and the work done at the end, go to the store's threads (``diskio``)
        self.off_loop = lu.store.may_block
        self.pending = 0  # jobs of this command in those threads


class ListBudget(Protocol):
    """Where a connection counts the parameter-list buffers it holds (``SessionBudget``)."""

    def hold(self, nbytes: int) -> bool: ...

    def unhold(self, nbytes: int) -> None: ...


class Writes:
    """The data-receiving commands in progress on one connection, by ITT."""

    def __init__(
        self,
        conn: Connection,
        params: SessionParams,
        responder: Responder,
        stats: dict[str, int],
        budget: ListBudget | None = None,
    ) -> None:
        self.conn = conn
        self.params = params
        self.responder = responder
        self.stats = stats
        self.budget = budget
        self.tasks: dict[int, WriteTask] = {}
        # Failed commands whose unsolicited Data-Out may still come, by ITT: their status is
        # sent, so they are no tasks in progress (no CmdSN slot); each goes with its last
        # Data-Out, when its ITT is used again, or as the oldest past DISCARDING_MAX.
        self.discarding: dict[int, WriteTask] = {}
        self._ttt = 0
        self.backlog = 0  # bytes copied for the stores' threads, not yet on the medium
        self._drained: asyncio.Future[None] | None = None

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def backlogged(self) -> bool:
        """Too much data waits for a disk: stop reading until ``drained()``."""
        return self.backlog >= BACKLOG

    async def drained(self) -> None:
        while self.backlog >= BACKLOG:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained

    def command(self, req: P.Pdu, lu: LogicalUnit, cdb: bytes, edtl: int, lun_field: bytes) -> None:
        """A WRITE, WRITE AND VERIFY or VERIFY from dispatch; raises CheckCondition."""
        if self._rejected(req, edtl):
            return
        rw = decode_rw(cdb)
        op = cdb[0]
        verify = op in VERIFY_OPS
        bytchk = (rw.flags >> 1) & 3 if verify else 1
        if rw.flags & 0xE0:  # WRPROTECT / VRPROTECT without protection information
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)
        if verify and bytchk == 2:
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)
        lu.check_range(rw.lba, rw.blocks)
        check_transfer_length(rw.blocks)
        if not verify and lu.readonly:
            raise CheckCondition(DATA_PROTECT, WRITE_PROTECTED)
        bs = lu.store.block_size
        if verify and bytchk == 0:  # medium verification only: the range check is it
            self.discard_unsolicited(req, edtl)
            rsp = residual_bits(0, edtl, P.RSP_OVERFLOW, P.RSP_UNDERFLOW)
            self.responder.send_status(req.itt, GOOD, None, *rsp)
            return
        spdtl = bs if (verify and bytchk == 3) else rw.blocks * bs
        if not req.flags & P.CMD_WRITE:
            edtl = 0
        task = WriteTask(req.itt, lu, lun_field, rw.lba * bs, spdtl, edtl)
        task.verify = verify
        task.or_data = op == ORWRITE16
        task.fua = bool(rw.flags & 0x08) or op in (
            WRITE_VERIFY10,
            WRITE_VERIFY12,
            WRITE_VERIFY16,
        )
        if verify and bytchk == 3:
            task.same_blocks = rw.blocks
        self.discarding.pop(req.itt, None)
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
        lu: LogicalUnit,
        length: int,
        edtl: int,
        lun_field: bytes,
        run: Callable[[bytes], Awaitable[None] | None],
        off_loop: bool = False,
    ) -> None:
        """A command whose Data-Out is a parameter list of ``length`` bytes: collect it whole,
        then ``run(parameters)``, which raises CheckCondition or StatusReply to fail it, or (on
        the loop) may return an awaitable the status waits for; ``off_loop``: in the store's
        threads."""
        if length > MAX_PARAMETER_LIST:
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)
        if self._rejected(req, edtl):
            return
        if not req.flags & P.CMD_WRITE:
            edtl = 0
        task = WriteTask(req.itt, lu, lun_field, 0, length, edtl)
        if self.budget is not None:
            # The list's buffer is held until the command ends: past the session's budget the
            # command is refused (the initiator retries it later).
            if not self.budget.hold(task.xfer):
                raise StatusReply(TASK_SET_FULL)
            task.budget = self.budget
        task.parameters = bytearray(task.xfer)
        task.run = run
        task.off_loop = off_loop
        self.discarding.pop(req.itt, None)
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
            task = WriteTask(req.itt, _NOWHERE, b"", 0, 0, edtl)
            task.aborted = True
            task.next_offset = len(req.data)  # its unsolicited data continues from there
            discarding = self.discarding
            discarding.pop(req.itt, None)
            if len(discarding) >= DISCARDING_MAX:
                del discarding[next(iter(discarding))]
            discarding[req.itt] = task

    def in_progress(self, itt: int) -> bool:
        """A task in progress has this ITT (a failed command's swallowed data is none)."""
        return itt in self.tasks

    def reused(self, itt: int, req: P.Pdu) -> None:
        """A command that reused ``itt`` was rejected: its unsolicited data, if any comes, must
        not reach the task in progress."""
        task = self.tasks.get(itt)
        if task is not None and req.flags & P.CMD_WRITE and not req.final:
            if not self.params.initial_r2t and task.unsolicited_done:
                task.stray = True

    def _forget(self, task: WriteTask) -> None:
        """``task`` leaves the tables; its parameter buffer leaves the session's budget."""
        if self.tasks.get(task.itt) is task:
            del self.tasks[task.itt]
        if self.discarding.get(task.itt) is task:
            del self.discarding[task.itt]
        if task.budget is not None and task.parameters is not None:
            task.budget.unhold(len(task.parameters))
            task.budget = None

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
        at = task.base + offset
        if task.verify and task.same_blocks:
            self._verify_same(task, bytes(chunk))
            return
        try:
            plain = not task.verify and not task.or_data
            if plain and _write_on_loop(task.lu, at, chunk):
                self._landed(task, offset, usable, None, None)
                return
            job = _medium_job(task, at, chunk)
            if task.off_loop or plain:  # (plain: a thread holds the medium)
                self._offload(task, offset, functools.partial(job, bytes(chunk)), usable)
                return
            self._landed(task, offset, usable, job(chunk), None)
        except OSError as e:
            self._landed(task, offset, usable, None, e)

    def _offload(
        self, task: WriteTask, offset: int, job: Callable[[], int | None], nbytes: int
    ) -> None:
        """``job`` (a chunk of ``nbytes`` at ``offset`` of the transfer) in the threads."""
        task.pending += 1
        self.backlog += nbytes
        future = diskio.run(task.lu.store, job, changes=not task.verify)

        def done(f: asyncio.Future[int | None]) -> None:
            task.pending -= 1
            self.backlog -= nbytes
            waiter = self._drained
            if waiter is not None and self.backlog < BACKLOG and not waiter.done():
                waiter.set_result(None)
            error = f.exception()
            self._landed(task, offset, nbytes, None if error else f.result(), error)
            if self.tasks.get(task.itt) is task:  # not aborted meanwhile
                self._advance(task)

        future.add_done_callback(done)

    def _landed(
        self,
        task: WriteTask,
        offset: int,
        nbytes: int,
        mismatch: int | None,
        error: BaseException | None,
    ) -> None:
        """A chunk was written (or compared: ``mismatch``, its first differing byte)."""
        if error is not None:
            what = "verify" if task.verify else "write"
            at = task.base + offset
            log.error(
                "%s: %s of %d bytes at %d failed: %s", self.conn.name, what, nbytes, at, error
            )
            sense = UNRECOVERED_READ_ERROR if task.verify else WRITE_ERROR
            task.error = task.error or CheckCondition(MEDIUM_ERROR, sense)
        elif task.verify:
            if mismatch is not None:
                first = offset + mismatch
                task.miscompare = min(
                    first, task.miscompare if task.miscompare is not None else first
                )
        else:
            self.stats["write_bytes"] += nbytes

    def _verify_same(self, task: WriteTask, block: bytes) -> None:
        """Compare off the event loop; the command completes when the comparison has."""
        task.comparing = True
        future = compare_off_loop(task.lu.store, task.base, block, task.same_blocks)

        def compared(f: asyncio.Future[int | None]) -> None:
            task.comparing = False
            if f.cancelled():
                task.error = CheckCondition(ABORTED_COMMAND, INTERNAL_FAILURE)
            elif (exc := f.exception()) is not None:
                log.error("%s: VERIFY read failed: %s", self.conn.name, exc)
                task.error = CheckCondition(MEDIUM_ERROR, UNRECOVERED_READ_ERROR)
            else:
                task.miscompare = f.result()
            if self.tasks.get(task.itt) is task:  # not aborted meanwhile
                self._advance(task)

        future.add_done_callback(compared)

    def data_out(self, req: P.Pdu) -> None:
        itt = req.itt
        task = self.tasks.get(itt) or self.discarding.get(itt)
        if task is None:
            # Unsolicited data for a command that already failed, or data after an abort.
            return
        ttt = req.u32(20)
        datasn = req.u32(36)
        offset = req.u32(40)
        if task.stray and ttt == P.NO_TAG and task.unsolicited_done:
            if req.final:  # the rejected command's data ends here
                task.stray = False
            return
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
            if task.aborted:  # a failed command's data ended: nothing more is swallowed
                self._forget(task)
                return
            self._advance(task)

    def _fail(self, task: WriteTask, why: str) -> None:
        log.warning("%s: write ITT 0x%08x failed: %s", self.conn.name, task.itt, why)
        self._forget(task)
        if not task.aborted:
            cc = CheckCondition(ABORTED_COMMAND, DATA_PHASE_ERROR)
            self.responder.send_check(task.itt, cc)
        task.aborted = True

    def _advance(self, task: WriteTask) -> None:
        """After a sequence ends: ask for more with an R2T (while what came is still being
        written), or complete the command once all of it is."""
        if task.aborted or task.comparing or not task.unsolicited_done or task.ttt != P.NO_TAG:
            return
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
        if task.pending:
            return  # the last chunk to land comes back here
        failed = task.error is not None or task.miscompare is not None
        finish = None if failed else _finishing_job(task)
        if finish is None:
            self._complete(task, None)
        elif task.off_loop:
            task.pending += 1
            future = diskio.run(task.lu.store, finish, changes=True)

            def done(f: asyncio.Future[Awaitable[None] | None]) -> None:
                task.pending -= 1
                self._complete(task, f.exception())

            future.add_done_callback(done)
        else:
            try:
                later = finish()
            except Exception as e:
                self._complete(task, e)
                return
            if later is None:
                self._complete(task, None)
                return
            # The rest happens later (a state file's save, a copy in the threads, writes to
            # land): the status waits for it.
            task.pending += 1
            waiting = asyncio.ensure_future(later)
            _finishing.add(waiting)  # the loop keeps only a weak reference to a task

            def finished(f: asyncio.Future[None]) -> None:
                _finishing.discard(f)
                task.pending -= 1
                if f.cancelled():
                    self._complete(task, CheckCondition(ABORTED_COMMAND, INTERNAL_FAILURE))
                else:
                    self._complete(task, f.exception())

            waiting.add_done_callback(finished)

    def _complete(self, task: WriteTask, failure: BaseException | None) -> None:
        """The command's status, once its data and its final work (``failure``: what that
        raised) are done; nothing if it was aborted meanwhile."""
        if self.tasks.get(task.itt) is not task:
            return
        self._forget(task)
        flags, residual = residual_bits(task.spdtl, task.edtl, P.RSP_OVERFLOW, P.RSP_UNDERFLOW)
        send_check = self.responder.send_check
        if task.error is not None:
            send_check(task.itt, task.error, flags, residual)
        elif task.miscompare is not None:
            cc = CheckCondition(MISCOMPARE, MISCOMPARE_DURING_VERIFY, task.miscompare)
            send_check(task.itt, cc, flags, residual)
        elif failure is None:
            self.responder.send_status(task.itt, GOOD, None, flags, residual)
        elif isinstance(failure, CheckCondition):
            send_check(task.itt, failure, flags, residual)
        elif isinstance(failure, StatusReply):
            self.responder.send_status(task.itt, failure.status, None, flags, residual)
        else:
            if isinstance(failure, OSError):
                log.error("%s: command 0x%08x failed on the medium: %s", self.conn.name, task.itt,
                          failure)  # fmt: skip
                cc = CheckCondition(MEDIUM_ERROR, WRITE_ERROR)
            else:
                log.error("%s: command 0x%08x failed", self.conn.name, task.itt,
                          exc_info=failure)  # fmt: skip
                cc = CheckCondition(ABORTED_COMMAND, INTERNAL_FAILURE)
            send_check(task.itt, cc, flags, residual)

    # -- task management

    def cancel(self, itt: int) -> bool:
        """ABORT TASK: forget the write (no status follows)."""
        task = self.tasks.get(itt)
        if task is None:
            return False
        self._forget(task)
        task.aborted = True
        return True

    def abort(self, lun: int | None) -> None:
        """Forget the writes in progress (of ``lun``, or all)."""
        for task in list(self.tasks.values()):
            if lun is None or task.lun == lun:
                self._forget(task)
                task.aborted = True
        if lun is None:
            self.discarding.clear()


#: The medium of a placeholder (``Writes.discarding``): one for all of them.
_NOWHERE = LogicalUnit(-1, _NoStore(), "")


def _write_on_loop(lu: LogicalUnit, at: int, chunk: memoryview | bytes) -> bool:
    """Write ``chunk`` now if the store takes it without waiting (the page cache; measured
    five to ten times cheaper than a thread's round trip) and no thread holds the medium
    (COMPARE AND WRITE); False: it is for the threads. Raises what the write raised."""
    store = lu.store
    if not store.writes_on_loop() or not lu.media_lock.acquire(blocking=False):
        return False
    start = time.monotonic()
    try:
        store.write(at, chunk)
    finally:
        lu.media_lock.release()
    store.wrote_on_loop(time.monotonic() - start)
    return True


def _medium_job(task: WriteTask, at: int, chunk: memoryview | bytes) -> Callable[..., int | None]:
    """What a chunk of the transfer does at byte ``at`` of the medium, called with the chunk:
    compared (returns the offset of its first differing byte, or None), ORed in, or written."""
    lu = task.lu
    store = lu.store
    if task.verify:

        def compare(data: memoryview | bytes) -> int | None:
            return compare_with_medium(store, at, data)

        return compare
    if task.or_data:

        def orwrite(data: memoryview | bytes) -> None:
            or_write(lu, at, data)

        return orwrite

    def write(data: memoryview | bytes) -> None:
        with lu.media_lock:
            store.write(at, data)

    return write


def _finishing_job(task: WriteTask) -> Callable[[], Awaitable[None] | None] | None:
    """What a command does once all its data is in: a parameter command's ``run``, or the sync
    FUA asks for; raises CheckCondition or StatusReply to fail the command (or returns what the
    status waits for)."""
    if task.run is not None and task.parameters is not None:
        return functools.partial(task.run, bytes(task.parameters))
    if task.fua and not task.verify:
        return functools.partial(task.lu.store.flush, task.base, task.xfer)
    return None
