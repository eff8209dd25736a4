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

import random
import socket
import struct
from pathlib import Path

import pytest
from iscsi_helpers import MiniInitiator, make_image, read10, task_management, wait_for, write10

MiB = 1 << 20
BLOCK = 512
READ_BYTES = 64 * 1024  # one Data-In PDU (MaxRecvDataSegmentLength below): a zero-copy send
ABORT_TASK, TARGET_COLD_RESET = 1, 7


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


def queued_for_reading(sock: socket.socket) -> int:
    """Bytes in ``sock``'s receive queue (FIONREAD)."""
    import fcntl
    import termios

    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


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
