"""Raw ``send_zc`` from a ``BufferPool``: fill a pooled buffer, send it, and get it back for
reuse only when the kernel released its pages (on io_uring it goes as a registered buffer).
A plain asyncio socket reads on the other side. Run: ``python examples/pool_send_zc.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket

import zerosend

CHUNK = 256 << 10
CHUNKS = 64  # 16 MiB through 4 buffers: each is reused many times


async def receive(sock: socket.socket, nbytes: int) -> str:
    loop = asyncio.get_running_loop()
    digest, left = hashlib.sha256(), nbytes
    while left:
        data = await loop.sock_recv(sock, min(left, 1 << 20))
        if not data:
            raise ConnectionError("the sender closed early")
        digest.update(data)
        left -= len(data)
    return digest.hexdigest()


async def main() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sender = socket.create_connection(listener.getsockname())
        receiver, _ = listener.accept()
    for sock in (sender, receiver):
        sock.setblocking(False)
    print(f"capabilities: {zerosend.capabilities()}")
    expected = hashlib.sha256()
    receiving = asyncio.ensure_future(receive(receiver, CHUNK * CHUNKS))
    # Ask for zero-copy explicitly: "auto" would copy to a peer on this host.
    backend: zerosend.BackendName = (
        "io_uring" if zerosend.capabilities().io_uring_send_zc else "copy"
    )
    async with (
        zerosend.wrap(sender, backend=backend, zerocopy_threshold=0) as zs,
        zerosend.BufferPool(4, CHUNK) as pool,
    ):
        sends: list[zerosend.SendFuture] = []
        for n in range(CHUNKS):
            buf = await pool.acquire()  # waits while all 4 are with the kernel
            view = memoryview(buf)
            view[:] = bytes([n % 256]) * CHUNK
            expected.update(view)
            sends.append(zs.send_zc(buf))
            buf.release()  # back to the pool once its send is released, not before
        results = await asyncio.gather(*sends)
        zerocopy = sum(r.zerocopy for r in results)
        print(f"{zs.backend}: {len(results)} sends, {zerocopy} without a copy, stats {zs.stats}")
    assert await receiving == expected.hexdigest(), "corrupt bytes"
    receiver.close()
    print("done: every byte arrived intact")


if __name__ == "__main__":
    asyncio.run(main())
