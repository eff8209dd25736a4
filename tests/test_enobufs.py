"""MSG_ZEROCOPY under a tiny net.core.optmem_max: ENOBUFS waits for releases and retries; with
nothing in flight to wait for, the send goes by copy. Nothing is lost. The sysctl is restored."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import zerosend
from tests.conftest import UNAVAILABLE, read_all, tcp_pair

OPTMEM = Path("/proc/sys/net/core/optmem_max")
MiB = 1 << 20

pytestmark = pytest.mark.skipif(
    UNAVAILABLE["msg_zerocopy"] is not None, reason=f"{UNAVAILABLE['msg_zerocopy']}"
)


@pytest.fixture
def optmem() -> Iterator[Path]:
    if not os.access(OPTMEM, os.W_OK):
        pytest.skip("changing net.core.optmem_max needs root")
    before = OPTMEM.read_text().strip()
    try:
        yield OPTMEM
    finally:
        OPTMEM.write_text(before)


async def _send_all(limit: int, optmem: Path) -> tuple[zerosend.Socket, list[object], bool]:
    client, server = await tcp_pair()
    zs = zerosend.wrap(client, backend="msg_zerocopy")
    received = bytearray()
    reader = asyncio.create_task(read_all(server, received))
    data = os.urandom(32 * MiB)
    optmem.write_text(str(limit))
    chunk = 256 * 1024
    sends = [zs.send_zc(memoryview(data)[i : i + chunk]) for i in range(0, len(data), chunk)]
    outcomes = await asyncio.wait_for(asyncio.gather(*sends, return_exceptions=True), 60)
    await zs.aclose()
    await reader
    server.close()
    intact = bytes(received) == data
    return zs, outcomes, intact


@pytest.mark.asyncio
async def test_enobufs_waits_for_releases_and_loses_nothing(optmem: Path) -> None:
    zs, outcomes, intact = await _send_all(2048, optmem)
    assert not [o for o in outcomes if isinstance(o, BaseException)]
    assert zs.stats["enobufs_waits"] > 0, "the limit should have been hit"
    assert intact


@pytest.mark.asyncio
async def test_enobufs_with_nothing_in_flight_sends_by_copy(optmem: Path) -> None:
    # With no release to wait for, failing the send would leave a hole in the stream; it goes
    # by copy instead, and the result and the counters say so.
    zs, outcomes, intact = await _send_all(0, optmem)
    assert not [o for o in outcomes if isinstance(o, BaseException)]
    assert all(isinstance(o, zerosend.SendResult) and not o.zerocopy for o in outcomes)
    assert zs.stats["zerocopy_refusals"] == len(outcomes)
    assert intact
