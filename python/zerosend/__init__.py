"""zerosend: zero-copy TCP/UDP transmit for asyncio on Linux.

``await zs.send_zc(buf)`` hands ``buf``'s pages to the kernel (io_uring SEND_ZC or MSG_ZEROCOPY)
and resolves only when the kernel has released them, so the buffer may be reused right after::

    zs = zerosend.wrap(sock)              # a connected, non-blocking TCP or UDP socket
    result = await zs.send_zc(payload)    # SendResult(nbytes=..., zerocopy=...)

Where the native extension cannot load (another OS or architecture, a build without Rust), a
pure-Python copy backend stands in for it behind the same API; ``capabilities()`` says why.

How the names differ from what asyncio, trio and anyio users know:

========================================  ==================================================
``loop.sock_sendall(sock, data)``         ``zs.send(data)`` / ``zs.send_zc(data)`` send *all*
                                          of ``data`` (``sendall``, not ``send``) and resolve
                                          to a :class:`SendResult` once the kernel released it
``socket.sendfile`` / ``sock_sendfile``   ``zs.send_file(file, offset, count)`` resolves to a
                                          :class:`SendResult`, not a count, and does not move
                                          the file position
``transport.abort()``                     ``StreamWriter.abort()``, ``Socket.abort()``;
``Server.abort_clients()``                ``StreamServer.abort_clients()``
``close()`` / ``wait_closed()``           take an optional ``timeout`` that aborts at its end
``asyncio.Future[T]``                     :class:`SendFuture`: an ``asyncio.Future``, a
                                          :class:`CompletedSend`, or a future trio awaits
trio ``SendStream``, anyio                ``zerosend.trio_stream.ZerosendSendStream``,
``ByteSendStream``                        ``zerosend.anyio_stream.ZerosendByteSendStream``
========================================  ==================================================

``SendResult`` unpacks (``nbytes, zerocopy = result``); zerosend's own exceptions derive from
:class:`ZerosendError`; kernel errors stay ``OSError`` subclasses with ``errno``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    from . import _native
except ImportError as error:
    from ._fallback import stand_in_for_native

    _native = stand_in_for_native(error)

from ._errors import BackendUnavailableError, ZerosendError
from ._native import (
    STATS_KEYS,
    Capabilities,
    CompletedSend,
    PoolBuffer,
    SendResult,
    capabilities,
)
from ._pool import BufferPool
from ._socket import BACKENDS, BackendName, Socket, wrap
from ._stream_connect import open_connection
from ._stream_server import StreamServer, start_server
from ._stream_writer import StreamWriter
from ._types import FallbackCode, SendFuture

try:
    __version__ = version("zerosend")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "BACKENDS",
    "STATS_KEYS",
    "BackendName",
    "BackendUnavailableError",
    "BufferPool",
    "Capabilities",
    "CompletedSend",
    "FallbackCode",
    "PoolBuffer",
    "SendFuture",
    "SendResult",
    "Socket",
    "StreamServer",
    "StreamWriter",
    "ZerosendError",
    "__version__",
    "capabilities",
    "open_connection",
    "start_server",
    "wrap",
]
