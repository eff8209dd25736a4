"""The send-stream adapters' shared core: trio's ``SendStream`` and anyio's ``ByteSendStream``
over a :class:`zerosend.Socket` differ only in their library's exceptions and cancel scopes."""

from __future__ import annotations

import socket
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from ._socket import BackendName, Socket, wrap
from ._types import Buffer


class SendStreamCore:
    """``send_all`` = ``await send_zc(data)``: it returns once the kernel released ``data``, so
    the caller may reuse it at once, as trio and anyio expect of a send."""

    __slots__ = ("_busy", "_closed", "_errors", "_shield", "_zs")

    def __init__(
        self,
        sock: socket.socket | Socket,
        backend: BackendName,
        zerocopy_threshold: int,
        errors: tuple[type[Exception], type[Exception], type[Exception]],
        shield: Callable[[], AbstractContextManager[Any]],
    ) -> None:
        if isinstance(sock, Socket):
            self._zs = sock
        else:
            self._zs = wrap(sock, backend=backend, zerocopy_threshold=zerocopy_threshold)
        # (broken, closed, busy): the library's BrokenResourceError, ClosedResourceError and
        # BusyResourceError.
        self._errors = errors
        self._shield = shield
        self._busy = False
        self._closed = False

    @property
    def zerosend_socket(self) -> Socket:
        return self._zs

    async def send_all(self, data: Buffer, caller: str) -> None:
        broken, closed, busy = self._errors
        if self._busy:
            raise busy(f"another task is already in {caller}() on this stream")
        if self._closed:
            raise closed("this stream was closed")
        self._busy = True
        try:
            if memoryview(data).nbytes == 0:
                return
            sent = self._zs.send_zc(data)
            await sent
        except OSError as error:
            if self._closed:  # aclose() in another task cut it off
                raise closed("this stream was closed while sending") from error
            raise broken(f"the stream is broken: {error}") from error
        finally:
            self._busy = False
        if self._closed:  # closed by another task meanwhile
            raise closed("this stream was closed while sending")

    async def wait_send_all_might_not_block(self) -> None:
        if self._closed:
            raise self._errors[1]("this stream was closed")
        try:
            await self._zs.drain()
        except OSError as error:
            raise self._errors[0](f"the stream is broken: {error}") from error

    async def aclose(self) -> None:
        """Waits for every send's release, then closes; cancelled, it cuts the connection off
        (abort) and still closes, as trio's and anyio's ``aclose`` must."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._zs.aclose()
        except BaseException:
            self._zs.abort()
            with self._shield():  # the releases come now, without the peer
                await self._zs.aclose()
            raise
