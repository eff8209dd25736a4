"""An anyio ``ByteSendStream`` whose sends are zerosend's, on either anyio backend (asyncio,
uvloop, trio): ``send`` returns once the kernel released the data (sent zero-copy where the
socket's backend and threshold allow), so it plugs into anyio stacks that take a
``ByteSendStream`` (a ``StapledByteStream`` with a receive side, say; not ``TLSStream``: TLS
writes a new copy of every byte).

    sock = socket.create_connection(address)   # connected, then handed over
    sock.setblocking(False)
    stream = ZerosendByteSendStream(sock)      # inside anyio.run
    await stream.send(payload)                 # payload is free again when this returns
    await stream.aclose()

Errors are anyio's: ``anyio.BrokenResourceError`` (from the ``OSError`` the kernel gave, as its
``__cause__``), ``anyio.ClosedResourceError`` after ``aclose()``, ``anyio.BusyResourceError``
for two tasks in ``send`` at once.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from typing import Any

import anyio
from anyio.abc import ByteSendStream, SocketAttribute

from ._sendstream import SendStreamCore
from ._socket import BackendName, Socket
from ._types import Buffer

__all__ = ["ZerosendByteSendStream"]


class ZerosendByteSendStream(ByteSendStream):
    """anyio's ``ByteSendStream`` over a connected, non-blocking TCP socket (or a
    :class:`zerosend.Socket` already wrapped on this event loop); ``backend`` and
    ``zerocopy_threshold`` are :func:`zerosend.wrap`'s. Create it inside the running loop."""

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
            (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.BusyResourceError),
            lambda: anyio.CancelScope(shield=True),
        )

    @property
    def zerosend_socket(self) -> Socket:
        """The :class:`zerosend.Socket` the sends go through (backend, stats, ...)."""
        return self._core.zerosend_socket

    async def send(self, item: Buffer) -> None:
        """Send all of ``item``; returns once the kernel released it (it may be reused then)."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        await self._core.send_all(item, "send")

    async def aclose(self) -> None:
        """Wait for every send's release, then close the socket; if cancelled meanwhile, the
        connection is reset (``abort``) and closed all the same."""
        await self._core.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        sock = self._core.zerosend_socket.socket
        return {
            SocketAttribute.raw_socket: lambda: sock,
            SocketAttribute.family: lambda: sock.family,
            SocketAttribute.local_address: sock.getsockname,
            SocketAttribute.remote_address: sock.getpeername,
        }
