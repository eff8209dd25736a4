"""anyio: a ``ByteSendStream`` over zerosend, stapled to a receive side into one
``ByteStream``, talking to an anyio echo server; on either backend.
Run: ``python examples/anyio_send_stream.py [asyncio|trio]``.
"""

from __future__ import annotations

import socket
import sys

import anyio
from anyio.streams.stapled import StapledByteStream

from zerosend.anyio_stream import ZerosendByteSendStream


async def main() -> None:
    async def echo(client: anyio.abc.SocketStream) -> None:
        async with client:
            async for data in client:
                await client.send(data.upper())

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tasks:
        tasks.start_soon(listener.serve, echo)
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        # Sends go through zerosend, reads straight from the same socket.
        stream = StapledByteStream(ZerosendByteSendStream(sock), _Receiver(sock))
        await stream.send(b"hello from zerosend\n")
        answer = b""
        while not answer.endswith(b"\n"):
            answer += await stream.receive()
        print(answer.decode().strip())
        assert answer == b"HELLO FROM ZEROSEND\n"
        await stream.aclose()
        tasks.cancel_scope.cancel()
    print("done")


class _Receiver(anyio.abc.ByteReceiveStream):
    """Reads the socket zerosend sends on (anyio has no receive-only wrapper of a raw socket)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    async def receive(self, max_bytes: int = 65536) -> bytes:
        while True:
            await anyio.wait_readable(self._sock)
            try:
                data = self._sock.recv(max_bytes)
            except BlockingIOError:
                continue
            if not data:
                raise anyio.EndOfStream
            return data

    async def aclose(self) -> None:
        pass


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
