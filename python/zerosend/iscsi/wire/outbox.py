"""Transmitting: every PDU is queued in order, and the queue goes to the zerosend socket as one
vectored send when the reader runs out of received PDUs (or soon after a task outside the read
loop queued something).

A Data-In PDU is [header(+digest), data views, padding, data digest]; the data views point into
pooled buffers (or memory the store owns), and a pooled buffer is released only when the send
that carries it has resolved, i.e. when the kernel let go of the pages. The send's own future
never leaves this module: a task that waits for a flush waits on a future of its own, so
cancelling that task (session reinstatement, task management, shutdown) cannot cancel the
record of the release the buffers wait for. Small reads are packed back to back, header and
data, into one pooled buffer (the packing buffer), so a batch of them is one contiguous region.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

from .bufpool import MmapLease, PoolShare


class Releasable(Protocol):
    """A pooled buffer, or other memory a send borrows until the kernel let go of it."""

    def release(self) -> None: ...


log = logging.getLogger("zerosend.iscsi")

# A Data-In segment at least this long makes its batch go zero-copy (below it the kernel's copy
# is cheaper than pinning pages and waiting for the release); the session wraps its socket with
# this as zerosend's threshold.
ZC_MIN = 10240
# When the kernel reports this many zero-copy sends in a row as copied (loopback, veth, a device
# without scatter-gather: kernel msg_zerocopy.rst suggests falling back then), the connection
# sends by copy, which is cheaper there, and asks for zero-copy again after ZC_RETRY large sends.
# ``--zerocopy-probe off`` keeps it on zero-copy (to measure or test zero-copy over veth).
ZC_PROBE = 8
ZC_RETRY = 1024
OUTBOX_MAX = 256  # buffers queued before a send goes out even though more PDUs are waiting
_NOWHERE = memoryview(bytearray())  # the packing "buffer" while there is none


class Outbox:
    """The send queue of one connection. ``on_failure`` hears of a send that failed (the
    connection is then over); a failure to submit raises in ``reader_task`` itself."""

    def __init__(
        self,
        zs: Any,
        pool: PoolShare,
        name: str,
        stats: dict[str, int],
        on_failure: Callable[[BaseException], None],
        probe: bool = True,
    ) -> None:
        self.zs = zs
        self.pool = pool
        self.name = name
        self.stats = stats
        self.on_failure = on_failure
        self.probe = probe  # switch to copy where the kernel copies zero-copy sends anyway
        self.reader_task: asyncio.Task[None] | None = None
        # Hear of every send submitted (its future, whether it goes zero-copy, its buffers): the
        # session's budget, metrics.
        self.on_submit: list[Callable[[asyncio.Future[Any], bool, list[Any]], None]] = []
        self.loop = asyncio.get_running_loop()
        self._parts: list[Any] = []
        self._leases: list[Releasable] = []
        self._zerocopy = False
        self._zc_copied = 0  # zero-copy sends in a row that the kernel copied anyway
        self._zc_skip = 0  # large sends still to go by copy before zero-copy is tried again
        self._flush_soon = False
        # The packing buffer, used up to ``_pos``, of which ``_from`` onwards is not queued yet.
        self._packing: MmapLease | None = None
        self._from = 0
        self._pos = 0

    def __len__(self) -> int:
        return len(self._parts)

    # -- queueing

    def queue(self, parts: list[Any], large: bool = False) -> None:
        """Queue one PDU's buffers; ``large`` for a Data-In segment worth a zero-copy send."""
        if self._packing is not None:
            self._seal()
        self._parts += parts
        if large:
            self._zerocopy = True
        if not self._flush_soon:
            # The read loop sends before its next recv; this covers sends queued elsewhere.
            self._flush_soon = True
            self.loop.call_soon(self.flush)

    def hold(self, lease: Releasable) -> None:
        """Release ``lease`` with the send that carries what is queued now."""
        self._leases.append(lease)

    def _seal(self) -> None:
        """Queue the packed part of the packing buffer (before anything queued after it)."""
        if self._pos > self._from:
            assert self._packing is not None
            self._parts.append(self._packing.view[self._from : self._pos])
            self._from = self._pos

    # -- the packing buffer

    def packing(self) -> tuple[memoryview, int]:
        """The packing buffer and its fill position (an empty buffer if there is none)."""
        if self._packing is None:
            return _NOWHERE, 0
        return self._packing.view, self._pos

    def packed(self, pos: int, large: bool) -> None:
        """The packing buffer is now filled up to ``pos``; ``large``: with a zero-copy worthy
        segment."""
        self._pos = pos
        if large:
            self._zerocopy = True

    def ensure_packing(self) -> None:
        """Have a packing buffer if one is free."""
        if self._packing is None:
            self.new_packing(0)

    def new_packing(self, need: int, lease: MmapLease | None = None) -> bool:
        """Start a fresh packing buffer (``lease``, or one from the pool) with room for ``need``
        bytes; False if none is free now or pooled buffers are smaller."""
        if need > self.pool.size:
            return False
        if lease is None:
            lease = self.pool.try_acquire()
        if lease is None:
            return False
        if self._packing is not None:
            self._seal()
            self._leases.append(self._packing)
        self._packing = lease
        self._from = self._pos = 0
        return True

    # -- sending

    def flush_if_due(self) -> None:
        """Send now if what is queued is worth a send of its own (large Data-In goes at once:
        the peer starts on it while the next is read) or the queue is long."""
        if self._zerocopy or len(self._parts) >= OUTBOX_MAX:
            self.flush()

    def flush(self) -> None:
        """Send everything queued as one vectored send."""
        self._send()

    def flush_released(self) -> asyncio.Future[None] | None:
        """Send everything queued; a future (None if nothing was queued) that resolves once the
        kernel released it. Cancelling that future leaves the send and its buffers alone."""
        sent = self._send()
        if sent is None:
            return None
        released: asyncio.Future[None] = self.loop.create_future()

        def follow(fut: asyncio.Future[Any]) -> None:
            if not released.done():
                released.set_result(None)

        sent.add_done_callback(follow)
        return released

    def _send(self) -> asyncio.Future[Any] | None:
        self._flush_soon = False
        packing = self._packing
        if packing is not None:
            self._seal()
            self._packing = None
            if self._pos:
                self._leases.append(packing)
            else:
                packing.release()
            self._from = self._pos = 0
        parts = self._parts
        leases = self._leases
        if not parts:
            for lease in leases:
                lease.release()
            leases.clear()
            return None
        self._parts = []
        self._leases = []
        zc = self._zerocopy
        self._zerocopy = False
        if zc and self._zc_skip:
            self._zc_skip -= 1
            zc = False
        try:
            fut: asyncio.Future[Any] = self.zs.send_zc(parts) if zc else self.zs.send(parts)
        except Exception as e:  # not submitted: the buffers are ours again
            for lease in leases:
                lease.release()
            self.on_failure(e)
            if asyncio.current_task() is self.reader_task:
                raise  # the read loop itself: the session ends the connection
            return None
        for hook in self.on_submit:
            hook(fut, zc, parts)
        if fut.done():  # released within the call: no callback to schedule
            self._sent(fut, leases, zc)
        elif leases or zc:
            fut.add_done_callback(lambda f: self._sent(f, leases, zc))
        else:
            fut.add_done_callback(self._check)
        return fut

    def send_file(self, fd: int, offset: int, count: int) -> None:
        """Send what is queued, then ``count`` bytes of file ``fd`` from ``offset`` with
        ``sendfile(2)``, in order: page cache to socket with no copy through user memory."""
        self._send()
        try:
            fut: asyncio.Future[Any] = self.zs.send_file(fd, offset, count)
        except Exception as e:
            self.on_failure(e)
            if asyncio.current_task() is self.reader_task:
                raise
            return
        fut.add_done_callback(self._check)

    def _check(self, fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled():
            exc = fut.exception()
            if exc is not None:
                self.on_failure(exc)

    def _sent(self, fut: asyncio.Future[Any], leases: list[Releasable], zc: bool) -> None:
        for lease in leases:
            lease.release()
        if self.probe and zc and not fut.cancelled() and fut.exception() is None:
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
        self._check(fut)
