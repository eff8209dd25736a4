"""Helpers every test module shares (the iSCSI ones live in tests/iscsi/iscsi_helpers.py): what
this kernel offers and how a test skips without it, loopback socket pairs, the rig's receiver
behind a connected socket, and the sysctl bookkeeping that repairs a killed run.

Every capability a test may lack has a name (``CAPABILITIES``, also in docs/contributing.md's test
section); ``ZEROSEND_REQUIRE=name,name,...`` (``.ci/run`` names all that CI has) turns the skip of
a missing one into a failure, so a machine that lost one (a sysctl left behind, a missing tool)
cannot turn the suite green by skipping. ``python -m tests.helpers`` prints what this machine has.
"""

from __future__ import annotations

import asyncio
import fcntl
import importlib.util
import os
import resource
import shutil
import socket
import struct
import tempfile
import termios
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

SYSCTL_ROOT = Path("/proc/sys")
#: One file per sysctl a test changed, holding its original value until the test put it back.
#: A run that was killed leaves the file behind; the next run restores the value first.
SYSCTL_MARKERS = Path(tempfile.gettempdir()) / "zerosend-test-sysctls"
#: Every capability a test may lack, by the name ZEROSEND_REQUIRE knows it by.
CAPABILITIES = {
    "io_uring": "io_uring SEND_ZC (Linux 6.0+, not disabled by sysctl or seccomp)",
    "msg_zerocopy": "MSG_ZEROCOPY (Linux 4.14+)",
    "rig": "root, iproute2 and nftables: network namespaces, veth and ifb devices, nft rules",
    "fuse": "root and /dev/fuse, and the right to mount a FUSE file system (the gated disk)",
    "nofile": "RLIMIT_NOFILE raised to 12,000 descriptors (root, or a hard limit that high)",
    "sysctl": "root and the sysctls tests change (kernel.io_uring_disabled needs Linux 6.6+)",
    "hugepages": "the kernel reserves a huge page when vm.nr_hugepages asks for one",
    "setpriv": "util-linux's setpriv (runs a child without CAP_IPC_LOCK)",
    "ipv6": "an IPv6 loopback address (::1)",
    "tc": "iproute2's tc with the tbf and pfifo qdiscs",
    "uvloop": "the uvloop package",
    "iscsi_clients": "libiscsi-bin (iscsi-inq, iscsi-ls, iscsi-test-cu...), qemu-img, tgt",
    "make": "make (the tests that build wheels and distributions)",
    "native": "the Rust extension zerosend._native (absent in the pure-Python install)",
}


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
from bench.harness.receiver import start_receiver  # noqa: E402
from bench.harness.rig import Rig, rig_unavailable_reason  # noqa: E402

CAPS = zerosend.capabilities()
UNAVAILABLE = {
    "io_uring": None if CAPS.io_uring_send_zc else CAPS.io_uring_send_zc_reason,
    "msg_zerocopy": None if CAPS.msg_zerocopy else CAPS.msg_zerocopy_reason,
    "copy": None,
}
REQUIRED = {name for name in os.environ.get("ZEROSEND_REQUIRE", "").split(",") if name}
if REQUIRED - CAPABILITIES.keys():
    raise pytest.UsageError(
        f"ZEROSEND_REQUIRE names {sorted(REQUIRED - CAPABILITIES.keys())}; "
        f"known: {sorted(CAPABILITIES)}"
    )


def _rig_reason() -> str | None:
    if shutil.which("nft") is None:
        return "nftables' nft command is missing (scripts/install-system-deps.sh installs it)"
    return rig_unavailable_reason()


RIG_UNAVAILABLE = _rig_reason()


def missing_tools(capability: str, *binaries: str) -> str | None:
    """Why ``capability`` is unavailable if one of ``binaries`` is not on PATH, else None."""
    missing = [b for b in binaries if shutil.which(b) is None]
    return f"not installed: {', '.join(missing)} ({CAPABILITIES[capability]})" if missing else None


def _ipv6_reason() -> str | None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError as err:
        return f"no IPv6 loopback here: {err}"
    return None


def _fuse_reason() -> str | None:
    if os.geteuid() != 0:
        return "mounting a FUSE file system here needs root"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    return None  # whether mounting is allowed shows when a test mounts


def _sysctl_reason() -> str | None:
    if not os.access(SYSCTL_ROOT / "net" / "core" / "optmem_max", os.W_OK):
        return "changing sysctls needs root (and a writable /proc/sys)"
    return None


def _nofile_reason(needed: int = 12_000) -> str | None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard >= needed or os.geteuid() == 0:
        return None  # root may raise the hard limit; a container may still refuse (the test says)
    return f"RLIMIT_NOFILE hard limit {hard} is below {needed} and cannot be raised without root"


def _uvloop_reason() -> str | None:
    return None if importlib.util.find_spec("uvloop") else "uvloop is not installed"


def _native_reason() -> str | None:
    if zerosend._native.__name__ != "zerosend._native":
        return "the native extension is not loaded (the pure-Python install)"
    return None


#: What can be told before any test runs: None where the capability is there. The others
#: ("hugepages", and "fuse", "nofile" as far as the kernel or a container refuses) show
#: only when a test tries; the test then calls require() with the reason.
PROBES: dict[str, Callable[[], str | None]] = {
    "io_uring": lambda: UNAVAILABLE["io_uring"],
    "msg_zerocopy": lambda: UNAVAILABLE["msg_zerocopy"],
    "rig": lambda: RIG_UNAVAILABLE,
    "fuse": _fuse_reason,
    "nofile": _nofile_reason,
    "sysctl": _sysctl_reason,
    "setpriv": lambda: missing_tools("setpriv", "setpriv"),
    "ipv6": _ipv6_reason,
    "tc": lambda: missing_tools("tc", "tc"),
    "uvloop": _uvloop_reason,
    "iscsi_clients": lambda: missing_tools(
        "iscsi_clients", "iscsi-inq", "iscsi-ls", "iscsi-test-cu", "qemu-img", "tgtd", "tgtadm"
    ),
    "make": lambda: missing_tools("make", "make"),
    "native": _native_reason,
}


def require_probed(capability: str) -> None:
    """``require(capability, <its probe's reason>)``."""
    require(capability, PROBES[capability]())


#: The backends a socket can get ("auto" picks one of them), and those that send zero-copy.
BACKENDS = [name for name in zerosend.BACKENDS if name != "auto"]
ZERO_COPY_BACKENDS = [name for name in BACKENDS if name != "copy"]


def require(capability: str, reason: str | None) -> None:
    """Skip the test if ``capability`` is unavailable (``reason``), or fail it when
    ZEROSEND_REQUIRE names it."""
    assert capability in CAPABILITIES or capability == "copy", f"unnamed capability {capability}"
    if reason is None:
        return
    message = f"{capability} unavailable: {reason}"
    if capability in REQUIRED:
        pytest.fail(f"{message} (ZEROSEND_REQUIRE={','.join(sorted(REQUIRED))})", pytrace=False)
    pytest.skip(message)


def require_backend(backend: str) -> None:
    require(backend, UNAVAILABLE[backend])


def assert_zero_copy_sends(stats: dict[str, int], backend: str, nbytes: int) -> None:
    """The socket's ``nbytes`` went as zero-copy sends (the kernel may still have copied them,
    as loopback does: that is counted apart), not by copy below the threshold or by request;
    on the copy backend, by that backend."""
    if backend == "copy":
        assert stats["bytes_copied_backend"] == nbytes, stats
        return
    zero_copy_sends = stats["bytes_zerocopy"] + stats["bytes_copied_by_kernel"]
    assert zero_copy_sends == nbytes, f"{nbytes} bytes should have gone zero-copy: {stats}"
    assert stats["notifications"] > 0, stats


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


#: Guards against a hang only (a send that never resolves); not a performance bound.
HANG_GUARD_S = 60


async def driver_round_trip(backend: str) -> None:
    """Send one byte zero-copy through this loop's driver on a loopback pair and wait for its
    release. Every completion the kernel posted before it (an earlier send's acceptance, say)
    has been reaped and acted on by the time it resolves: an event, where a sleep would only
    make it likely on a loaded machine."""
    client, server = await tcp_pair()
    with client, server:
        zs = zerosend.wrap(client, backend=backend, zerocopy_threshold=0)  # type: ignore[arg-type]
        await asyncio.wait_for(zs.send_zc(b"."), HANG_GUARD_S)
        await zs.aclose()


async def accepted_not_released(sock: socket.socket, nbytes: int, backend: str) -> None:
    """Wait until the kernel accepted all ``nbytes`` (``TIOCOUTQ``), then until the driver
    reaped every completion posted since (``driver_round_trip``): an engine that resolves at
    acceptance has resolved by then."""
    await wait_until(lambda: unsent_bytes(sock) == nbytes, "the kernel accepted the send")
    await driver_round_trip(backend)
    assert unsent_bytes(sock) == nbytes, "the peer must not have acknowledged anything"


Report = dict[str, object]


@asynccontextmanager
async def rig_connection(rig: Rig, port: int) -> AsyncIterator[tuple[socket.socket, Report]]:
    """A non-blocking TCP socket connected to a receiver in the rig that hashes everything it
    reads. On exit the socket must be closed; the dict then holds the receiver's report
    (``bytes``, ``sha256``)."""
    report: Report = {}
    with start_receiver(rig.peer_addr, port, namespace=rig.ns, once=True, check="sha256") as rx:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, (rig.peer_addr, port))
        yield sock, report
        report.update(await asyncio.to_thread(rx.report))


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


if __name__ == "__main__":
    # What this machine offers, by capability name: the list ZEROSEND_REQUIRE may demand.
    for name, what in CAPABILITIES.items():
        if name not in PROBES:
            print(f"{name:14} shown when its test runs  ({what})")
            continue
        reason = PROBES[name]()
        print(f"{name:14} {'yes' if reason is None else 'NO: ' + reason}  ({what})")
