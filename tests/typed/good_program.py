"""A user program written against zerosend's types; mypy --strict must accept it, and it runs
(on loopback) to show the types are what is really returned. tests/test_api_types.py runs both."""

from __future__ import annotations

import array
import asyncio
import mmap
import socket
import sys

import zerosend
from zerosend import FallbackCode, SendFuture, SendResult, ZerosendError


async def main() -> int:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    client.setblocking(False)
    total = 0
    zs = zerosend.wrap(client, zerocopy_threshold=0)
    try:
        pending: list[SendFuture] = [
            zs.send_zc(b"bytes"),
            zs.send_zc(bytearray(b"bytearray")),
            zs.send_zc(memoryview(b"memoryview")),
            zs.send_zc(array.array("B", b"array")),
            zs.send_zc([b"vec", bytearray(b"tor")]),
            zs.send(b"copy"),
        ]
        with mmap.mmap(-1, 4096) as region:
            pending.append(zs.send_zc(region))
            await pending[-1]
        async with zerosend.BufferPool(2, 4096) as pool:
            async with pool.acquire() as buf:
                memoryview(buf)[:4] = b"pool"
                pending.append(zs.send_zc(memoryview(buf)[:4]))
                pending.append(zs.send_zc(buf))
                await pending[-1]
        for fut in pending:
            result: SendResult = await fut
            nbytes, zerocopy = result
            total += nbytes
            assert isinstance(nbytes, int) and isinstance(zerocopy, int)
            assert (nbytes, zerocopy) == (result.nbytes, result.zerocopy)
        code: FallbackCode | None = zs.fallback_code
        if code is FallbackCode.PEER_ON_THIS_HOST:
            print("loopback: auto copies", file=sys.stderr)
        try:
            zerosend.wrap(client, backend="io_uring")
        except ZerosendError as error:  # wrapped twice: a ValueError, not this
            print(error, file=sys.stderr)
        except ValueError:
            pass
    finally:
        await zs.aclose()
        server.close()
        listener.close()
    return total


if __name__ == "__main__":
    print(asyncio.run(main()))
