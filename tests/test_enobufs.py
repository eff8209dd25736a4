"""MSG_ZEROCOPY under a tiny net.core.optmem_max: ENOBUFS waits for releases and retries, and is
an error (with what to do) only when nothing is in flight to wait for. The sysctl is restored."""

from __future__ import annotations

import asyncio
import errno
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
async def test_enobufs_with_nothing_in_flight_is_a_clear_error(optmem: Path) -> None:
    zs, outcomes, _ = await _send_all(0, optmem)
    errors = [o for o in outcomes if isinstance(o, OSError)]
    assert errors and len(errors) == len(outcomes)
    assert errors[0].errno == errno.ENOBUFS
    assert "optmem_max" in str(errors[0])
    assert zs.stats["errors"] == len(outcomes)
