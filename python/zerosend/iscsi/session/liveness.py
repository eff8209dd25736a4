"""Dead-peer detection: TCP keepalive and ``TCP_USER_TIMEOUT`` on every accepted connection, a
NOP-In ping when a session makes no progress, and the reset that ends a connection at once.

The kernel drops a connection whose sent data (or keepalive probe, or zero-window probe) goes
unacknowledged for ``--user-timeout`` seconds. A peer that acknowledges but never reads keeps
TCP content, so the session pings it: after ``--nop-interval`` seconds in which it had work
outstanding but no send was released, no command arrived and no write data came, it queues a
NOP-In ping behind everything it sent; no answer within ``--nop-timeout`` seconds and the peer
is declared dead (an answer proves it read all that came before).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
from collections.abc import Callable, Hashable

_libc = ctypes.CDLL(None, use_errno=True)
_AF_UNSPEC_ADDR = bytes(16)  # a struct sockaddr whose sa_family is AF_UNSPEC (0)


def tune_socket(sock: socket.socket, user_timeout: float) -> None:
    """Keepalive on; with ``user_timeout`` > 0, probes after a third of it idle, and the
    connection dropped after ``user_timeout`` seconds of unacknowledged data or probes."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if user_timeout > 0:
        probe = max(1, int(user_timeout / 3))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, probe)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, probe)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(user_timeout * 1000))


def reset_connection(sock: socket.socket) -> None:
    """Abort the connection for every descriptor of it (zerosend sends through a duplicate):
    connect() to AF_UNSPEC disconnects a TCP socket, sending RST and dropping what is queued,
    so the sends in flight end and their buffers come back. Closing a descriptor would not."""
    fd = sock.fileno()
    if fd < 0:
        return
    if _libc.connect(fd, _AF_UNSPEC_ADDR, len(_AF_UNSPEC_ADDR)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot reset the connection: {os.strerror(err)}")


class Pinger:
    """Pings a peer that made no progress, and declares it dead if the answer does not come.

    ``progress()`` changes whenever the session moved on; ``busy()`` says it has work
    outstanding (an idle session is left to keepalive); ``ping(ttt)`` queues a NOP-In with that
    Target Transfer Tag; ``dead()`` ends the session."""

    def __init__(
        self,
        interval: float,
        timeout: float,
        progress: Callable[[], Hashable],
        busy: Callable[[], bool],
        ping: Callable[[int], None],
        dead: Callable[[], None],
    ) -> None:
        self.interval = interval
        self.timeout = timeout
        self._progress = progress
        self._busy = busy
        self._ping = ping
        self._dead = dead
        self._ttt = 0
        self._answer: asyncio.Future[None] | None = None

    def answered(self, ttt: int) -> bool:
        """A NOP-Out answering a ping with ``ttt``: True if it is the one outstanding."""
        answer = self._answer
        if answer is None or ttt != self._ttt:
            return False
        if not answer.done():
            answer.set_result(None)
        return True

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last = self._progress()
        while True:
            await asyncio.sleep(self.interval)
            now = self._progress()
            if now != last or not self._busy():
                last = now
                continue
            self._ttt = self._ttt % 0x7FFFFFFF + 1  # never the reserved 0xFFFFFFFF
            self._answer = loop.create_future()
            self._ping(self._ttt)
            try:
                await asyncio.wait_for(self._answer, self.timeout)
            except TimeoutError:
                self._dead()
                return
            finally:
                self._answer = None
            last = self._progress()
