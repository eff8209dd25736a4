"""zerosend: zero-copy TCP/UDP transmit for asyncio on Linux.

``await zs.send_zc(buf)`` hands ``buf``'s pages to the kernel (io_uring SEND_ZC or MSG_ZEROCOPY)
and resolves only when the kernel has released them, so the buffer may be reused right after::

    zs = zerosend.wrap(sock)              # a connected, non-blocking TCP or UDP socket
    result = await zs.send_zc(payload)    # SendResult(nbytes=..., zerocopy=...)
"""

from ._native import BackendUnavailableError, Capabilities, PoolBuffer, SendResult, capabilities
from ._pool import BufferPool
from ._socket import BACKENDS, Socket, wrap
from ._streams import StreamServer, StreamWriter, open_connection, start_server

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "BufferPool",
    "Capabilities",
    "PoolBuffer",
    "SendResult",
    "Socket",
    "StreamServer",
    "StreamWriter",
    "capabilities",
    "open_connection",
    "start_server",
    "wrap",
]
