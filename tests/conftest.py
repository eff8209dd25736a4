"""Shared fixtures: real connected sockets on loopback and on the rig, the backends this kernel
offers, and system settings changed only through a fixture that always puts them back.

``ZEROSEND_REQUIRE=io_uring,msg_zerocopy,rig`` (set by ``.ci/run``) turns the skip of a missing
capability into a failure, so a machine that lost one (a sysctl left behind, a missing tool)
cannot turn the suite green by skipping.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import shutil
import socket
import struct
import tempfile
import termios
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

SYSCTL_ROOT = Path("/proc/sys")
#: One file per sysctl a test changed, holding its original value until the test put it back.
#: A run that was killed leaves the file behind; the next run restores the value first.
SYSCTL_MARKERS = Path(tempfile.gettempdir()) / "zerosend-test-sysctls"
REQUIRABLE = {"io_uring", "msg_zerocopy", "rig"}


def restore_sysctls_left_by_a_killed_run() -> list[str]:
    repaired = []
    if SYSCTL_MARKERS.is_dir():
        for marker in SYSCTL_MARKERS.iterdir():
            original = marker.read_text()
            (SYSCTL_ROOT / marker.name.replace(".", "/")).write_text(original)
            marker.unlink()
            repaired.append(f"{marker.name}={original}")
    return repaired


# Before anything probes the kernel: a left-over kernel.io_uring_disabled=2 would otherwise make
# every io_uring test skip.
REPAIRED_SYSCTLS = restore_sysctls_left_by_a_killed_run()

import zerosend  # noqa: E402  (after the repair: capabilities() reads the sysctls)
from zerosend._rig import IfbSink, Rig, rig_unavailable_reason  # noqa: E402

CAPS = zerosend.capabilities()
UNAVAILABLE = {
    "io_uring": None if CAPS.io_uring_send_zc else CAPS.io_uring_send_zc_reason,
    "msg_zerocopy": None if CAPS.msg_zerocopy else CAPS.msg_zerocopy_reason,
    "copy": None,
}
REQUIRED = {name for name in os.environ.get("ZEROSEND_REQUIRE", "").split(",") if name}
if REQUIRED - REQUIRABLE:
    raise pytest.UsageError(
        f"ZEROSEND_REQUIRE names {sorted(REQUIRED - REQUIRABLE)}; known: {sorted(REQUIRABLE)}"
    )


def _rig_reason() -> str | None:
    if shutil.which("nft") is None:
        return "nftables' nft command is missing (scripts/install-system-deps.sh installs it)"
    return rig_unavailable_reason()


RIG_UNAVAILABLE = _rig_reason()
ZERO_COPY_BACKENDS = ["io_uring", "msg_zerocopy"]


def require(capability: str, reason: str | None) -> None:
    """Skip the test if ``capability`` is unavailable (``reason``), or fail it when
    ZEROSEND_REQUIRE names it."""
    if reason is None:
        return
    message = f"{capability} unavailable: {reason}"
    if capability in REQUIRED:
        pytest.fail(f"{message} (ZEROSEND_REQUIRE={','.join(sorted(REQUIRED))})", pytrace=False)
    pytest.skip(message)


def require_backend(backend: str) -> None:
    require(backend, UNAVAILABLE[backend])


def pytest_report_header() -> list[str]:
    lines = [f"zerosend capabilities: {CAPS!r}; rig: {RIG_UNAVAILABLE or 'available'}"]
    if REQUIRED:
        lines.append(f"ZEROSEND_REQUIRE: {','.join(sorted(REQUIRED))}")
    if REPAIRED_SYSCTLS:
        lines.append(f"restored sysctls left by a killed run: {', '.join(REPAIRED_SYSCTLS)}")
    return lines


@pytest.fixture(params=["io_uring", "msg_zerocopy", "copy"])
def backend(request: pytest.FixtureRequest) -> str:
    """Each backend in turn; skipped (with the kernel's reason) where unavailable."""
    require_backend(request.param)
    return request.param


@pytest.fixture(params=ZERO_COPY_BACKENDS)
def zc_backend(request: pytest.FixtureRequest) -> str:
    """Each zero-copy backend in turn."""
    require_backend(request.param)
    return request.param


@pytest.fixture
def rig() -> Iterator[Rig]:
    """The measuring rig (a receiver namespace behind veth), with nftables."""
    require("rig", RIG_UNAVAILABLE)
    with Rig() as built:
        yield built


@pytest.fixture
def ifb() -> Iterator[IfbSink]:
    """The true-zero-copy topology: an ifb device that frees, uncopied, what is sent to it."""
    require("rig", RIG_UNAVAILABLE)
    with IfbSink() as sink:
        yield sink


@pytest.fixture
def sysctl() -> Iterator[Callable[[str, str], str]]:
    """``sysctl(name, value)`` sets a sysctl (e.g. ``"net.core.optmem_max"``) and returns its
    value before; every one set is restored after the test, and after a killed run at the next
    session start (the original is kept in a marker file until then)."""
    changed: list[tuple[Path, Path]] = []

    def set_sysctl(name: str, value: str) -> str:
        path = SYSCTL_ROOT / name.replace(".", "/")
        if not path.exists():
            pytest.skip(f"this kernel has no {name} sysctl")
        if not os.access(path, os.W_OK):
            pytest.skip(f"changing {name} needs root")
        before = path.read_text().strip()
        marker = SYSCTL_MARKERS / name
        if not marker.exists():  # the first change of this test: remember the original
            SYSCTL_MARKERS.mkdir(exist_ok=True)
            marker.write_text(before)
            changed.append((path, marker))
        path.write_text(value)
        return before

    yield set_sysctl
    for path, marker in reversed(changed):
        path.write_text(marker.read_text())
        marker.unlink()


def unsent_bytes(sock: socket.socket) -> int:
    """``ioctl(TIOCOUTQ)``: bytes in the socket's send queue, not yet acknowledged by the peer."""
    raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4)
    return int(struct.unpack("i", raw)[0])


async def wait_until(condition: Callable[[], bool], what: str, turns: int = 2000) -> None:
    """Let the loop run until ``condition()`` holds (a step at a time; a hang fails)."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")


#: One send the ingress-drop window holds: fully accepted by the kernel, never acknowledged.
HELD = 64 * 1024


async def accepted_not_released(sock: socket.socket, nbytes: int) -> None:
    """Wait until the kernel accepted all ``nbytes`` (``TIOCOUTQ``), then give a completion of
    that acceptance the time to arrive: an engine that resolves at acceptance resolves here."""
    await wait_until(lambda: unsent_bytes(sock) == nbytes, "the kernel accepted the send")
    await asyncio.sleep(0.2)
    assert unsent_bytes(sock) == nbytes, "the peer must not have acknowledged anything"


Report = dict[str, object]


@asynccontextmanager
async def rig_connection(rig: Rig, port: int) -> AsyncIterator[tuple[socket.socket, Report]]:
    """A non-blocking TCP socket connected to a receiver in the rig that hashes everything it
    reads. On exit the socket must be closed; the dict then holds the receiver's report
    (``bytes``, ``sha256``)."""
    receiver = rig.start_receiver(port, "sha256")
    report: Report = {}
    try:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, (rig.peer_addr, port))
        yield sock, report
    except BaseException:
        receiver.kill()  # the test failed: do not wait for a stream that will not end
        raise
    finally:
        out, err = await asyncio.to_thread(receiver.communicate, timeout=60)
    assert receiver.returncode == 0, err
    report.update(json.loads(out.strip().splitlines()[-1]))


async def tcp_pair(
    family: socket.AddressFamily = socket.AF_INET,
) -> tuple[socket.socket, socket.socket]:
    """A connected, non-blocking TCP pair on loopback: (client, server side)."""
    loop = asyncio.get_running_loop()
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.bind((host, 0))
        listener.listen()
        listener.setblocking(False)
        client = socket.socket(family, socket.SOCK_STREAM)
        client.setblocking(False)
        await loop.sock_connect(client, listener.getsockname()[:2])
        server, _ = await loop.sock_accept(listener)
    server.setblocking(False)
    return client, server


async def read_all(sock: socket.socket, into: bytearray, *, chunk: int = 1 << 20) -> None:
    """Read ``sock`` until EOF, appending to ``into``."""
    loop = asyncio.get_running_loop()
    buf = bytearray(chunk)
    view = memoryview(buf)
    while True:
        n = await loop.sock_recv_into(sock, buf)
        if n == 0:
            return
        into += view[:n]
