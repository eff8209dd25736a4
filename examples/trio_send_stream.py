"""trio: a ``trio.abc.SendStream`` over zerosend, the receive side a trio socket stream.
``send_all`` returns when the kernel released the data, so the buffer can be refilled at once.
Run: ``python examples/trio_send_stream.py``.
"""

from __future__ import annotations

import hashlib
import socket

import trio

from zerosend.trio_stream import ZerosendSendStream

ROUNDS = 32
SIZE = 1 << 20


async def receive(stream: trio.SocketStream, nbytes: int) -> str:
    digest = hashlib.sha256()
    while nbytes:
        data = await stream.receive_some(min(nbytes, 1 << 20))
        if not data:
            raise ConnectionError("the sender closed early")
        digest.update(data)
        nbytes -= len(data)
    return digest.hexdigest()


async def main() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sender = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
    sender.setblocking(False)
    peer = trio.SocketStream(trio.socket.from_stdlib_socket(accepted))
    stream = ZerosendSendStream(sender, zerocopy_threshold=64 << 10)
    print(f"backend: {stream.zerosend_socket.backend}")
    expected = hashlib.sha256()
    buffer = bytearray(SIZE)  # one buffer, refilled after each send_all
    async with trio.open_nursery() as nursery:
        got: list[str] = []

        async def receiver() -> None:
            got.append(await receive(peer, ROUNDS * SIZE))

        nursery.start_soon(receiver)
        for n in range(ROUNDS):
            buffer[:] = bytes([n]) * SIZE
            expected.update(buffer)
            await stream.send_all(buffer)
        await stream.aclose()
    await peer.aclose()
    assert got == [expected.hexdigest()], "corrupt bytes"
    print("done: every byte arrived intact")


if __name__ == "__main__":
    trio.run(main)
