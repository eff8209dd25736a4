"""One iSCSI connection and its session (MaxConnections=1, ErrorRecoveryLevel=0): login, then
the full feature phase, where PDUs are read (``reader``), dispatched here, answered through
``responses`` into the ``outbox``; READs go through ``reads``, data-receiving commands through
``writes``, task management through ``task_management``. The target is reached only through
the ``SessionHost`` protocol, defined here. One concept: a connection's life from accept to
close; its parts are modules of their own, what stays here is their dispatch and shared state.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Awaitable, Container
from time import perf_counter
from typing import Protocol

import zerosend
from zerosend import BackendName

from ..scsi.acl import LunView, peer_address
from ..scsi.commands import CommandSet, ParameterCommand
from ..scsi.nexus import NO_NEXUS, Nexus
from ..scsi.sense import (
    ILLEGAL_REQUEST,
    INVALID_FIELD_IN_CDB,
    MEDIUM_ERROR,
    UNRECOVERED_READ_ERROR,
    CheckCondition,
    StatusReply,
)
from ..scsi.unit import READ_OPS, VERIFY_OPS, WRITE_OPS, LogicalUnit
from ..storage import diskio
from ..storage.store import Store
from ..wire import pdu as P
from ..wire.bufpool import MmapPool
from ..wire.outbox import ZC_MIN, Outbox
from ..wire.params import SessionParams
from ..wire.reader import ConnectionClosed, PduReader
from ..wire.window import CmdWindow, held_size
from .budget import SessionBudget
from .latency import OTHER, READ, WRITE, LunLatency
from .liveness import Pinger, reset_connection
from .login import LoginFailed, LoginMachine, LoginPolicy, failure_response
from .reads import Reads
from .responses import Responder
from .task_management import task_management
from .writes import Writes

log = logging.getLogger("zerosend.iscsi")

LOGIN_TIMEOUT = 30.0
DRAIN_TIMEOUT = 10.0  # for what is queued at the end, before the connection is reset
_RECEIVE_BUFFER = 2 * P.BHS_LEN + 8192 + 64
_FULL_FEATURE_OPS = frozenset(
    (P.OP_SCSI_CMD, P.OP_NOP_OUT, P.OP_TMF_REQ, P.OP_TEXT_REQ, P.OP_LOGOUT_REQ, P.OP_LOGIN_REQ)
)


class SessionSettings(Protocol):
    """The target's settings a session reads (``TargetConfig`` has them)."""

    @property
    def backend(self) -> BackendName: ...
    @property
    def zerocopy_probe(self) -> bool: ...
    @property
    def read_loop(self) -> str: ...
    @property
    def sendfile(self) -> bool: ...
    @property
    def cross_session_resets(self) -> bool: ...
    @property
    def session_commands(self) -> int: ...
    @property
    def session_bytes(self) -> int: ...
    @property
    def session_buffers(self) -> int: ...
    @property
    def nop_interval(self) -> float: ...
    @property
    def nop_timeout(self) -> float: ...


class SessionHost(Protocol):
    """The target as its sessions see it: shared resources, and the session registry."""

    @property
    def config(self) -> SessionSettings:
        """The settings; sessions read how to transmit (backend, zero-copy probe)."""

    @property
    def policy(self) -> LoginPolicy:
        """Who may log in, and how."""

    @property
    def luns(self) -> dict[int, LogicalUnit]: ...

    @property
    def latency(self) -> dict[int, LunLatency]:
        """The latency histograms of the target's LUNs (empty: not measured)."""

    def policies(self) -> list[LoginPolicy]:
        """Every target's login policy (a login picks one by its TargetName)."""

    def for_target(self, iqn: str) -> SessionHost:
        """Target ``iqn`` as the sessions logged in to it see it (its LUNs, commands...)."""

    def visible_targets(self, initiator: str, address: str) -> list[str]:
        """The targets ``initiator`` may log in to from ``address`` (SendTargets)."""

    @property
    def commands(self) -> CommandSet:
        """The SCSI commands that are not READ or WRITE."""

    @property
    def pool(self) -> MmapPool:
        """Transmit buffers, shared by every session (each through its ``share()``)."""

    @property
    def stopping(self) -> bool:
        """Shutting down: sessions end once idle."""

    def session_started(self, session: Session, initiator: str, isid: bytes) -> int:
        """A login reached full feature phase: register it (reinstating an older session of
        the same initiator and ISID) and return its TSIH."""

    def session_of(self, initiator: str, isid: bytes) -> Session | None:
        """The logged-in session of this I_T nexus, if any (a new login reinstates it)."""

    def session_ended(self, session: Session) -> None: ...

    def abort_tasks(self, lun: int | None, only: Session | None) -> None:
        """Abort the tasks of ``lun`` (None: all) in session ``only`` (None: in every one)."""

    def reset_logical_units(self, lun: int | None) -> None:
        """LOGICAL UNIT RESET of ``lun`` (None: a target reset): SPC-2 reservations end, every
        nexus gets a unit attention."""

    def reset(self) -> None:
        """TARGET COLD RESET: drop every connection."""

    def others_logged_in(self, session: Session) -> bool:
        """A normal session other than ``session`` is logged in: a reset would reach it."""


class Session:
    """Login, then full feature phase, on one accepted connection."""

    def __init__(self, host: SessionHost, sock: socket.socket, peer: str) -> None:
        self.host = host
        self.sock = sock
        self.peer = peer
        self.name = peer
        self.loop = asyncio.get_running_loop()
        # The outbox picks the batches that go zero-copy by ZC_MIN; the driver keeps that floor.
        self.zs = zerosend.wrap(sock, backend=host.config.backend, zerocopy_threshold=ZC_MIN)
        self.params = SessionParams()
        self.discovery = False
        self.nexus = NO_NEXUS
        self.logged_in = False
        self.initiator = ""  # once logged in
        self.luns_addressed: set[int] = set()  # by commands outside the READ inner loop
        self.closing = False
        self.dead = False  # found dead: the connection is reset, not drained
        self.failed: BaseException | None = None
        self.stats = {"commands": 0, "read_bytes": 0, "write_bytes": 0, "zc_sends": 0,
                      "zc_fallbacks": 0}  # fmt: skip
        cfg = host.config
        self.window = CmdWindow(self._room)
        self.budget = SessionBudget(self.window, cfg.session_commands, cfg.session_bytes)
        # A command being dispatched: neither a task nor a status yet, but one of the session's
        # (its Data-In may carry MaxCmdSN before its status is queued)
        self._dispatching = 0
        self.budget.on_release = self._released
        self.share = host.pool.share(cfg.session_buffers)
        self.outbox = Outbox(self.zs, self.share, peer, self.stats, self._send_failed,
                             cfg.zerocopy_probe)  # fmt: skip
        self.outbox.on_submit.append(self.budget.submitted)
        self.reader = PduReader(sock, _RECEIVE_BUFFER, self.outbox.flush)
        self.responder = Responder(self.outbox, self.window, self.params, self.stats)
        self.luns = LunView(host.luns)  # masked by the initiator's ACL once it logged in
        # Its target's latency histograms by LUN, once logged in (empty: metrics off)
        self.latency: dict[int, LunLatency] = {}
        self.reads = Reads(self, self.luns, self.share, self.params, self.reader, self.window,
                           self.responder, self.stats, native=cfg.read_loop == "native",
                           sendfile=cfg.sendfile)  # fmt: skip
        self.writes = Writes(self, self.params, self.responder, self.stats, self.budget)
        self.pinger = Pinger(cfg.nop_interval, cfg.nop_timeout, self._progress, self._busy,
                             self._ping, self._found_dead)  # fmt: skip
        self._task: asyncio.Task[None] | None = None
        self._pinging: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- for the target

    def start(self) -> asyncio.Task[None]:
        """Run the connection; the task ends when it is closed."""
        self._task = self.outbox.reader_task = self.loop.create_task(self._run())
        return self._task

    def stop(self) -> None:
        """Shutdown: stop reading now; what is queued is still sent."""
        self.closing = True
        if self._task is not None:
            self._task.cancel()

    def abort_connection(self) -> None:
        """Stop reading; the connection then drains and closes."""
        if not self.closing:
            self.closing = True
            if self._task is not None and self._task is not asyncio.current_task():
                self._task.cancel()

    def abort_tasks(self, lun: int | None) -> None:
        """Abort the reads and writes in progress (of ``lun``, or all)."""
        self.reads.abort(lun)
        self.writes.abort(lun)
        self.responder.untime(lun)

    def luns_in_use(self) -> set[int]:
        """The LUNs this session addressed (a reload that removes one ends the session)."""
        return self.luns_addressed | self.reads.luns_cached()

    def state_line(self) -> str:
        """The connection's windows and in-flight counts, for the state dump (SIGUSR1)."""
        w = self.window
        return (
            f"{self.name} ExpCmdSN={w.expcmdsn} MaxCmdSN={w.maxcmdsn} "
            f"active={len(self.reads) + len(self.writes)} writes={len(self.writes)} "
            f"reads={len(self.reads)} discarding={len(self.writes.discarding)} "
            f"inflight={getattr(self.zs, 'inflight', '?')} "
            f"unreleased-statuses={self.budget.statuses} unreleased-bytes={self.budget.bytes} "
            f"held-bytes={self.budget.held} buffers={self.share.held}"
        )

    def summary(self) -> str:
        """Byte counts, and how the data went out: the backend, bytes sent zero-copy (released
        uncopied, or copied by the kernel on delivery), copied, and probe fallbacks to copy."""
        st = self.stats
        zs = self.zs.stats
        return (
            f"commands={st['commands']} read={st['read_bytes']} bytes "
            f"write={st['write_bytes']} bytes data-in sends={st['zc_sends']} "
            f"backend={self.zs.backend} zerocopy-bytes={zs['bytes_zerocopy']} "
            f"kernel-copied-bytes={zs['bytes_copied_by_kernel']} "
            f"copied-bytes={zs['bytes_copied'] - zs['bytes_copied_by_kernel']} "
            f"probe-fallbacks={st['zc_fallbacks']}"
        )

    # ---------------------------------------------------------------- lifecycle

    async def _run(self) -> None:
        try:
            try:
                await asyncio.wait_for(self._login(), LOGIN_TIMEOUT)
            except TimeoutError:
                log.warning(
                    "%s: login not finished within %.0fs; closing", self.name, LOGIN_TIMEOUT
                )
                return
            if self.logged_in:
                if self.pinger.interval > 0:
                    self._pinging = self.loop.create_task(self.pinger.run())
                await self._full_feature()
        except ConnectionClosed:
            if self.logged_in:
                log.info("%s: connection closed by initiator", self.name)
            else:
                log.warning("%s: connection closed before login completed", self.name)
        except P.PduError as e:
            log.warning("%s: protocol error: %s; closing connection", self.name, e)
        except OSError as e:
            log.warning("%s: connection error: %s", self.name, e)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("%s: internal error; closing connection", self.name)
        finally:
            await self._shutdown()

    def _send_failed(self, exc: BaseException) -> None:
        if self.failed is None:
            self.failed = exc
            log.warning("%s: send failed: %s; closing connection", self.name, exc)
        self.abort_connection()

    async def _shutdown(self) -> None:
        """Free everything the session held: its tasks, its buffers, both descriptors."""
        self.closing = True
        if self._pinging is not None:
            self._pinging.cancel()
        self.writes.abort(None)
        self.reads.abort(None)
        self.share.close()
        self.reader.close()
        if self.dead:
            self._reset()
        try:
            self.outbox.flush()
        except Exception:  # already reported; the socket is closed below all the same
            pass
        try:
            await asyncio.wait_for(self.zs.aclose(), DRAIN_TIMEOUT)
        except (TimeoutError, OSError, asyncio.CancelledError) as e:
            log.warning("%s: close did not drain cleanly: %s; resetting the connection",
                        self.name, e or type(e).__name__)  # fmt: skip
            self._reset()  # the sends still in flight end, their buffers come back
            try:
                await asyncio.wait_for(self.zs.aclose(), DRAIN_TIMEOUT)
            except (TimeoutError, OSError, asyncio.CancelledError):
                self.sock.close()
        self.host.session_ended(self)

    def _reset(self) -> None:
        try:
            reset_connection(self.sock)
        except OSError as e:
            log.warning("%s: %s", self.name, e)

    # ---------------------------------------------------------------- limits and liveness

    def _room(self) -> int:
        """Commands the session may still take (``SessionBudget``): its CmdSN window."""
        tasks = len(self.reads.tasks) + len(self.writes.tasks) + self._dispatching
        return self.budget.room(tasks)

    def _released(self) -> None:
        """A send was released: if the window was closed and now has room, say so with a
        NOP-In (nothing else may be on its way to tell the initiator)."""
        if self.logged_in and not self.closing and self.window.closed and self._room() > 0:
            self.responder.send_pdu(P.nop_in(bytes(8), P.NO_TAG, P.NO_TAG, 0), advance=False)

    def _progress(self) -> tuple[int, int, int]:
        return self.budget.released, self.stats["commands"], self.stats["write_bytes"]

    def _busy(self) -> bool:
        return bool(self.budget.sends or len(self.outbox) or self.reads or self.writes)

    def _ping(self, ttt: int) -> None:
        self.responder.send_pdu(P.nop_in(bytes(8), P.NO_TAG, ttt, 0), advance=False)

    def _found_dead(self) -> None:
        p = self.pinger
        log.warning(
            "%s: initiator declared dead: no progress for %gs and no answer to a NOP-In ping "
            "within %gs; resetting the connection", self.name, p.interval, p.timeout,
        )  # fmt: skip
        self.dead = True
        self.abort_connection()

    # ---------------------------------------------------------------- login

    async def _login(self) -> None:
        machine = LoginMachine(self.host.policies(), peer_address(self.peer))
        first = True
        while True:
            try:
                req = await self.reader.read_pdu(8192, False, False, login=True)
            except P.PduError as e:
                log.warning("%s: bad PDU during login: %s; closing", self.name, e)
                return
            if first:  # StatSN starts where the initiator expects it
                self.window.statsn = req.u32(28)
                first = False
            try:
                hdr, data = machine.step(req)
            except LoginFailed as e:
                who = machine.state.initiator or "unknown initiator"
                log.warning("%s: login of %s rejected: %s", self.name, who, e)
                self.stats["login_failures"] = 1
                self.window.open_at(req.u32(24))
                await self.responder.send_now(failure_response(req, e.status))
                return
            st = machine.state
            self.window.open_at(st.first_cmdsn)
            if not machine.done:
                await self.responder.send_now(hdr, data)
                continue
            if not st.discovery:  # from now on the session sees the target it logged in to
                self.host = self.host.for_target(machine.policy.iqn)
                self.luns.serve(self.host.luns, machine.acl)
                self.latency = self.host.latency
            reinstating = self.host.session_of(st.initiator, bytes(st.isid)) is not None
            tsih = self.host.session_started(self, st.initiator, st.isid)
            if reinstating:
                # The old session's writes already in a disk's hands land before the initiator
                # hears that the new one is up (it may write the same blocks again).
                landing = diskio.changes([lu.store for lu in self.host.luns.values()])
                if landing:
                    await asyncio.wait(landing)
            struct.pack_into(">H", hdr, 14, tsih)
            self.logged_in = True
            self.nexus = Nexus(st.initiator, bytes(st.isid))
            self.discovery = st.discovery
            self.initiator = st.initiator
            self.name = self.outbox.name = f"{self.peer} {st.initiator} tsih={tsih}"
            # Header/data digests start with the first PDU after the final login response.
            p = self.params
            p.update_from(st.params)
            digests = (p.header_digest, p.data_digest)
            p.header_digest = p.data_digest = False
            await self.responder.send_now(hdr, data)
            p.header_digest, p.data_digest = digests
            self.budget.start()
            log.info(
                "%s: %s session logged in (auth=%s, digests=%s/%s, mrdsl=%d/%d, burst=%d)",
                self.name, "discovery" if self.discovery else "normal",
                machine.auth_user or "none",
                "CRC32C" if digests[0] else "None", "CRC32C" if digests[1] else "None",
                p.initiator_max_recv_dsl, p.target_max_recv_dsl, p.max_burst,
            )  # fmt: skip
            return

    # ---------------------------------------------------------------- full feature phase

    async def _full_feature(self) -> None:
        p = self.params
        rd = self.reader
        window = self.window
        outbox = self.outbox
        respond = self.responder
        # Plain READs are served straight from the receive buffer (no digests to check there)
        inner_loop = not (p.header_digest or p.data_digest or self.discovery)
        while not self.closing:
            if self.writes.backlogged:
                await self.writes.drained()
                continue
            if inner_loop and rd.buffered < P.BHS_LEN:
                await rd.fill(P.BHS_LEN)
            if inner_loop and rd.buf[rd.start] & 0x3F == P.OP_SCSI_CMD:  # (a READ, maybe)
                advertised = window.maxcmdsn
                window.slide()  # the run's answers carry the room the session has now
                if self.reads.serve_run():
                    outbox.flush_if_due()
                    continue
                window.maxcmdsn = advertised  # nothing carried it: the window is as advertised
                if self.reads.starved:
                    await self.reads.wait_for_buffer()
                    continue
            try:
                req = await rd.read_pdu(p.target_max_recv_dsl, p.header_digest, p.data_digest)
            except P.PduError as e:
                log.warning("%s: %s; closing connection", self.name, e)
                return
            op = req.opcode
            if op == P.OP_DATA_OUT:
                self.writes.data_out(req)
                continue
            if op == P.OP_SNACK:
                respond.send_reject(P.REJECT_SNACK, req.bhs, "SNACK at ErrorRecoveryLevel 0")
                continue
            if op not in _FULL_FEATURE_OPS:
                respond.send_reject(P.REJECT_NOT_SUPPORTED, req.bhs, f"unknown {req.name}")
                continue
            if op == P.OP_LOGIN_REQ:
                respond.send_reject(
                    P.REJECT_PROTOCOL_ERROR, req.bhs, "Login-Request in full feature phase"
                )
                continue
            if req.immediate:
                if op == P.OP_SCSI_CMD and self._room() <= 0:
                    respond.send_reject(P.REJECT_IMMEDIATE, req.bhs, "session at its limit")
                    continue
                await self._dispatch(req)
                continue
            cmdsn = req.u32(24)
            if window.accept(cmdsn):
                await self._dispatch(req)
                while (due := window.take_due()) is not None:
                    await self._dispatch(due)
            elif window.ahead(cmdsn) and not self.budget.fits(held_size(req)):
                # Only an initiator that leaves a CmdSN gap on purpose (one connection) gets
                # here; refusing the one command would stall the session at the gap.
                log.warning(
                    "%s: commands held for CmdSN %d hold %d bytes, past the session's budget "
                    "of %d; closing connection",
                    self.name, window.expcmdsn, window.held_bytes, self.budget.max_bytes,
                )  # fmt: skip
                return
            else:
                if req.data:  # kept past the receive buffer's reuse (NOP-Out, Text too)
                    req = P.Pdu(req.bhs, req.ahs, bytes(req.data))
                if not window.hold(cmdsn, req):
                    log.warning(
                        "%s: %s CmdSN %d outside window [%d, %d]; ignored",
                        self.name, req.name, cmdsn, window.expcmdsn, window.maxcmdsn,
                    )  # fmt: skip
            outbox.flush_if_due()
            if self.host.stopping and not self.writes and not self.reads:
                return

    async def _dispatch(self, req: P.Pdu) -> None:
        op = req.opcode
        if op == P.OP_SCSI_CMD:
            if self.discovery:
                self.responder.send_reject(
                    P.REJECT_PROTOCOL_ERROR, req.bhs, "SCSI command in discovery session"
                )
                return
            self._scsi_command(req)
        elif op == P.OP_NOP_OUT:
            self._nop_out(req)
        elif op == P.OP_TEXT_REQ:
            self._text(req)
        elif op == P.OP_TMF_REQ:
            task_management(_Tasks(self), req)
        elif op == P.OP_LOGOUT_REQ:
            await self._logout(req)

    def _scsi_command(self, req: P.Pdu) -> None:
        self._dispatching = 1
        try:
            self._run_command(req)
        finally:
            self._dispatching = 0

    def itts_in_progress(self) -> tuple[Container[int], ...] | None:
        reads, writes = self.reads.tasks, self.writes.tasks
        return (reads, writes) if reads or writes else None

    def _run_command(self, req: P.Pdu) -> None:
        self.stats["commands"] += 1
        bhs = req.bhs
        itt = req.itt
        if self.writes.in_progress(itt) or itt in self.reads.tasks:
            # RFC 7143 11.17.1: rejected, and the task that has the ITT carries on
            self.writes.reused(itt, req)
            self.responder.send_reject(
                P.REJECT_TASK_IN_PROGRESS, bhs, f"ITT 0x{itt:08x} belongs to a task in progress"
            )
            return
        edtl = req.u32(20)
        cdb = bhs[32:48]
        if req.ahs:
            # Extended CDB AHS (type 1): the CDB continues past 16 bytes
            ahs = req.ahs
            if len(ahs) >= 4 and ahs[2] == 1:
                cdb = cdb + ahs[4 : 4 + struct.unpack_from(">H", ahs, 0)[0] - 1]
        lun_field = bytes(bhs[8:16])
        lun = P.decode_lun(lun_field)
        self.luns_addressed.add(lun)
        lu = self.luns.get(lun)
        op = cdb[0]
        latency = self.latency.get(lun) if lu is not None else None
        if latency is not None:  # metrics on: observed when its status is queued
            family = READ if op in READ_OPS else WRITE if op in WRITE_OPS else OTHER
            self.responder.timing[itt] = (perf_counter(), latency.commands[family], lun)
        try:
            if lu is not None:
                self.host.commands.admit(lu, cdb, self.nexus)
                if op in READ_OPS:
                    self.reads.command(req, lu, cdb, edtl, lun_field)
                    return
                if op in WRITE_OPS or op in VERIFY_OPS:
                    self.writes.command(req, lu, cdb, edtl, lun_field)
                    return
                parameter_command = self.host.commands.table.parameters.get(op)
                if parameter_command is not None:
                    self._parameter_command(req, lu, cdb, edtl, lun_field, parameter_command)
                    return
            data = self.host.commands.execute(lu, cdb, self.nexus)
            if not isinstance(data, bytes):  # it completes later, as a task (``Reads.later``)
                if req.flags & P.CMD_WRITE:
                    self.writes.discard_unsolicited(req, edtl)
                self.reads.later(itt, lun_field, data, edtl)
                return
        except CheckCondition as cc:
            self.writes.discard_unsolicited(req, edtl)
            self.responder.send_check(itt, cc)
            return
        except StatusReply as reply:
            self.writes.discard_unsolicited(req, edtl)
            self.responder.send_status(itt, reply.status, None)
            return
        except OSError as e:
            log.error("%s: %s failed on LUN: %s", self.name, cdb[:1].hex(), e)
            self.writes.discard_unsolicited(req, edtl)
            medium = CheckCondition(MEDIUM_ERROR, UNRECOVERED_READ_ERROR)
            self.responder.send_check(itt, medium)
            return
        if req.flags & P.CMD_WRITE:
            self.writes.discard_unsolicited(req, edtl)
        self.responder.reply_data(itt, lun_field, data, edtl)

    def _parameter_command(
        self,
        req: P.Pdu,
        lu: LogicalUnit,
        cdb: bytes,
        edtl: int,
        lun_field: bytes,
        command: ParameterCommand,
    ) -> None:
        commands, nexus = self.host.commands, self.nexus
        length = command.length(cdb)
        if command.check is not None:
            command.check(lu, cdb)
        if command.exact and length != (edtl if req.flags & P.CMD_WRITE else 0):
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)

        def run(parameters: bytes) -> Awaitable[None] | None:
            return command.run(commands, lu, cdb, parameters, nexus)

        self.writes.parameters(req, lu, length, edtl, lun_field, run, command.off_loop(lu.store))

    def _nop_out(self, req: P.Pdu) -> None:
        itt = req.itt
        if itt == P.NO_TAG:  # an answer to our ping, or a CmdSN-only update
            ttt = req.u32(20)
            if ttt != P.NO_TAG and not self.pinger.answered(ttt):
                log.info("%s: NOP-Out answers a ping (TTT 0x%08x) not outstanding", self.name, ttt)
            return
        if req.u32(20) != P.NO_TAG:
            self.responder.send_reject(
                P.REJECT_PROTOCOL_ERROR, req.bhs, "NOP-Out answers a ping we never sent"
            )
            return
        data = bytes(req.data)
        self.responder.send_pdu(P.nop_in(bytes(req.bhs[8:16]), itt, P.NO_TAG, len(data)), data)

    def _text(self, req: P.Pdu) -> None:
        try:
            pairs = P.parse_text(req.data)
        except P.PduError as e:
            self.responder.send_reject(e.reason, req.bhs, str(e))
            return
        answers: list[tuple[str, str]] = []
        for key, value in pairs:
            if key == "SendTargets":
                answers += self._send_targets(value)
            elif key == "MaxRecvDataSegmentLength":
                # Declarative: each side says what it receives, so the answer is our own limit.
                # (The initiator's value is not taken up: the Data-In we send keep the limit
                # declared at login, which the READ path's inner loop was built with.)
                try:
                    valid = 512 <= int(value, 0) <= 16777215
                except ValueError:
                    valid = False
                answers.append((key, str(self.params.target_max_recv_dsl) if valid else "Reject"))
            else:
                answers.append((key, "NotUnderstood"))
        data = P.build_text(answers)[: self.params.initiator_max_recv_dsl]
        self.responder.send_pdu(P.text_response(req.itt, True, False, P.NO_TAG, len(data)), data)

    def _send_targets(self, value: str) -> list[tuple[str, str]]:
        # "All" (any session): every target the initiator may log in to; a target's name;
        # empty: the current target (normal sessions only)
        visible = self.host.visible_targets(self.initiator, peer_address(self.peer))
        if value == "All":
            names = visible
        elif value == "" and not self.discovery:
            names = [self.host.policy.iqn]
        else:
            names = [value] if value in visible else []
        host, port = self.sock.getsockname()[:2]
        if ":" in host:
            host = f"[{host}]"
        address = f"{host}:{port},1"
        return [pair for iqn in names for pair in (("TargetName", iqn), ("TargetAddress", address))]

    async def _logout(self, req: P.Pdu) -> None:
        reason = req.flags & 0x7F
        if reason == 2:  # remove connection for recovery: needs ErrorRecoveryLevel 2
            self.responder.send_pdu(P.logout_response(req.itt, 2))
            return
        if reason not in (0, 1):
            self.responder.send_reject(P.REJECT_INVALID_FIELD, req.bhs, f"logout reason {reason}")
            return
        log.info("%s: logout (reason %d)", self.name, reason)
        await self.responder.send_now(P.logout_response(req.itt, 0, 0, 0))
        self.closing = True


class _Tasks:
    """The session as task management sees it (``task_management.Requester``): the few things
    it asks of the session and of the target behind it."""

    def __init__(self, session: Session) -> None:
        self._session = session

    @property
    def name(self) -> str:
        return self._session.name

    @property
    def closing(self) -> bool:
        return self._session.closing

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._session.loop

    @property
    def expcmdsn(self) -> int:
        return self._session.window.expcmdsn

    @property
    def cross_session_resets(self) -> bool:
        return self._session.host.config.cross_session_resets

    def sees(self, lun: int) -> bool:
        return lun in self._session.luns

    def cancel(self, itt: int) -> bool:
        self._session.responder.timing.pop(itt, None)  # (no status follows)
        return self._session.writes.cancel(itt) or self._session.reads.cancel(itt)

    def others_logged_in(self) -> bool:
        return self._session.host.others_logged_in(self._session)

    def abort_tasks(self, lun: int | None, everywhere: bool) -> None:
        self._session.host.abort_tasks(lun, None if everywhere else self._session)

    def reset_logical_units(self, lun: int | None) -> None:
        self._session.host.reset_logical_units(lun)

    def reset_target(self) -> None:
        self._session.loop.call_soon(self._session.host.reset)

    def stores(self, lun: int | None) -> list[Store]:
        luns = self._session.host.luns
        scope = list(luns) if lun is None else [lun]
        return [luns[n].store for n in scope if n in luns]

    def count_reset(self) -> None:
        stats = self._session.stats
        stats["resets"] = stats.get("resets", 0) + 1

    def send_pdu(self, pdu: bytearray) -> None:
        self._session.responder.send_pdu(pdu)
