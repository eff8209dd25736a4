"""The same sends on uvloop: the driver's descriptor is watched through uvloop's add_reader, and
the wrapped socket itself is read through uvloop while its sends are in flight."""

from __future__ import annotations

import asyncio
import os

import zerosend
from tests.helpers import require_probed, tcp_pair

MiB = 1 << 20


async def _integrity(backend: str) -> None:
    loop = asyncio.get_running_loop()
    assert "uvloop" in type(loop).__module__
    client, server = await tcp_pair()

    async def echo() -> None:
        buf = bytearray(MiB)
        while n := await loop.sock_recv_into(server, buf):
            await loop.sock_sendall(server, memoryview(buf)[:n])
        server.close()

    data = os.urandom(8 * MiB + 7)
    echoed = bytearray()

    async def read_back() -> None:
        # The wrapped socket, read on uvloop while the driver watches it for releases.
        buf = bytearray(MiB)
        while len(echoed) < len(data):
            n = await loop.sock_recv_into(client, buf)
            assert n > 0, "the echo ended early"
            echoed.extend(memoryview(buf)[:n])

    echo_task = asyncio.create_task(echo())
    reader = asyncio.create_task(read_back())
    view = memoryview(data)
    async with zerosend.wrap(client, backend=backend, zerocopy_threshold=0) as zs:
        parts = [view[i : i + 300_001] for i in range(0, len(data), 300_001)]
        sends = [zs.send_zc(p) for p in parts]
        assert zs.inflight > 0
        results = await asyncio.gather(*sends)
        assert sum(r.nbytes for r in results) == len(data)
        await reader
    await echo_task
    assert echoed == data


def test_send_zc_on_uvloop(backend: str) -> None:
    require_probed("uvloop")
    import uvloop

    uvloop.run(_integrity(backend))
