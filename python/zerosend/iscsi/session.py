"""One iSCSI connection and its session (MaxConnections=1, ErrorRecoveryLevel=0).

Receiving: PDUs are parsed out of one receive buffer; every recv takes whatever has arrived, so
one call usually brings several commands.
Transmitting: every PDU is queued in an outbox, in order, and the outbox goes to the zerosend
socket as one vectored send when the reader runs out of received PDUs (or a task outside the read
loop finishes queueing). A Data-In PDU is [header(+digest), data views, padding, data digest]; the
data views point into pooled buffers (or memory the store owns), and a pooled buffer is released
only when the send that carries it has resolved, i.e. when the kernel let go of the pages.

The common command, a READ(10)/READ(16) answered by one Data-In PDU with status, takes a fast
path (``Session._fast_read``): one header unpack, one pread into the batch's pooled buffer right
behind the Data-In header packed in front of it, so a batch of small reads is one contiguous
region and one send. Runs of such reads go through the same loop in Rust
(``zerosend._native.IscsiReadPath``); ``ZEROSEND_ISCSI_NATIVE=0`` keeps it in Python.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import pdu as P
from . import scsi as S
from .login import LoginFailed, LoginMachine, failure_response
from .params import SessionParams
from .stores import FileStore, MemoryStore, NullStore

try:  # the READ fast path's inner loop, in Rust
    from zerosend._native import IscsiReadPath
except ImportError:  # an older build of the extension: the Python loop does the same
    IscsiReadPath = None  # type: ignore[assignment,misc]
if os.environ.get("ZEROSEND_ISCSI_NATIVE", "1") == "0":  # for comparisons
    IscsiReadPath = None  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    from .target import Target

log = logging.getLogger("zerosend.iscsi")

CMD_WINDOW = 128
MAX_AHS = 272  # an extended CDB of up to 260 bytes plus its AHS header
LOGIN_TIMEOUT = 30.0
_U32 = struct.Struct(">I")
_SERIAL_HALF = 1 << 31
# A Data-In segment at least this long makes its batch go zero-copy (below it the kernel's copy
# is cheaper than pinning pages and waiting for the release: zerosend's own default threshold).
ZC_MIN = 10240
# When the kernel reports this many zero-copy sends in a row as copied (loopback, veth, a device
# without scatter-gather: kernel msg_zerocopy.rst suggests falling back then), the connection
# sends by copy, which is cheaper there, and asks for zero-copy again after ZC_RETRY large sends.
ZC_PROBE = 8
ZC_RETRY = 1024
OUTBOX_MAX = 256  # buffers queued before a send goes out even though more PDUs are waiting
# SCSI Command BHS up to the CDB: opcode, flags, AHS+DSL, LUN, ITT, EDTL, CmdSN
_CMD = struct.Struct(">BB2xI8sIII")
_READ10 = struct.Struct(">xBIxH")  # flags, LBA, transfer length
_READ16 = struct.Struct(">xBQI")
# A whole Data-In BHS: opcode, flags, status, AHS+DSL, LUN, ITT, TTT, StatSN, ExpCmdSN, MaxCmdSN,
# DataSN, buffer offset, residual
_DATAIN_BHS = struct.Struct(">BBxBI8sIIIIIIII")
_DATAIN_GOOD = P.F_FINAL | P.DATAIN_STATUS


def _sn_lt(a: int, b: int) -> bool:
    """Serial number arithmetic (RFC 1982) on 32-bit sequence numbers: a < b."""
    return a != b and ((b - a) & 0xFFFFFFFF) < _SERIAL_HALF


class ConnectionClosed(Exception):
    pass


class _Reader:
    """Buffered PDU reader over a non-blocking socket.

    recv is tried first, so PDUs that already arrived cost no trip through the selector; only
    when it would block does the reader register with the loop, and it stays registered while
    it keeps waiting (no add/remove per wait). ``idle`` runs before every recv: the session
    sends what it queued for the PDUs read so far.
    """

    def __init__(self, sock: socket.socket, size: int, idle: Callable[[], Any]) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.loop = asyncio.get_running_loop()
        self.idle = idle
        self.buf = bytearray(size)
        self.mv = memoryview(self.buf)
        self.start = 0
        self.end = 0
        self.waiter: asyncio.Future[None] | None = None
        self.watching = False

    def _readable(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)
        elif self.watching:  # nobody waits: stop watching rather than spin
            self.watching = False
            self.loop.remove_reader(self.fd)

    def close(self) -> None:
        if self.watching:
            self.watching = False
            self.loop.remove_reader(self.fd)

    async def fill(self, n: int) -> None:
        if self.end - self.start >= n:
            return
        if len(self.buf) - self.start < n:
            have = self.end - self.start
            if n > len(self.buf):  # a larger negotiated segment: grow once
                new = bytearray(max(n, 2 * len(self.buf)))
                new[:have] = self.mv[self.start : self.end]
                self.mv.release()
                self.buf, self.mv = new, memoryview(new)
            else:
                self.mv[:have] = self.mv[self.start : self.end]
            self.start, self.end = 0, have
        while self.end - self.start < n:
            self.idle()
            try:
                got = self.sock.recv_into(self.mv[self.end :])
            except (BlockingIOError, InterruptedError):
                waiter = self.loop.create_future()
                self.waiter = waiter
                if not self.watching:
                    self.watching = True
                    self.loop.add_reader(self.fd, self._readable)
                try:
                    await waiter
                finally:
                    self.waiter = None
                continue
            if got == 0:
                raise ConnectionClosed("peer closed the connection")
            self.end += got

    async def take(self, n: int) -> memoryview:
        """n bytes as a view valid until the next call."""
        await self.fill(n)
        view = self.mv[self.start : self.start + n]
        self.start += n
        return view


class WriteTask:
    """A command that receives data: WRITE, WRITE AND VERIFY, VERIFY with BYTCHK."""

    __slots__ = (
        "aborted",
        "base",
        "burst_end",
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
        "r2tsn",
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


class Session:
    """Login, then full feature phase, on one accepted connection."""

    def __init__(self, target: Target, sock: socket.socket, peer: str) -> None:
        self.target = target
        self.sock = sock
        self.peer = peer
        self.loop = asyncio.get_running_loop()
        self.zs = target.wrap(sock)
        self.params = SessionParams()
        self.name = peer
        self.initiator = ""
        self.isid = b""
        self.tsih = 0
        self.discovery = False
        self.statsn = 0
        self.expcmdsn = 0
        self.maxcmdsn = 0
        self.active = 0  # commands in progress (shown by the SIGUSR1 state dump)
        self.pending_cmds: dict[int, P.Pdu] = {}
        self.writes: dict[int, WriteTask] = {}
        self.reads: dict[
            int, tuple[asyncio.Task[None], int]
        ] = {}  # multi-buffer Data-In in progress
        self.ttt_counter = 0
        self.closing = False
        self.failed: BaseException | None = None
        self.reader = _Reader(sock, 2 * P.BHS_LEN + 8192 + 64, self._flush)
        self.task: asyncio.Task[None] | None = None
        # The outbox: buffers of PDUs queued in order, the pooled buffers their send releases,
        # and the pooled buffer small reads are being packed into (``_cur``, used up to
        # ``_cur_pos``, of which ``_cur_from`` onwards is not in the outbox yet).
        self._out: list[Any] = []
        self._out_leases: list[Any] = []
        self._out_zc = False
        self._zc_copied = 0  # zero-copy sends in a row that the kernel copied anyway
        self._zc_skip = 0  # large sends still to go by copy before zero-copy is tried again
        self._flush_soon = False
        self._cur: Any = None
        self._cur_from = 0
        self._cur_pos = 0
        self._fast_luns: dict[bytes, tuple[S.LogicalUnit, Any, int, int, int, Any] | None] = {}
        self._native: Any = None  # the Rust READ path of the LUN last read through it
        self.stats = {
            "commands": 0,
            "read_bytes": 0,
            "write_bytes": 0,
            "zc_sends": 0,
            "zc_fallbacks": 0,
        }

    # ---------------------------------------------------------------- sending

    def _check_send(self, fut: Any) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            if self.failed is None:
                self.failed = exc
                log.warning("%s: send failed: %s; closing connection", self.name, exc)
            self.abort_connection()

    def _seal(self) -> None:
        """Put the packed part of the current pooled buffer in the outbox (before anything
        queued after it)."""
        if self._cur_pos > self._cur_from:
            self._out.append(self._cur.view[self._cur_from : self._cur_pos])
            self._cur_from = self._cur_pos

    def _queue(self, parts: list[Any]) -> None:
        if self._cur is not None:
            self._seal()
        self._out += parts
        if not self._flush_soon:
            # The read loop sends before its next recv; this covers sends queued elsewhere.
            self._flush_soon = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> asyncio.Future[Any] | None:
        """Send everything queued as one vectored send; returns its future (None if empty)."""
        self._flush_soon = False
        cur = self._cur
        if cur is not None:
            self._seal()
            self._cur = None
            if self._cur_pos:
                self._out_leases.append(cur)
            else:
                cur.release()
            self._cur_from = self._cur_pos = 0
        out = self._out
        leases = self._out_leases
        if not out:
            for lease in leases:
                lease.release()
            leases.clear()
            return None
        self._out = []
        self._out_leases = []
        zc = self._out_zc
        self._out_zc = False
        if zc and self._zc_skip:
            self._zc_skip -= 1
            zc = False
        try:
            fut: asyncio.Future[Any] = self.zs.send_zc(out) if zc else self.zs.send(out)
        except Exception as e:  # not submitted: the buffers are ours again
            for lease in leases:
                lease.release()
            if self.failed is None:
                self.failed = e
                log.warning("%s: send failed: %s; closing connection", self.name, e)
            self.abort_connection()
            if asyncio.current_task() is self.task:
                raise  # the read loop itself: run() ends the connection
            return None
        if leases or zc:
            fut.add_done_callback(lambda f: self._sent(f, leases, zc))
        else:
            fut.add_done_callback(self._check_send)
        return fut

    def _sent(self, fut: Any, leases: list[Any], zc: bool) -> None:
        for lease in leases:
            lease.release()
        if zc and not fut.cancelled() and fut.exception() is None:
            if fut.result().zerocopy:
                self._zc_copied = 0
            else:
                self._zc_copied += 1
                if self._zc_copied >= ZC_PROBE:
                    if self._zc_skip == 0 and self.stats["zc_fallbacks"] == 0:
                        log.info(
                            "%s: the kernel copies zero-copy sends on this connection; "
                            "sending by copy (zero-copy retried every %d large sends)",
                            self.name, ZC_RETRY,
                        )  # fmt: skip
                    self.stats["zc_fallbacks"] += 1
                    self._zc_copied = 0
                    self._zc_skip = ZC_RETRY
        self._check_send(fut)

    def _accept_in_order(self, cmdsn: int) -> tuple[int, int]:
        """Account an in-order command answered now: ExpCmdSN moves past it (and the window
        with it); returns the StatSN its response takes and the new ExpCmdSN."""
        expcmdsn = self.expcmdsn = (cmdsn + 1) & 0xFFFFFFFF
        maxcmdsn = (expcmdsn + CMD_WINDOW - 1) & 0xFFFFFFFF
        if _sn_lt(self.maxcmdsn, maxcmdsn):
            self.maxcmdsn = maxcmdsn
        statsn = self.statsn
        self.statsn = (statsn + 1) & 0xFFFFFFFF
        return statsn, expcmdsn

    async def send_now(self, hdr: bytearray, data: bytes = b"") -> None:
        """Queue a PDU, send the outbox and wait until the kernel released it."""
        self.send_pdu(hdr, data)
        fut = self._flush()
        if fut is not None:
            await fut

    def _digested(self, hdr: bytearray) -> bytearray:
        if self.params.header_digest:
            hdr += self.target.crc32c(hdr).to_bytes(4, "little")
        return hdr

    def _stamp(self, hdr: bytearray, advance: bool) -> None:
        self._update_window()
        P.stamp(hdr, self.statsn, self.expcmdsn, self.maxcmdsn)
        if advance:
            self.statsn = (self.statsn + 1) & 0xFFFFFFFF

    def send_pdu(self, hdr: bytearray, data: bytes = b"", advance: bool = True) -> None:
        """Queue a control PDU (its data is small: it goes by copy)."""
        self._stamp(hdr, advance)
        iov: list[Any] = [self._digested(hdr)]
        if data:
            iov.append(data)
            pad = P.pad_for(len(data))
            if pad:
                iov.append(pad)
            if self.params.data_digest:
                iov.append(self.target.crc32c(pad, self.target.crc32c(data)).to_bytes(4, "little"))
        self._queue(iov)

    def _update_window(self) -> None:
        # A fixed window: commands the initiator may have outstanding are bounded by it, and the
        # memory they pin by the shared buffer pool. (A window shrunk by busy work would need an
        # unsolicited NOP-In to reopen once the work is done, or the initiator stalls.)
        want = (self.expcmdsn + CMD_WINDOW - 1) & 0xFFFFFFFF
        if _sn_lt(self.maxcmdsn, want):
            self.maxcmdsn = want

    def send_data_in(
        self,
        itt: int,
        lun_field: bytes,
        segments: list[memoryview],
        total: int,
        offset: int,
        datasn: int,
        last: bool,
        status: tuple[int, int] | None,
    ) -> int:
        """Queue Data-In PDUs for ``segments`` (``total`` bytes at buffer ``offset``); the last
        PDU carries status when ``status`` is (flags, residual). Returns the next DataSN."""
        p = self.params
        mrdsl = p.initiator_max_recv_dsl
        burst = p.max_burst
        crc = self.target.crc32c
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
            with_status = last and remaining == 0 and status is not None
            st_flags = 0
            residual = 0
            if with_status:
                assert status is not None
                st_flags, residual = status
                flags |= P.F_FINAL | P.DATAIN_STATUS | st_flags
            hdr = P.data_in(flags, 0, lun_field, itt, datasn, offset, residual, n)
            self._stamp(hdr, with_status)
            if not with_status:
                _U32.pack_into(hdr, 24, 0)  # StatSN is reserved without the S bit
            iov[0] = self._digested(hdr)
            pad = P.pad_for(n)
            if pad:
                iov.append(pad)
            if p.data_digest:
                value = 0
                for part in iov[1:]:
                    value = crc(part, value)
                iov.append(value.to_bytes(4, "little"))
            if n >= ZC_MIN:
                self._out_zc = True
            self._queue(iov)
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
        hdr = P.scsi_response(itt, status, flags, residual, expdatasn, len(data))
        self.send_pdu(hdr, data)

    def send_check(self, itt: int, cc: S.CheckCondition, flags: int = 0, residual: int = 0) -> None:
        self.send_status(
            itt, S.CHECK_CONDITION, S.sense_fixed(cc.key, cc.asc, cc.ascq, cc.info), flags, residual
        )

    def send_reject(self, reason: int, bhs: bytes, why: str) -> None:
        log.warning("%s: reject (reason 0x%02x): %s", self.name, reason, why)
        self.send_pdu(P.reject(reason, bhs), bytes(bhs[: P.BHS_LEN]))

    # ---------------------------------------------------------------- receiving

    async def read_pdu(self, max_data: int, login: bool = False) -> P.Pdu:
        rd = self.reader
        bhs = bytes(await rd.take(P.BHS_LEN))
        ahs_len, dsl = P.header_lengths(bhs)
        # Judge the header before waiting for a body that may never come.
        if login and bhs[0] & 0x3F != P.OP_LOGIN_REQ:
            name = P.Pdu(bhs, b"", b"").name
            raise P.PduError(f"{name} before login completed")
        if ahs_len > (0 if login else MAX_AHS):
            raise P.PduError(f"additional header segment of {ahs_len} bytes")
        ahs = bytes(await rd.take(ahs_len)) if ahs_len else b""
        if self.params.header_digest:
            digest = int.from_bytes(await rd.take(4), "little")
            if digest != self.target.crc32c(ahs, self.target.crc32c(bhs)):
                raise P.PduError("header digest mismatch")
        if dsl > max_data:
            raise P.PduError(
                f"{P.Pdu(bhs, ahs, b'').name} data segment of {dsl} bytes exceeds {max_data}"
            )
        data: memoryview | bytes = b""
        if dsl:
            total = P.padded(dsl) + (4 if self.params.data_digest else 0)
            raw = await rd.take(total)
            data = raw[:dsl]
            if self.params.data_digest:
                digest = int.from_bytes(raw[total - 4 :], "little")
                if digest != self.target.crc32c(raw[: total - 4]):
                    raise P.PduError("data digest mismatch", P.REJECT_DATA_DIGEST)
        return P.Pdu(bhs, ahs, data)

    # ---------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        try:
            try:
                await asyncio.wait_for(self._login(), LOGIN_TIMEOUT)
            except TimeoutError:
                log.warning(
                    "%s: login not finished within %.0fs; closing", self.name, LOGIN_TIMEOUT
                )
                return
            if self.tsih:
                await self._full_feature()
        except ConnectionClosed:
            if self.tsih:
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

    def abort_connection(self) -> None:
        """Stop reading; run() then drains and closes."""
        if not self.closing:
            self.closing = True
            if self.task is not None and self.task is not asyncio.current_task():
                self.task.cancel()

    async def _shutdown(self) -> None:
        self.closing = True
        for w in self.writes.values():
            w.aborted = True
        self.writes.clear()
        self.reader.close()
        try:
            self._flush()
        except Exception:  # logged by _flush; the socket is closed below all the same
            pass
        try:
            await asyncio.wait_for(self.zs.aclose(), 10)
        except (TimeoutError, OSError, asyncio.CancelledError) as e:
            log.warning("%s: close did not drain cleanly: %s", self.name, e or type(e).__name__)
            try:
                self.sock.close()
            except OSError:
                pass
        self.target.session_ended(self)

    # ---------------------------------------------------------------- login

    async def _login(self) -> None:
        machine = LoginMachine(self.target)
        while True:
            try:
                req = await self.read_pdu(8192, login=True)
            except P.PduError as e:
                log.warning("%s: bad PDU during login: %s; closing", self.name, e)
                return
            if machine._first:
                self.statsn = req.u32(28)
            try:
                hdr, data = machine.step(req)
            except LoginFailed as e:
                st = machine.state
                who = st.initiator or "unknown initiator"
                log.warning("%s: login of %s rejected: %s", self.name, who, e)
                self.expcmdsn = req.u32(24)
                self.maxcmdsn = self.expcmdsn
                await self.send_now(failure_response(req, e.status))
                return
            st = machine.state
            self.expcmdsn = st.first_cmdsn
            self.maxcmdsn = (self.expcmdsn + CMD_WINDOW - 1) & 0xFFFFFFFF
            if machine.done:
                self.tsih = self.target.session_started(self, st.initiator, st.isid)
                struct.pack_into(">H", hdr, 14, self.tsih)
                self.params = st.params
                self.initiator = st.initiator
                self.isid = st.isid
                self.discovery = st.discovery
                kind = "discovery" if self.discovery else "normal"
                self.name = f"{self.peer} {self.initiator} tsih={self.tsih}"
                # Header/data digests start with the first PDU after the final login response.
                digests = (self.params.header_digest, self.params.data_digest)
                self.params.header_digest = self.params.data_digest = False
                await self.send_now(hdr, data)
                self.params.header_digest, self.params.data_digest = digests
                log.info(
                    "%s: %s session logged in (auth=%s, digests=%s/%s, mrdsl=%d/%d, burst=%d)",
                    self.name,
                    kind,
                    machine.auth_user or "none",
                    "CRC32C" if digests[0] else "None",
                    "CRC32C" if digests[1] else "None",
                    self.params.initiator_max_recv_dsl,
                    self.params.target_max_recv_dsl,
                    self.params.max_burst,
                )
                return
            await self.send_now(hdr, data)

    # ---------------------------------------------------------------- full feature phase

    async def _full_feature(self) -> None:
        max_data = self.params.target_max_recv_dsl
        rd = self.reader
        p = self.params
        fast = not (p.header_digest or p.data_digest or self.discovery)
        bhs_len = P.BHS_LEN
        while not self.closing:
            if fast:
                if rd.end - rd.start < bhs_len:
                    await rd.fill(bhs_len)
                if self._fast_read():
                    # Large Data-In goes at once (it is worth a send alone, and the peer starts
                    # on it while the next is read); small ones wait for the batch's end.
                    if self._out_zc or len(self._out) >= OUTBOX_MAX:
                        self._flush()
                    continue
            try:
                req = await self.read_pdu(max_data)
            except P.PduError as e:
                log.warning("%s: %s; closing connection", self.name, e)
                return
            op = req.opcode
            if op == P.OP_DATA_OUT:
                self._data_out(req)
                continue
            if op == P.OP_SNACK:
                self.send_reject(P.REJECT_SNACK, req.bhs, "SNACK at ErrorRecoveryLevel 0")
                continue
            if op not in (
                P.OP_SCSI_CMD,
                P.OP_NOP_OUT,
                P.OP_TMF_REQ,
                P.OP_TEXT_REQ,
                P.OP_LOGOUT_REQ,
                P.OP_LOGIN_REQ,
            ):
                self.send_reject(P.REJECT_NOT_SUPPORTED, req.bhs, f"unknown {req.name}")
                continue
            if op == P.OP_LOGIN_REQ:
                self.send_reject(
                    P.REJECT_PROTOCOL_ERROR, req.bhs, "Login-Request in full feature phase"
                )
                continue
            if req.immediate:
                await self._dispatch(req)
                continue
            cmdsn = req.u32(24)
            if cmdsn == self.expcmdsn:
                self.expcmdsn = (cmdsn + 1) & 0xFFFFFFFF
                await self._dispatch(req)
                while self.pending_cmds and self.expcmdsn in self.pending_cmds:
                    queued = self.pending_cmds.pop(self.expcmdsn)
                    self.expcmdsn = (self.expcmdsn + 1) & 0xFFFFFFFF
                    await self._dispatch(queued)
            elif _sn_lt(self.expcmdsn, cmdsn) and not _sn_lt(self.maxcmdsn, cmdsn):
                # Ahead of ExpCmdSN but inside the window: hold it until the gap fills.
                if req.opcode == P.OP_SCSI_CMD and req.data:
                    req = P.Pdu(req.bhs, req.ahs, bytes(req.data))
                self.pending_cmds[cmdsn] = req
            else:
                log.warning(
                    "%s: %s CmdSN %d outside window [%d, %d]; ignored",
                    self.name, req.name, cmdsn, self.expcmdsn, self.maxcmdsn,
                )  # fmt: skip
            if self._out_zc:
                self._flush()
            if self.target.stopping and not self.writes and not self.reads:
                return

    def _fast_lun(self, lun_field: bytes) -> tuple[S.LogicalUnit, Any, int, int, int, Any] | None:
        """(unit, store, fd or -1 for a store with its own memory, block size, blocks, Rust
        READ path or None)."""
        lu = self.target.luns.get(P.decode_lun(lun_field))
        entry: tuple[S.LogicalUnit, Any, int, int, int, Any] | None = None
        if lu is not None:
            store = lu.store
            bs, blocks = store.block_size, store.blocks
            if isinstance(store, FileStore):  # pread, or views of the mapped image
                fd = store.fd if store.segments(0, 0) is None else -1
                native = None
                if fd >= 0 and IscsiReadPath is not None:
                    p = self.params
                    longest = min(p.initiator_max_recv_dsl, p.max_burst, ZC_MIN - 1)
                    native = IscsiReadPath(fd, lun_field, bs, blocks, longest, CMD_WINDOW)
                entry = (lu, store, fd, bs, blocks, native)
            elif isinstance(store, (MemoryStore, NullStore)):
                entry = (lu, store, -1, bs, blocks, None)
        self._fast_luns[lun_field] = entry
        return entry

    def _fast_read(self) -> bool:
        """The PDU at the reader's start, if it is an in-order READ(10)/READ(16) answered by one
        Data-In PDU with status: handle it and return True. Otherwise leave it and return False
        (the general path then handles it, errors included)."""
        rd = self.reader
        native = self._native
        if native is not None and self._cur is not None and not self.pending_cmds:
            # A run of small reads of the same LUN: parsed, read and answered in Rust.
            sn = (self.expcmdsn, self.statsn, self.maxcmdsn)
            res = native.serve(rd.buf, rd.start, rd.end, self._cur.view, self._cur_pos, sn)
            if res[5]:
                rd.start, self._cur_pos, self.expcmdsn, self.statsn, self.maxcmdsn = res[:5]
                stats = self.stats
                stats["commands"] += res[5]
                stats["read_bytes"] += res[6]
                stats["zc_sends"] += res[5]
                return True
        buf = rd.buf
        at = rd.start
        op, flags, lengths, lun_field, itt, edtl, cmdsn = _CMD.unpack_from(buf, at)
        if op != P.OP_SCSI_CMD or lengths or flags & 0x60 != P.CMD_READ:
            return False
        if cmdsn != self.expcmdsn or self.pending_cmds:
            return False
        code = buf[at + 32]
        if code == S.READ10:
            cflags, lba, blocks = _READ10.unpack_from(buf, at + 32)
        elif code == S.READ16:
            cflags, lba, blocks = _READ16.unpack_from(buf, at + 32)
        else:
            return False
        try:
            unit = self._fast_luns[lun_field]
        except KeyError:
            unit = self._fast_lun(lun_field)
        if unit is None or cflags & 0xE0:
            return False
        _, store, fd, bs, nblocks, self._native = unit
        n = blocks * bs
        if n != edtl or not n or lba + blocks > nblocks:
            return False
        p = self.params
        if n > p.initiator_max_recv_dsl or n > p.max_burst:
            return False
        offset = lba * bs
        if fd >= 0:
            big = n >= ZC_MIN
            lease = self._cur
            pos = self._cur_pos
            if big:  # its own page-aligned place, the header apart: a zero-copy send
                pos = (pos + 4095) & ~4095
            need = n if big else n + 48
            if lease is None or pos + need > len(lease.view):
                lease = self.target.pool.try_acquire()
                if lease is None or len(lease.view) < need:
                    if lease is not None:
                        lease.release()
                    return False
                if self._cur is not None:
                    self._seal()
                    self._out_leases.append(self._cur)
                self._cur = lease
                pos = self._cur_from = self._cur_pos = 0
            view = lease.view
            data_at = pos if big else pos + 48
            try:
                got = os.preadv(fd, [view[data_at : data_at + n]], offset)
                if got != n:
                    store.read_into(offset + got, view[data_at + got : data_at + n])
            except OSError as e:
                rd.start = at + 48
                self.expcmdsn = (cmdsn + 1) & 0xFFFFFFFF
                log.error("%s: read of %d bytes at %d failed: %s", self.name, n, offset, e)
                cc = S.CheckCondition(S.MEDIUM_ERROR, S.UNRECOVERED_READ_ERROR)
                self.send_check(itt, cc)
                return True
            rd.start = at + 48
            statsn, expcmdsn = self._accept_in_order(cmdsn)
            args = (P.OP_DATA_IN, _DATAIN_GOOD, 0, n, lun_field, itt, P.NO_TAG, statsn,
                    expcmdsn, self.maxcmdsn, 0, 0, 0)  # fmt: skip
            if big:
                self._seal()
                self._out += (_DATAIN_BHS.pack(*args), view[data_at : data_at + n])
                self._cur_from = self._cur_pos = data_at + n
                self._out_zc = True
            else:
                _DATAIN_BHS.pack_into(view, pos, *args)
                self._cur_pos = data_at + n
        else:
            segments = store.segments(offset, n)
            rd.start = at + 48
            statsn, expcmdsn = self._accept_in_order(cmdsn)
            if self._cur is not None:
                self._seal()
            args = (P.OP_DATA_IN, _DATAIN_GOOD, 0, n, lun_field, itt, P.NO_TAG, statsn,
                    expcmdsn, self.maxcmdsn, 0, 0, 0)  # fmt: skip
            self._out.append(_DATAIN_BHS.pack(*args))
            self._out += segments
            if n >= ZC_MIN:
                self._out_zc = True
        stats = self.stats
        stats["commands"] += 1
        stats["read_bytes"] += n
        stats["zc_sends"] += 1
        return True

    async def _dispatch(self, req: P.Pdu) -> None:
        op = req.opcode
        if op == P.OP_SCSI_CMD:
            if self.discovery:
                self.send_reject(
                    P.REJECT_PROTOCOL_ERROR, req.bhs, "SCSI command in discovery session"
                )
                return
            self._scsi_command(req)
        elif op == P.OP_NOP_OUT:
            self._nop_out(req)
        elif op == P.OP_TEXT_REQ:
            self._text(req)
        elif op == P.OP_TMF_REQ:
            self._task_management(req)
        elif op == P.OP_LOGOUT_REQ:
            await self._logout(req)

    def _nop_out(self, req: P.Pdu) -> None:
        itt = req.itt
        if itt == P.NO_TAG:
            return  # a ping answer (we never ping) or a CmdSN-only update
        ttt = req.u32(20)
        if ttt != P.NO_TAG:
            self.send_reject(
                P.REJECT_PROTOCOL_ERROR, req.bhs, "NOP-Out answers a ping we never sent"
            )
            return
        data = bytes(req.data)
        self.send_pdu(P.nop_in(bytes(req.bhs[8:16]), itt, P.NO_TAG, len(data)), data)

    def _text(self, req: P.Pdu) -> None:
        try:
            pairs = P.parse_text(req.data)
        except P.PduError as e:
            self.send_reject(e.reason, req.bhs, str(e))
            return
        answers: list[tuple[str, str]] = []
        for key, value in pairs:
            if key == "SendTargets":
                answers += self.target.send_targets(value, self.discovery, self.sock)
            else:
                answers.append(
                    (key, "NotUnderstood" if key not in ("MaxRecvDataSegmentLength",) else value)
                )
        data = P.build_text(answers)
        if len(data) > self.params.initiator_max_recv_dsl:
            data = data[: self.params.initiator_max_recv_dsl]
        self.send_pdu(P.text_response(req.itt, True, False, P.NO_TAG, len(data)), data)

    async def _logout(self, req: P.Pdu) -> None:
        reason = req.flags & 0x7F
        if reason == 2:  # remove connection for recovery: needs ErrorRecoveryLevel 2
            self.send_pdu(P.logout_response(req.itt, 2))
            return
        if reason not in (0, 1):
            self.send_reject(P.REJECT_INVALID_FIELD, req.bhs, f"logout reason {reason}")
            return
        log.info("%s: logout (reason %d)", self.name, reason)
        await self.send_now(P.logout_response(req.itt, 0, 0, 0))
        self.closing = True

    # -- task management

    def _task_management(self, req: P.Pdu) -> None:
        function = req.flags & 0x7F
        itt = req.itt
        lun = P.decode_lun(req.lun_field)
        names = {1: "ABORT TASK", 2: "ABORT TASK SET", 3: "CLEAR ACA", 4: "CLEAR TASK SET",
                 5: "LOGICAL UNIT RESET", 6: "TARGET WARM RESET", 7: "TARGET COLD RESET",
                 8: "TASK REASSIGN"}  # fmt: skip
        name = names.get(function, f"function {function}")
        if function == 1:
            ref = req.u32(20)
            refcmdsn = req.u32(32)
            task = self.writes.pop(ref, None)
            reader = self.reads.get(ref, (None,))[0]
            if task is not None:
                task.aborted = True
                self.active -= 1
                response = 0
            elif reader is not None:
                reader.cancel()  # no status will follow the Data-In already sent
                response = 0
            elif not _sn_lt(refcmdsn, self.expcmdsn) and _sn_lt(refcmdsn, req.u32(24)):
                # RFC 7143 11.5.1: a command in the window that never arrived counts as received
                response = 0
            else:
                response = 1  # completed already, or never existed
        elif function in (2, 4, 5):
            if function == 5 and lun not in self.target.luns:
                response = 2
            else:
                self.target.abort_tasks(lun, self if function in (2, 4) else None)
                response = 0
        elif function == 6:
            self.target.abort_tasks(None, None)
            response = 0
        elif function == 7:
            response = 0
            self.target.abort_tasks(None, None)
            self.loop.call_soon(self.target.drop_all_sessions)
        elif function == 3:
            response = 5  # ACA is never established (NACA is not supported)
        elif function == 8:
            response = 4  # allegiance reassignment needs ErrorRecoveryLevel 2
        else:
            response = 255
        log.info("%s: task management %s lun=%d -> response %d", self.name, name, lun, response)
        self.send_pdu(P.tmf_response(itt, response))

    def abort_tasks(self, lun: int | None) -> int:
        n = 0
        for reader, reader_lun in list(self.reads.values()):
            if lun is None or reader_lun == lun:
                reader.cancel()
        for itt, task in list(self.writes.items()):
            if lun is None or task.lun == lun:
                task.aborted = True
                del self.writes[itt]
                self.active -= 1
                n += 1
        return n

    # -- SCSI

    def _scsi_command(self, req: P.Pdu) -> None:
        self.stats["commands"] += 1
        bhs = req.bhs
        itt = req.itt
        edtl = req.u32(20)
        cdb = bhs[32:48]
        if req.ahs:
            # Extended CDB AHS (type 1): the CDB continues past 16 bytes
            ahs = req.ahs
            if len(ahs) >= 4 and ahs[2] == 1:
                cdb = cdb + ahs[4 : 4 + struct.unpack_from(">H", ahs, 0)[0] - 1]
        lun_field = bytes(bhs[8:16])
        lu = self.target.luns.get(P.decode_lun(lun_field))
        op = cdb[0]
        try:
            if lu is not None:
                if op in S.READ_OPS:
                    self._read(req, lu, cdb, edtl, lun_field)
                    return
                if op in S.WRITE_OPS or op in S.VERIFY_OPS:
                    self._write(req, lu, cdb, edtl, lun_field)
                    return
            data = self.target.commands.execute(lu, cdb)
        except S.CheckCondition as cc:
            self._discard_unsolicited(req, edtl)
            self.send_check(itt, cc)
            return
        except OSError as e:
            log.error("%s: %s failed on LUN: %s", self.name, cdb[:1].hex(), e)
            self._discard_unsolicited(req, edtl)
            self.send_check(itt, S.CheckCondition(S.MEDIUM_ERROR, S.UNRECOVERED_READ_ERROR))
            return
        if req.flags & P.CMD_WRITE:
            self._discard_unsolicited(req, edtl)
        self._reply_data(itt, lun_field, data, edtl)

    def _reply_data(self, itt: int, lun_field: bytes, data: bytes, edtl: int) -> None:
        n = len(data)
        flags = residual = 0
        if n > edtl:
            flags, residual, n = P.DATAIN_OVERFLOW, n - edtl, edtl
        elif n < edtl:
            flags, residual = P.DATAIN_UNDERFLOW, edtl - n
        if n == 0:
            self.send_status(itt, S.GOOD, None, flags, residual)
            return
        view = memoryview(data)[:n]
        self.send_data_in(itt, lun_field, [view], n, 0, 0, True, (flags, residual))

    def _read(self, req: P.Pdu, lu: S.LogicalUnit, cdb: bytes, edtl: int, lun_field: bytes) -> None:
        rw = S.decode_rw(cdb)
        if rw.flags & 0xE0:  # RDPROTECT without protection information
            raise S.CheckCondition(S.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_CDB)
        lu.check_range(rw.lba, rw.blocks)
        bs = lu.store.block_size
        spdtl = rw.blocks * bs
        if not req.flags & P.CMD_READ and spdtl:
            # A read whose PDU says no data-in: nothing can be sent
            edtl = 0
        n = min(spdtl, edtl)
        flags = residual = 0
        if spdtl > edtl:
            flags, residual = P.DATAIN_OVERFLOW, spdtl - edtl
        elif spdtl < edtl:
            flags, residual = P.DATAIN_UNDERFLOW, edtl - spdtl
        itt = req.itt
        if n == 0:
            self.send_status(itt, S.GOOD, None, flags, residual)
            return
        offset = rw.lba * bs
        store = lu.store
        self.stats["read_bytes"] += n
        segments = store.segments(offset, n)
        if segments is not None:  # memory the store owns: sent as is
            self.send_data_in(itt, lun_field, segments, n, 0, 0, True, (flags, residual))
            return
        pool = self.target.pool
        if n <= pool.size:
            lease = pool.try_acquire()
            if lease is not None:
                self._read_chunk(
                    itt, lun_field, store, offset, lease, 0, n, 0, True, (flags, residual)
                )
                return
        self.active += 1
        task = self.loop.create_task(
            self._read_large(itt, lun_field, store, offset, n, (flags, residual))
        )
        self.reads[itt] = (task, P.decode_lun(lun_field))
        task.add_done_callback(lambda t: self._read_done(itt, t))

    def _read_done(self, itt: int, task: asyncio.Task[None]) -> None:
        if self.reads.get(itt, (None,))[0] is task:
            del self.reads[itt]
        self.active -= 1
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: read task failed: %s", self.name, task.exception())
            self.abort_connection()

    def _read_chunk(
        self,
        itt: int,
        lun_field: bytes,
        store: Any,
        offset: int,
        lease: Any,
        pos: int,
        n: int,
        datasn: int,
        last: bool,
        status: tuple[int, int],
    ) -> int | None:
        view = lease.view[:n]
        try:
            store.read_into(offset + pos, view)
        except OSError as e:
            lease.release()
            log.error("%s: read of %d bytes at %d failed: %s", self.name, n, offset + pos, e)
            self.send_check(itt, S.CheckCondition(S.MEDIUM_ERROR, S.UNRECOVERED_READ_ERROR))
            return None
        datasn = self.send_data_in(itt, lun_field, [view], n, pos, datasn, last, status)
        self._out_leases.append(lease)  # released with the send carrying its last PDU
        return datasn

    async def _read_large(
        self,
        itt: int,
        lun_field: bytes,
        store: Any,
        offset: int,
        total: int,
        status: tuple[int, int],
    ) -> None:
        pool = self.target.pool
        pos = datasn = 0
        while pos < total and not self.closing:
            n = min(pool.size, total - pos)
            lease = pool.try_acquire()
            if lease is None:
                self._flush()  # what is queued may hold the buffers this read waits for
                lease = await pool.acquire()
            if self.closing:
                lease.release()
                return
            res = self._read_chunk(
                itt, lun_field, store, offset, lease, pos, n, datasn, pos + n == total, status
            )
            self._flush()
            if res is None:
                return
            datasn = res
            pos += n

    def _discard_unsolicited(self, req: P.Pdu, edtl: int) -> None:
        """A failed write may still be followed by unsolicited Data-Out: swallow it quietly."""
        if req.flags & P.CMD_WRITE and not req.final and not self.params.initial_r2t:
            task = WriteTask(req.itt, S.LogicalUnit(-1, _NoStore(), ""), b"", 0, 0, edtl)
            task.aborted = True
            self.writes[req.itt] = task
            self.active += 1

    def _write(
        self, req: P.Pdu, lu: S.LogicalUnit, cdb: bytes, edtl: int, lun_field: bytes
    ) -> None:
        rw = S.decode_rw(cdb)
        op = cdb[0]
        verify = op in S.VERIFY_OPS
        bytchk = (rw.flags >> 1) & 3 if verify else 1
        if rw.flags & 0xE0:  # WRPROTECT / VRPROTECT without protection information
            raise S.CheckCondition(S.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_CDB)
        if verify and bytchk == 2:
            raise S.CheckCondition(S.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_CDB)
        lu.check_range(rw.lba, rw.blocks)
        if not verify and lu.readonly:
            raise S.CheckCondition(S.DATA_PROTECT, S.WRITE_PROTECTED)
        bs = lu.store.block_size
        if verify and bytchk == 0:  # medium verification only: the range check is it
            self._discard_unsolicited(req, edtl)
            self.send_status(req.itt, S.GOOD, None, *self._residual_rsp(0, edtl))
            return
        spdtl = bs if (verify and bytchk == 3) else rw.blocks * bs
        if not req.flags & P.CMD_WRITE:
            edtl = 0
        task = WriteTask(req.itt, lu, lun_field, rw.lba * bs, spdtl, edtl)
        task.verify = verify
        task.fua = bool(rw.flags & 0x08) or op in (
            S.WRITE_VERIFY10,
            S.WRITE_VERIFY12,
            S.WRITE_VERIFY16,
        )
        if verify and bytchk == 3:
            task.same_blocks = rw.blocks
        self.writes[req.itt] = task
        self.active += 1
        if req.data:
            if len(req.data) > self.params.first_burst:
                self._fail_write(task, "immediate data beyond FirstBurstLength")
                return
            self._accept(task, 0, req.data)
        unsolicited_more = not req.final and not self.params.initial_r2t
        if not unsolicited_more:
            task.unsolicited_done = True
        self._advance(task)

    def _residual_rsp(self, spdtl: int, edtl: int) -> tuple[int, int]:
        if spdtl > edtl:
            return P.RSP_OVERFLOW, spdtl - edtl
        if spdtl < edtl:
            return P.RSP_UNDERFLOW, edtl - spdtl
        return 0, 0

    def _accept(self, task: WriteTask, offset: int, data: memoryview | bytes) -> None:
        """Move received write data to the medium (only the part inside the SCSI transfer)."""
        end = offset + len(data)
        if offset != task.next_offset:
            raise _DataError(f"data at offset {offset}, expected {task.next_offset}")
        if end > task.edtl:
            raise _DataError(f"data beyond the expected transfer length {task.edtl}")
        task.next_offset = end
        usable = min(end, task.xfer) - offset
        if usable <= 0 or task.error is not None or task.aborted:
            return
        chunk = data[:usable] if usable < len(data) else data
        store = task.lu.store
        at = task.base + offset
        try:
            if task.verify:
                if task.same_blocks:
                    self._verify_same(task, bytes(chunk))
                    return
                current = bytearray(len(chunk))
                store.read_into(at, memoryview(current))
                if current != chunk and task.miscompare is None:
                    first = next(i for i in range(len(chunk)) if current[i] != chunk[i])
                    task.miscompare = offset + first
            else:
                store.write(at, chunk)
                self.stats["write_bytes"] += usable
        except OSError as e:
            log.error("%s: write of %d bytes at %d failed: %s", self.name, usable, at, e)
            task.error = S.CheckCondition(S.MEDIUM_ERROR, S.WRITE_ERROR)

    def _verify_same(self, task: WriteTask, block: bytes) -> None:
        store = task.lu.store
        bs = store.block_size
        current = bytearray(bs)
        for i in range(task.same_blocks):
            store.read_into(task.base + i * bs, memoryview(current))
            if current != block:
                task.miscompare = i * bs + next(j for j in range(bs) if current[j] != block[j])
                return

    def _data_out(self, req: P.Pdu) -> None:
        itt = req.itt
        task = self.writes.get(itt)
        if task is None:
            # Unsolicited data for a command that already failed, or data after an abort.
            return
        ttt = req.u32(20)
        datasn = req.u32(36)
        offset = req.u32(40)
        if ttt != task.ttt or (ttt == P.NO_TAG and task.unsolicited_done):
            if task.aborted:
                return
            self._fail_write(task, f"Data-Out with unexpected TTT 0x{ttt:08x}")
            return
        if datasn != task.datasn:
            self._fail_write(task, f"Data-Out DataSN {datasn}, expected {task.datasn}")
            return
        task.datasn += 1
        try:
            self._accept(task, offset, req.data)
            if ttt != P.NO_TAG and task.next_offset > task.burst_end:
                raise _DataError("Data-Out beyond the R2T's desired length")
        except _DataError as e:
            self._fail_write(task, str(e))
            return
        if req.final:
            if ttt == P.NO_TAG:
                task.unsolicited_done = True
            else:
                task.ttt = P.NO_TAG
            task.datasn = 0
            self._advance(task)

    def _fail_write(self, task: WriteTask, why: str) -> None:
        log.warning("%s: write ITT 0x%08x failed: %s", self.name, task.itt, why)
        if self.writes.pop(task.itt, None) is not None:
            self.active -= 1
        if not task.aborted:
            self.send_check(task.itt, S.CheckCondition(S.ABORTED_COMMAND, S.DATA_PHASE_ERROR))
        task.aborted = True

    def _advance(self, task: WriteTask) -> None:
        """After a sequence ends: ask for more with an R2T, or complete the command."""
        if task.aborted or not task.unsolicited_done or task.ttt != P.NO_TAG:
            return
        if task.next_offset < task.xfer:
            length = min(self.params.max_burst, task.xfer - task.next_offset)
            self.ttt_counter = (self.ttt_counter + 1) & 0x7FFFFFFF
            task.ttt = self.ttt_counter
            task.datasn = 0
            task.burst_end = task.next_offset + length
            hdr = P.r2t(task.lun_field, task.itt, task.ttt, task.r2tsn, task.next_offset, length)
            task.r2tsn += 1
            self.send_pdu(hdr, advance=False)
            return
        del self.writes[task.itt]
        self.active -= 1
        flags, residual = self._residual_rsp(task.spdtl, task.edtl)
        if task.error is not None:
            self.send_check(task.itt, task.error, flags, residual)
            return
        if task.miscompare is not None:
            cc = S.CheckCondition(S.MISCOMPARE, S.MISCOMPARE_DURING_VERIFY, task.miscompare)
            self.send_check(task.itt, cc, flags, residual)
            return
        if task.fua and not task.verify:
            try:
                task.lu.store.flush()
            except OSError as e:
                log.error("%s: flush failed: %s", self.name, e)
                self.send_check(
                    task.itt, S.CheckCondition(S.MEDIUM_ERROR, S.WRITE_ERROR), flags, residual
                )
                return
        self.send_status(task.itt, S.GOOD, None, flags, residual)


class _DataError(Exception):
    pass


class _NoStore:
    name = "none"
    readonly = True
    block_size = 512
    blocks = 0
    kind = "none"
