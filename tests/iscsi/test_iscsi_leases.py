"""A pooled transmit buffer goes back to the pool only when the kernel released its pages, on
every path, cancellation included.

The connection whose bytes are checked is a stalled reader: a tiny receive buffer it never
reads, so most of a zero-copy Data-In stays queued in the target's socket, in the pooled
buffer's own pages, until the test reads it. Its session is then ended from outside (session
reinstatement, TARGET COLD RESET) while its task waits for that send, and another session reads
a different LUN through the same pool. Had the buffer gone back at the cancellation, that read
would land in the queued pages and the stalled connection would receive the other LUN's bytes.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import struct
import time
from pathlib import Path

import pytest
from gatedfs import GatedFile
from iscsi_helpers import MiniInitiator, make_image

MiB = 1 << 20
BLOCK = 512
READ_BYTES = 64 * 1024  # one Data-In PDU (MaxRecvDataSegmentLength below): a zero-copy send
ABORT_TASK, TARGET_COLD_RESET = 1, 7


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def stalled_initiator(port: int) -> MiniInitiator:
    """An initiator whose socket has the smallest receive buffer (set before connecting, so the
    window stays small); the test reads it only at the end."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
    sock.settimeout(20)
    sock.connect(("127.0.0.1", port))
    ini = MiniInitiator(port, sock=sock)
    ini.mrdsl = READ_BYTES
    return ini


def send_logout(ini: MiniInitiator, cmdsn: int) -> None:
    bhs = bytearray(48)
    bhs[0] = 0x06  # Logout Request, not immediate
    bhs[1] = 0x80  # close the session
    bhs[16:20] = ini.next_itt().to_bytes(4, "big")
    bhs[24:28] = cmdsn.to_bytes(4, "big")
    bhs[28:32] = ini.expstatsn.to_bytes(4, "big")
    ini.send(bhs)


def task_management(
    ini: MiniInitiator, function: int, ref: int = 0xFFFFFFFF, refcmdsn: int = 0
) -> int:
    """An immediate Task Management Function Request; the response code."""
    bhs = bytearray(48)
    bhs[0] = 0x42
    bhs[1] = 0x80 | function
    bhs[16:20] = ini.next_itt().to_bytes(4, "big")
    bhs[20:24] = ref.to_bytes(4, "big")  # Referenced Task Tag
    bhs[24:28] = ini.cmdsn.to_bytes(4, "big")
    bhs[28:32] = ini.expstatsn.to_bytes(4, "big")
    bhs[32:36] = refcmdsn.to_bytes(4, "big")
    ini.send(bhs)
    rsp, _ = ini.recv()
    assert rsp[0] & 0x3F == 0x22, rsp.hex()
    return rsp[2]


def queued_for_reading(sock: socket.socket) -> int:
    """Bytes in ``sock``'s receive queue (FIONREAD)."""
    import fcntl
    import termios

    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + 20
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("ending", ["reinstatement", "cold reset"])
def test_cancelled_session_keeps_its_buffers_until_release(
    target_factory, zc_backend: str, tmp_path: Path, ending: str
):
    first = tmp_path / "first.img"
    first_data = make_image(first, 1 * MiB, seed=21)
    other = tmp_path / "other.img"
    other_data = make_image(other, 1 * MiB, seed=22)
    # Two pooled buffers: the stalled READ holds one; the other session's two READs, sent
    # together, need two at once, so one of them would get the stalled READ's buffer if it
    # came back early (whichever order the pool hands buffers out in).
    # (a cold reset from another session needs the target set up to allow it)
    t = target_factory("--backend", zc_backend, "--zerocopy-probe", "off", "--buffers", "2",
                       "--lun", str(first), "--lun", str(other),
                       "--cross-session-resets", "on")  # fmt: skip
    stalled = stalled_initiator(t.port)
    try:
        stalled.login(t.iqn, {"MaxRecvDataSegmentLength": str(READ_BYTES)})
        # The Logout first, with the next CmdSN (held in the window), then the READ that fills
        # the gap: the READ's Data-In is queued, then the Logout's response goes out with it in
        # one send that the session's task waits for (send_now).
        send_logout(stalled, stalled.cmdsn + 1)
        stalled.scsi(read10(0, READ_BYTES // BLOCK), READ_BYTES, read=True)
        wait_for(lambda: queued_for_reading(stalled.sock) > 0, "the stalled READ to be sent")

        if ending == "reinstatement":  # the same initiator name and ISID log in again
            reader = MiniInitiator(t.port)
            reader.mrdsl = READ_BYTES
            reader.login(t.iqn, {"MaxRecvDataSegmentLength": str(READ_BYTES)})
        else:
            resetter = MiniInitiator(t.port)
            resetter.login(t.iqn, {"InitiatorName": "iqn.2024-01.org.zerosend:resetter"})
            assert task_management(resetter, TARGET_COLD_RESET) == 0
            resetter.close()
            reader = MiniInitiator(t.port)
            reader.mrdsl = READ_BYTES
            reader.login(t.iqn, {"InitiatorName": "iqn.2024-01.org.zerosend:reader",
                                 "MaxRecvDataSegmentLength": str(READ_BYTES)})  # fmt: skip
        wait_for(lambda: "closing the old one" in t.log() or "COLD RESET" in t.log(),
                 "the stalled session to be ended")  # fmt: skip

        reader.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        for lba in (0, 2 * READ_BYTES // BLOCK):
            reader.scsi(read10(lba, READ_BYTES // BLOCK), READ_BYTES, read=True, lun=1)
        reader.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
        for at in (0, 2 * READ_BYTES):
            status, data, _ = reader.read_response()
            assert status == 0
            assert data == other_data[at : at + READ_BYTES]
        reader.close()

        # Read on with room for all of it (a window that opens by a few bytes at a time would
        # leave the target to the zero-window probes' backoff)
        stalled.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 * MiB)
        status, data, _ = stalled.read_response()
        assert status == 0
        mixed = [
            b for b in range(READ_BYTES // BLOCK)
            if data[b * BLOCK : (b + 1) * BLOCK] != first_data[b * BLOCK : (b + 1) * BLOCK]
        ]  # fmt: skip
        assert not mixed, f"the stalled READ received other bytes in blocks {mixed}"
    finally:
        stalled.close()


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("lun_form", ["mem", "mmap"])
@pytest.mark.parametrize("digests", ["None", "CRC32C"])
def test_write_never_changes_a_read_in_flight(
    target_factory, zc_backend: str, tmp_path: Path, lun_form: str, digests: str
):
    """A READ of a LUN whose memory the target can send as is (``mem:``, a mapped image) stays
    queued at a stalled reader while a WRITE to the same blocks lands (another session reads
    the new bytes back); the READ must then arrive with the old bytes, under their own data
    digest (MiniInitiator checks every digest)."""
    if lun_form == "mem":
        lun = "mem:1M"
        old_blocks = bytes(READ_BYTES)
    else:
        image = tmp_path / "disk.img"
        old_blocks = make_image(image, 1 * MiB, seed=23)[:READ_BYTES]
        lun = f"{image}:mmap"
    t = target_factory("--backend", zc_backend, "--zerocopy-probe", "off", "--lun", lun)
    new_blocks = random.Random(25).randbytes(4096)
    keys = {"MaxRecvDataSegmentLength": str(READ_BYTES), "HeaderDigest": digests,
            "DataDigest": digests}  # fmt: skip
    writer = MiniInitiator(t.port)
    writer.mrdsl = READ_BYTES
    writer.login(t.iqn, {"InitiatorName": "iqn.2024-01.org.zerosend:writer", **keys})
    stalled = stalled_initiator(t.port)
    try:
        stalled.login(t.iqn, keys)
        stalled.scsi(read10(0, READ_BYTES // BLOCK), READ_BYTES, read=True)
        wait_for(lambda: queued_for_reading(stalled.sock) > 0, "the READ to be sent")
        at = 8 * 1024
        assert write(writer, at // BLOCK, new_blocks) == 0
        writer.scsi(read10(at // BLOCK, len(new_blocks) // BLOCK), len(new_blocks), read=True)
        status, back, _ = writer.read_response()
        assert status == 0 and back == new_blocks  # the WRITE landed while the READ waits
        stalled.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 * MiB)
        status, data, _ = stalled.read_response()
        assert status == 0
        changed = [
            b
            for b in range(READ_BYTES // BLOCK)
            if data[b * BLOCK : (b + 1) * BLOCK] != old_blocks[b * BLOCK : (b + 1) * BLOCK]
        ]
        assert not changed, f"blocks the later WRITE changed in flight: {changed}"
    finally:
        stalled.close()
        writer.close()


def write(ini: MiniInitiator, lba: int, data: bytes) -> int:
    """A WRITE(10) with all its data as immediate data; its SCSI status."""
    ini.scsi(write10(lba, len(data) // BLOCK), len(data), write=True, data=data)
    status, _, _ = ini.read_response()
    return status


# ---------------------------------------------------------------- a device that blocks


@pytest.fixture
def gated(tmp_path: Path):
    """A FUSE file whose reads wait at a gate (root only). Ask for it before ``target_factory``:
    the target must close the file before the file system goes."""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse")
    try:
        fs = GatedFile(tmp_path / "gated", random.Random(26).randbytes(1 * MiB))
    except OSError as e:  # e.g. a container without the right to mount
        pytest.skip(str(e))
    try:
        yield fs
    finally:
        fs.unmount()


def dump_state(t) -> str:
    """The target's state line of transmit buffers, fresh from SIGUSR1."""
    before = t.log().count("transmit buffers free")
    t.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: t.log().count("transmit buffers free") > before, "the state dump")
    return re.findall(r"(\d+/\d+) transmit buffers free", t.log())[-1]


@pytest.mark.timeout(90)
def test_a_blocked_device_stops_only_its_own_reads(gated, target_factory, tmp_path: Path):
    """A READ stuck in its device (a FUSE file whose reads wait at a gate) is read by a thread:
    another session logs in and reads another LUN meanwhile; ABORT TASK of the stuck READ
    leaves its buffer with the thread until the device answers (the thread still writes into
    it); then the LUN serves READs again."""
    plain = tmp_path / "plain.img"
    plain_data = make_image(plain, 1 * MiB, seed=27)
    t = target_factory("--buffers", "2", "--lun", f"{gated.path}:ro", "--lun", str(plain))
    stuck = MiniInitiator(t.port)
    other = None
    try:
        stuck.mrdsl = READ_BYTES
        stuck.login(t.iqn, {"MaxRecvDataSegmentLength": str(READ_BYTES)})
        gated.close_gate()
        stuck.scsi(read10(0, READ_BYTES // BLOCK), READ_BYTES, read=True)
        wait_for(lambda: gated.waiting > 0, "the READ to wait in the device")

        other = MiniInitiator(t.port)
        other.login(t.iqn, {"InitiatorName": "iqn.2024-01.org.zerosend:other"})
        for at in (0, 5 * READ_BYTES):
            other.scsi(read10(at // BLOCK, 8), 8 * BLOCK, read=True, lun=1)
            status, data, _ = other.read_response()
            assert status == 0 and data == plain_data[at : at + 8 * BLOCK]

        # The stuck READ's buffer stays with it, before and after ABORT TASK
        assert dump_state(t) == "1/2"
        assert task_management(stuck, ABORT_TASK, stuck.itt, stuck.cmdsn - 1) == 0
        assert dump_state(t) == "1/2"
        gated.open_gate()
        wait_for(lambda: dump_state(t) == "2/2", "the buffer back once the device answered")

        # The device answers again: a new READ of it arrives whole
        stuck.scsi(read10(8, READ_BYTES // BLOCK), READ_BYTES, read=True)
        status, data, _ = stuck.read_response()
        assert status == 0 and data == gated.data[8 * BLOCK : 8 * BLOCK + READ_BYTES]
    finally:
        gated.open_gate()
        stuck.close()
        if other is not None:
            other.close()
