"""With io_uring switched off by the kernel.io_uring_disabled sysctl, zerosend says why and falls
back to MSG_ZEROCOPY. The sysctl is restored afterwards (and after a killed run, at the next
session start: see the ``sysctl`` fixture)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable

import pytest

import zerosend
from bench.harness.receiver import start_receiver
from bench.harness.rig import Rig
from tests.helpers import (
    CAPS,
    SYSCTL_MARKERS,
    SYSCTL_ROOT,
    require,
    restore_sysctls_left_by_a_killed_run,
    tcp_pair,
)

PORT = 5302


@pytest.fixture
def io_uring_disabled(sysctl: Callable[[str, str], str]) -> None:
    sysctl("kernel.io_uring_disabled", "2")


def test_capabilities_name_the_sysctl(io_uring_disabled: None) -> None:
    caps = zerosend.capabilities()
    assert caps.io_uring_send_zc is False
    assert caps.io_uring_send_zc_reason is not None
    assert "kernel.io_uring_disabled" in caps.io_uring_send_zc_reason


@pytest.mark.asyncio
async def test_asking_for_io_uring_names_the_sysctl(io_uring_disabled: None) -> None:
    client, server = await tcp_pair()
    with client, server:
        with pytest.raises(zerosend.BackendUnavailableError, match="io_uring_disabled") as raised:
            zerosend.wrap(client, backend="io_uring")
        assert isinstance(raised.value, OSError) and raised.value.errno is not None


def test_auto_falls_back_with_the_reason(io_uring_disabled: None, rig: Rig) -> None:
    # A peer in another namespace: "auto" wants zero-copy there, and must say why not io_uring.
    async def send(host: str) -> tuple[str, str | None, int]:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, PORT))
        async with zerosend.wrap(sock) as zs:
            result = await zs.send_zc(os.urandom(3 << 20))
            return zs.backend, zs.fallback_reason, result.nbytes

    with start_receiver(rig.peer_addr, PORT, namespace=rig.ns, once=True) as rx:
        backend, reason, nbytes = asyncio.run(send(rig.peer_addr))
        report = rx.report()
    assert backend == ("msg_zerocopy" if zerosend.capabilities().msg_zerocopy else "copy")
    assert reason and "io_uring_disabled" in reason
    assert nbytes == 3 << 20
    assert report["bytes"] == 3 << 20


def test_a_killed_runs_sysctl_is_restored_at_the_next_start() -> None:
    # What a run killed inside the fixture leaves: the sysctl changed and the marker with the
    # original value. The next session's start (conftest, before probing the kernel) repairs it.
    path = SYSCTL_ROOT / "kernel" / "io_uring_disabled"
    if not path.exists() or not os.access(path, os.W_OK):
        require("sysctl", "needs root and the kernel.io_uring_disabled sysctl (Linux 6.6+)")
    original = path.read_text().strip()
    marker = SYSCTL_MARKERS / "kernel.io_uring_disabled"
    SYSCTL_MARKERS.mkdir(exist_ok=True)
    marker.write_text(original)
    path.write_text("2")
    try:
        repaired = restore_sysctls_left_by_a_killed_run()
        restored = path.read_text().strip()
    finally:
        path.write_text(original)
        marker.unlink(missing_ok=True)
    assert restored == original
    assert repaired == [f"kernel.io_uring_disabled={original}"]
    assert not marker.exists()
    assert zerosend.capabilities().io_uring_send_zc == CAPS.io_uring_send_zc
