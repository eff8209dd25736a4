"""With io_uring switched off by the kernel.io_uring_disabled sysctl, zerosend says why and falls
back to MSG_ZEROCOPY. The sysctl is restored afterwards."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import zerosend
from tests.conftest import read_all, tcp_pair

SYSCTL = Path("/proc/sys/kernel/io_uring_disabled")


@pytest.fixture
def io_uring_disabled() -> Iterator[None]:
    if not SYSCTL.exists():
        pytest.skip("this kernel has no kernel.io_uring_disabled sysctl (older than 6.6)")
    if not os.access(SYSCTL, os.W_OK):
        pytest.skip("changing kernel.io_uring_disabled needs root")
    before = SYSCTL.read_text().strip()
    SYSCTL.write_text("2")
    try:
        yield
    finally:
        SYSCTL.write_text(before)


def test_capabilities_name_the_sysctl(io_uring_disabled: None) -> None:
    caps = zerosend.capabilities()
    assert caps.io_uring_send_zc is False
    assert caps.io_uring_send_zc_reason is not None
    assert "kernel.io_uring_disabled" in caps.io_uring_send_zc_reason


@pytest.mark.asyncio
async def test_auto_falls_back_with_the_reason(io_uring_disabled: None) -> None:
    client, server = await tcp_pair()
    with server:
        with pytest.raises(zerosend.BackendUnavailableError, match="io_uring_disabled") as raised:
            zerosend.wrap(client, backend="io_uring")
        assert isinstance(raised.value, OSError) and raised.value.errno is not None
        zs = zerosend.wrap(client)
        expected = "msg_zerocopy" if zerosend.capabilities().msg_zerocopy else "copy"
        assert zs.backend == expected
        assert zs.fallback_reason and "io_uring_disabled" in zs.fallback_reason
        received = bytearray()
        reader = asyncio.create_task(read_all(server, received))
        data = os.urandom(3 << 20)
        assert (await zs.send_zc(data)).nbytes == len(data)
        await zs.aclose()
        await reader
        assert received == data
