"""MSG_ZEROCOPY under a tiny net.core.optmem_max: ENOBUFS waits for releases and retries; with
nothing in flight to wait for, the send goes by copy. Nothing is lost. The sysctl is restored."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import pytest

import zerosend
from tests.helpers import read_all, require_backend, tcp_pair

MiB = 1 << 20
SetSysctl = Callable[[str, str], str]


@pytest.fixture(autouse=True)
def _needs_msg_zerocopy() -> None:
    require_backend("msg_zerocopy")


async def _send_all(limit: int, sysctl: SetSysctl) -> tuple[zerosend.Socket, list[object], bool]:
    client, server = await tcp_pair()
    # 256 KiB sends, below the default threshold: sent zero-copy here.
    zs = zerosend.wrap(client, backend="msg_zerocopy", zerocopy_threshold=0)
    received = bytearray()
    reader = asyncio.create_task(read_all(server, received))
    data = os.urandom(32 * MiB)
    sysctl("net.core.optmem_max", str(limit))
    chunk = 256 * 1024
    sends = [zs.send_zc(memoryview(data)[i : i + chunk]) for i in range(0, len(data), chunk)]
    outcomes = await asyncio.wait_for(asyncio.gather(*sends, return_exceptions=True), 60)
    await zs.aclose()
    await reader
    server.close()
    intact = bytes(received) == data
    return zs, outcomes, intact


@pytest.mark.asyncio
async def test_enobufs_waits_for_releases_and_loses_nothing(sysctl: SetSysctl) -> None:
    zs, outcomes, intact = await _send_all(2048, sysctl)
    assert not [o for o in outcomes if isinstance(o, BaseException)]
    assert zs.stats["enobufs_waits"] > 0, "the limit should have been hit"
    assert intact


@pytest.mark.asyncio
async def test_enobufs_with_nothing_in_flight_sends_by_copy(sysctl: SetSysctl) -> None:
    # With no release to wait for, failing the send would leave a hole in the stream; it goes
    # by copy instead, and the result and the counters say so.
    zs, outcomes, intact = await _send_all(0, sysctl)
    assert not [o for o in outcomes if isinstance(o, BaseException)]
    assert all(isinstance(o, zerosend.SendResult) and not o.zerocopy for o in outcomes)
    assert zs.stats["zerocopy_refusals"] == len(outcomes)
    assert intact
