"""The target with zero-copy really on: its sends cross the rig's veth pair (the target on the
host, the initiators inside the rig's namespace) with a zero-copy backend forced and the
zero-copy probe off, so the kernel's copy on veth delivery does not switch a connection to copy.
Each test checks, from the target's session-end log lines, that the data went out as zero-copy
sends on the forced backend.
"""

from __future__ import annotations

import ctypes
import random
import re
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from iscsi_helpers import MiniInitiator, RunningTarget, make_image, need, run

from bench.harness.rig import Rig

MiB = 1 << 20
BLOCK = 512
CLONE_NEWNET = 0x40000000
_SESSION_END = re.compile(
    r"session ended \(commands=\d+ read=(?P<read>\d+) bytes write=(?P<write>\d+) bytes .*"
    r"backend=(?P<backend>\w+) zerocopy-bytes=(?P<zerocopy>\d+) "
    r"kernel-copied-bytes=(?P<kernel_copied>\d+) copied-bytes=(?P<copied>\d+) "
    r"probe-fallbacks=(?P<fallbacks>\d+)\)"
)


def start_on_rig(target_factory, rig: Rig, backend: str, *args: str, probe: str = "off"):
    """The target on the rig's host address, ``backend`` forced, the probe ``probe``."""
    return target_factory(
        "--backend", backend, "--zerocopy-probe", probe, *args, host=rig.host_addr
    )


def session_ends(t: RunningTarget, count: int) -> list[dict[str, str]]:
    """The transmit figures of the first ``count`` normal sessions that ended (waits for them:
    the target logs a session's end just after the initiator left)."""
    deadline = time.monotonic() + 30
    while True:
        ends = [m.groupdict() for m in _SESSION_END.finditer(t.log())]
        ends = [e for e in ends if int(e["read"]) or int(e["write"])]
        if len(ends) >= count or time.monotonic() > deadline:
            assert len(ends) >= count, f"{len(ends)} of {count} sessions ended:\n{t.log()}"
            return ends


def assert_zero_copy_reads(end: dict[str, str], backend: str) -> None:
    """Every byte the session read went out in zero-copy sends on ``backend``: released
    uncopied or copied by the kernel on delivery, never copied up front."""
    assert end["backend"] == backend, end
    assert end["fallbacks"] == "0", f"the probe switched to copy: {end}"
    sent_zero_copy = int(end["zerocopy"]) + int(end["kernel_copied"])
    assert sent_zero_copy >= int(end["read"]) > 0, str(end)


@pytest.mark.parametrize("lun_form", ["", ":mmap"])
def test_qemu_img_write_through_and_read_back_zero_copy(
    target_factory, rig: Rig, zc_backend: str, tmp_path: Path, lun_form: str
):
    qemu = need("qemu-img")
    image = tmp_path / "disk.img"
    make_image(image, 16 * MiB, seed=3)
    src = tmp_path / "src.raw"
    new = make_image(src, 16 * MiB, seed=4)
    t = start_on_rig(target_factory, rig, zc_backend, "--lun", f"{image}{lun_form}")
    run(rig.command([qemu, "convert", "-n", "-f", "raw", "-O", "raw", str(src), t.url()]))
    back = tmp_path / "back.raw"
    run(rig.command([qemu, "convert", "-f", "raw", "-O", "raw", t.url(), str(back)]))
    assert back.read_bytes() == new
    assert image.read_bytes() == new
    write_end, read_end = session_ends(t, 2)
    assert int(write_end["write"]) == len(new)
    assert int(read_end["read"]) >= len(new)
    assert_zero_copy_reads(read_end, zc_backend)


def test_probe_on_switches_to_copy_over_veth(target_factory, rig: Rig, tmp_path: Path):
    """The control of the probe-off tests: with the probe on, the kernel's copies on veth make
    the connection fall back to copy (so a probe that ignored ``off`` would be seen there)."""
    qemu = need("qemu-img")
    image = tmp_path / "disk.img"
    data = make_image(image, 16 * MiB, seed=5)
    t = start_on_rig(target_factory, rig, "msg_zerocopy", "--lun", str(image), probe="on")
    back = tmp_path / "back.raw"
    run(rig.command([qemu, "convert", "-f", "raw", "-O", "raw", t.url(), str(back)]))
    assert back.read_bytes() == data
    (end,) = session_ends(t, 1)
    assert int(end["fallbacks"]) >= 1, end
    assert int(end["copied"]) > 0, end
    assert "sending by copy" in t.log()


def test_several_sessions_at_once(target_factory, rig: Rig, zc_backend: str, tmp_path: Path):
    """Three qemu-img readers of one LUN, a qemu-img writer of another and an iscsi-perf
    reader, all at once: each reader gets its bytes exactly, each session sends zero-copy."""
    qemu = need("qemu-img")
    perf = need("iscsi-perf")
    shared = tmp_path / "shared.img"
    data = make_image(shared, 16 * MiB, seed=6)
    scratch = tmp_path / "scratch.img"
    make_image(scratch, 16 * MiB, seed=7)
    src = tmp_path / "src.raw"
    new = make_image(src, 16 * MiB, seed=8)
    t = start_on_rig(
        target_factory, rig, zc_backend, "--lun", f"{shared}:mmap", "--lun", str(scratch)
    )
    outs = [tmp_path / f"out{i}.raw" for i in range(3)]
    readers = [
        subprocess.Popen(
            rig.command([qemu, "convert", "-f", "raw", "-O", "raw", t.url(0), str(out)]),
            stderr=subprocess.PIPE,
        )
        for out in outs
    ]
    writer = subprocess.Popen(
        rig.command([qemu, "convert", "-n", "-f", "raw", "-O", "raw", str(src), t.url(1)]),
        stderr=subprocess.PIPE,
    )
    # iscsi-perf reads 64 KiB requests, 4 at a time, until its time limit (-t seconds).
    perf_run = subprocess.Popen(
        rig.command([perf, "-m", "4", "-b", "128", "-t", "3", t.url(0)]),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for proc in [*readers, writer]:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    perf_out, _ = perf_run.communicate(timeout=120)
    assert perf_run.returncode == 0, perf_out
    for out in outs:
        assert out.read_bytes() == data
    assert scratch.read_bytes() == new
    ends = session_ends(t, 5)
    readers_ends = [e for e in ends if int(e["read"])]
    assert len(readers_ends) >= 4, ends
    for end in readers_ends:
        assert_zero_copy_reads(end, zc_backend)


# ---------------------------------------------------------------- a READ racing a WRITE


def connect_from_namespace(ns: str, address: tuple[str, int]) -> socket.socket:
    """A TCP connection made inside network namespace ``ns`` (by a thread that enters it; the
    socket stays in that namespace, the rest of this process does not move)."""
    made: list[socket.socket | BaseException] = []

    def inside() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            with open(f"/run/netns/{ns}") as handle:
                if libc.setns(handle.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {ns} failed")
            made.append(socket.create_connection(address, timeout=20))
        except BaseException as e:  # handed to the caller
            made.append(e)

    thread = threading.Thread(target=inside)
    thread.start()
    thread.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


READ_BLOCKS = 128  # a 64 KiB READ: sent straight from the mapped image
WRITE_LBA, WRITE_BLOCKS = 16, 8  # a 4 KiB WRITE inside it, as immediate data


@pytest.mark.timeout(60)
@pytest.mark.parametrize("digests", ["off", "on"])
def test_read_racing_write_on_mmap_lun(
    target_factory, rig: Rig, zc_backend: str, tmp_path: Path, digests: str
):
    """A READ whose Data-In is held in flight (the ingress-drop window) while a WRITE to the same
    blocks lands; then the window is lifted and the READ arrives by retransmission.

    A ``:mmap`` LUN that can be written lends no pages to its READs (a WRITE would change them
    in place while the kernel still transmits them: a block torn between two transmissions,
    or with DataDigest on, new bytes under the old digest); its READs are read into pooled
    buffers, so the READ queued before the WRITE arrives whole with the old bytes, under their
    own digest.
    """
    image = tmp_path / "disk.img"
    old = make_image(image, 4 * MiB, seed=9)
    new_blocks = random.Random(10).randbytes(WRITE_BLOCKS * BLOCK)
    t = start_on_rig(target_factory, rig, zc_backend, "--lun", f"{image}:mmap")
    ini = MiniInitiator(0, sock=connect_from_namespace(rig.ns, (rig.host_addr, t.port)))
    ini.mrdsl = READ_BLOCKS * BLOCK  # one Data-In PDU: a segment that large goes zero-copy
    try:
        want = "CRC32C" if digests == "on" else "None"
        ini.login(t.iqn, {"HeaderDigest": want, "DataDigest": want})
        assert (ini.hd, ini.dd) == ((digests == "on"),) * 2
        with rig.ingress_drop() as drop:
            ini.scsi(read10(0, READ_BLOCKS), READ_BLOCKS * BLOCK, read=True)
            wait_for(lambda: drop.packets() > 0, "the READ's Data-In to be sent (and dropped)")
            ini.scsi(write10(WRITE_LBA, WRITE_BLOCKS), len(new_blocks), write=True,
                     data=new_blocks)  # fmt: skip
            at = WRITE_LBA * BLOCK
            wait_for(
                lambda: image.read_bytes()[at : at + len(new_blocks)] == new_blocks,
                "the WRITE to reach the image",
            )
        status, data, _ = ini.read_response()  # retransmitted once the window is lifted
        assert status == 0
        write_status, _, _ = ini.read_response()
        assert write_status == 0
    finally:
        ini.close()
    assert len(data) == READ_BLOCKS * BLOCK
    changed = [
        b
        for b in range(READ_BLOCKS)
        if data[b * BLOCK : (b + 1) * BLOCK] != old[b * BLOCK : (b + 1) * BLOCK]
    ]
    assert not changed, f"blocks the later WRITE changed in flight: {changed}"
    (end,) = session_ends(t, 1)
    assert_zero_copy_reads(end, zc_backend)


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + 20
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)
