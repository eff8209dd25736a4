"""A zerosend stream server and its client, on asyncio (or uvloop: pass --uvloop).

The server answers each request line ``<size>`` with ``size`` bytes written by ``write_zc``
(zero-copy where the backend and ``zerocopy_threshold`` allow; to a peer on this host, "auto"
copies, and ``fallback_reason`` says why), then a checksum line. The client is a zerosend
stream too. Run: ``python examples/asyncio_streams.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys

import zerosend

PAYLOAD = bytes(range(256)) * 16384  # 4 MiB, shared read-only by every response


async def serve(reader: asyncio.StreamReader, writer: zerosend.StreamWriter) -> None:
    try:
        while line := await reader.readline():
            size = min(int(line), len(PAYLOAD))
            body = memoryview(PAYLOAD)[:size]
            writer.write_zc(body)  # submitted now; bytes objects need no care until release
            writer.write(hashlib.sha256(body).hexdigest().encode() + b"\n")  # small: a copy
            await writer.drain()  # back-pressure on the bytes the kernel has not released
    finally:
        writer.close(timeout=30)  # a peer that stops reading is cut off after 30 s
        await writer.wait_closed()


async def main() -> None:
    server = await zerosend.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        reader, writer = await zerosend.open_connection("127.0.0.1", port)
        zs = writer.get_extra_info("zerosend")
        print(f"client backend: {zs.backend} ({zs.fallback_code}: {zs.fallback_reason})")
        for size in (10, 100_000, 4 << 20):
            writer.write(b"%d\n" % size)
            body = await reader.readexactly(size)
            digest = (await reader.readline()).strip().decode()
            assert digest == hashlib.sha256(body).hexdigest(), "corrupt response"
            print(f"received {size} bytes, checksum ok")
        writer.close()
        await writer.wait_closed()
        server.close()
    print("done")


if __name__ == "__main__":
    if "--uvloop" in sys.argv:
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())
