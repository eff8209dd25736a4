"""Receiving: PDUs parsed out of one receive buffer over a non-blocking socket.

Every recv takes whatever has arrived, so one call usually brings several commands; the READ
path's inner loop reads plain commands straight out of ``buf[start:end]``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from .._accel import crc32c
from . import pdu as P

MAX_AHS = 272  # an extended CDB of up to 260 bytes plus its AHS header


class ConnectionClosed(Exception):
    pass


class PduReader:
    """Buffered PDU reader.

    recv is tried first, so PDUs that already arrived cost no trip through the selector; only
    when it would block does the reader register with the loop, and it stays registered while
    it keeps waiting (no add/remove per wait). ``idle`` runs before every recv: the session
    sends what it queued for the PDUs read so far.
    """

    def __init__(self, sock: socket.socket, size: int, idle: Callable[[], object]) -> None:
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

    @property
    def buffered(self) -> int:
        return self.end - self.start

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

    async def read_pdu(
        self, max_data: int, header_digest: bool, data_digest: bool, login: bool = False
    ) -> P.Pdu:
        """The next PDU; raises PduError for one that breaks the protocol."""
        bhs = bytes(await self.take(P.BHS_LEN))
        ahs_len, dsl = P.header_lengths(bhs)
        # Judge the header before waiting for a body that may never come.
        if login and bhs[0] & 0x3F != P.OP_LOGIN_REQ:
            name = P.Pdu(bhs, b"", b"").name
            raise P.PduError(f"{name} before login completed")
        if ahs_len > (0 if login else MAX_AHS):
            raise P.PduError(f"additional header segment of {ahs_len} bytes")
        ahs = bytes(await self.take(ahs_len)) if ahs_len else b""
        if header_digest:
            digest = int.from_bytes(await self.take(4), "little")
            if digest != crc32c(ahs, crc32c(bhs)):
                raise P.PduError("header digest mismatch")
        if dsl > max_data:
            raise P.PduError(
                f"{P.Pdu(bhs, ahs, b'').name} data segment of {dsl} bytes exceeds {max_data}"
            )
        data: memoryview | bytes = b""
        if dsl:
            total = P.padded(dsl) + (4 if data_digest else 0)
            raw = await self.take(total)
            data = raw[:dsl]
            if data_digest:
                digest = int.from_bytes(raw[total - 4 :], "little")
                if digest != crc32c(raw[: total - 4]):
                    raise P.PduError("data digest mismatch", P.REJECT_DATA_DIGEST)
        return P.Pdu(bhs, ahs, data)
