"""Ending a connection at once (abort) and time limits on waits, for asyncio and trio alike."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import math
import os
import socket
import struct
import sys
from typing import Any


def check_timeout(timeout: float | None, name: str = "timeout") -> float | None:
    """``timeout`` in seconds (None: no limit), or ValueError naming ``name``."""
    if timeout is None:
        return None
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or math.isnan(timeout)
        or timeout < 0
    ):
        raise ValueError(f"{name} must be a number of seconds >= 0 (or None), not {timeout!r}")
    return float(timeout)


class _SockaddrUnspec(ctypes.Structure):
    _fields_ = (("family", ctypes.c_ushort), ("data", ctypes.c_char * 14))


_libc: Any = None


def _connect_unspec(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    address = _SockaddrUnspec(socket.AF_UNSPEC)
    if _libc.connect(fd, ctypes.byref(address), ctypes.sizeof(address)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def reset(sock: socket.socket) -> None:
    """Ends ``sock``'s TCP connection now with a reset (RST).

    ``SO_LINGER`` 0 alone resets only at the last close, and zerosend's driver holds a duplicate
    of the descriptor until the kernel released every send. On Linux, ``connect()`` to an
    ``AF_UNSPEC`` address disconnects the socket itself (``tcp_disconnect``): a reset goes out,
    the unsent and unacknowledged bytes are dropped (their pages released to their sends), and
    the socket's pending and later sends fail. A connection already gone is left as it is.
    """
    if sock.fileno() < 0:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass  # not TCP, or already shut down: nothing to linger
    if not sys.platform.startswith("linux"):
        sock.close()  # elsewhere the last close (with SO_LINGER 0) resets
        return
    try:
        _connect_unspec(sock.fileno())
    except OSError as error:
        if error.errno not in (errno.ENOTCONN, errno.EINVAL):
            raise


async def wait_at_most(awaitable: Any, timeout: float | None, loop: Any) -> bool:
    """Awaits ``awaitable`` (a future of ``loop``) for at most ``timeout`` seconds (None: no
    limit); True if it finished. The awaited future itself is never cancelled."""
    if timeout is None:
        await awaitable
        return True
    if isinstance(loop, asyncio.AbstractEventLoop):
        done, _ = await asyncio.wait([asyncio.ensure_future(awaitable)], timeout=timeout)
        if done:
            done.pop().result()
        return bool(done)
    import trio  # a trio run: zerosend's loop face of it

    with trio.move_on_after(timeout):
        await awaitable
        return True
    return False
