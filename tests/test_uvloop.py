"""The same sends on uvloop: the driver's descriptor is watched through uvloop's add_reader."""

from __future__ import annotations

import asyncio
import os

import pytest

import zerosend
from tests.conftest import read_all, tcp_pair

uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed")

MiB = 1 << 20


async def _integrity(backend: str) -> None:
    assert "uvloop" in type(asyncio.get_running_loop()).__module__
    client, server = await tcp_pair()
    received = bytearray()
    reader = asyncio.create_task(read_all(server, received))
    data = os.urandom(8 * MiB + 7)
    view = memoryview(data)
    async with zerosend.wrap(client, backend=backend) as zs:
        parts = [view[i : i + 300_001] for i in range(0, len(data), 300_001)]
        results = await asyncio.gather(*(zs.send_zc(p) for p in parts))
        assert sum(r.nbytes for r in results) == len(data)
        # Reading the same socket on uvloop while sends are in flight is covered by the reader.
    await reader
    server.close()
    assert received == data


def test_send_zc_on_uvloop(backend: str) -> None:
    uvloop.run(_integrity(backend))
