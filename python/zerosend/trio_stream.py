"""A ``trio.abc.SendStream`` whose sends are zerosend's: ``send_all`` returns once the kernel
released the data (sent zero-copy where the socket's backend and threshold allow), so it plugs
into trio stacks that take a ``SendStream`` (a ``trio.StapledStream`` with a receive side, say;
not ``trio.SSLStream``: TLS writes a new copy of every byte).

    sock = socket.create_connection(address)   # connected, then handed over
    sock.setblocking(False)
    stream = ZerosendSendStream(sock)          # inside trio.run
    await stream.send_all(payload)             # payload is free again when this returns
    await stream.aclose()

Errors are trio's: ``trio.BrokenResourceError`` (from the ``OSError`` the kernel gave, as its
``__cause__``), ``trio.ClosedResourceError`` after ``aclose()``, ``trio.BusyResourceError`` for
two tasks in ``send_all`` at once.
"""

from __future__ import annotations

import socket

import trio

from ._sendstream import SendStreamCore
from ._socket import BackendName, Socket
from ._types import Buffer

__all__ = ["ZerosendSendStream"]


class ZerosendSendStream(trio.abc.SendStream):
    """trio's ``SendStream`` over a connected, non-blocking TCP socket (or a
    :class:`zerosend.Socket` already wrapped under this trio run); ``backend`` and
    ``zerocopy_threshold`` are :func:`zerosend.wrap`'s. Create it inside ``trio.run``."""

    def __init__(
        self,
        sock: socket.socket | Socket,
        *,
        backend: BackendName = "auto",
        zerocopy_threshold: int = 1048576,
    ) -> None:
        self._core = SendStreamCore(
            sock,
            backend,
            zerocopy_threshold,
            (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError),
            lambda: trio.CancelScope(shield=True),
        )

    @property
    def zerosend_socket(self) -> Socket:
        """The :class:`zerosend.Socket` the sends go through (backend, stats, ...)."""
        return self._core.zerosend_socket

    async def send_all(self, data: Buffer) -> None:
        """Send all of ``data``; returns once the kernel released it (it may be reused then)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        await self._core.send_all(data, "send_all")

    async def wait_send_all_might_not_block(self) -> None:
        """Waits until every send so far was released by the kernel."""
        await self._core.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """Wait for every send's release, then close the socket; if cancelled meanwhile, the
        connection is reset (``abort``) and closed all the same."""
        await self._core.aclose()
        await trio.lowlevel.checkpoint()
