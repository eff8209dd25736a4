"""GET LBA STATUS asks the file system where the image's data lies (``lseek`` SEEK_DATA /
SEEK_HOLE), which may wait for the device. The walk runs in the LUN's disk threads and the
command completes later, as a task in progress: while the device holds the ``lseek``, every
other session (and the same one) is served; ABORT TASK or LOGICAL UNIT RESET of the held
command is answered at once (the task is aborted, it changes nothing on the medium) and no data
of it follows, even once the device answers.

The image lies on the FUSE file system whose I/O, lseek included, waits at a gate
(``gatedfs``).
"""

from __future__ import annotations

import random
import re
import signal
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from gatedfs import GatedFile
from iscsi_helpers import MiniInitiator, send_task_management, wait_for
from test_iscsi_diskio import mounted_gate, other_lun_serves, start

MiB = 1 << 20
BLOCK = 512
ABORT_TASK, LOGICAL_UNIT_RESET = 1, 5
ALLOC = 1024


@pytest.fixture
def gated_image(tmp_path: Path) -> Iterator[GatedFile]:
    """The gated file, 1 MiB (before ``target_factory``: the target closes it first)."""
    with mounted_gate(tmp_path, random.Random(41).randbytes(1 * MiB)) as fs:
        yield fs


def get_lba_status(lba: int = 0, alloc: int = ALLOC) -> bytes:
    return struct.pack(">BBQIxx", 0x9E, 0x12, lba, alloc)


def extents(data: bytes) -> list[tuple[int, int, int]]:
    """(first LBA, blocks, provisioning status) of GET LBA STATUS's descriptors."""
    (length,) = struct.unpack_from(">I", data)
    return [struct.unpack_from(">QIB", data, at) for at in range(8, 4 + length, 16)]


def held_get_lba_status(t, fs: GatedFile) -> tuple[MiniInitiator, int]:
    """A session whose GET LBA STATUS of LUN 0 waits in the device's lseek (the gate closed)."""
    stuck = MiniInitiator(t.port)
    stuck.login(t.iqn)
    fs.close_gate()
    seeks = fs.seeks
    itt = stuck.scsi(get_lba_status(), ALLOC, read=True)
    wait_for(lambda: fs.seeks > seeks and fs.waiting > 0, "the lseek to wait in the device")
    return stuck, itt


def reads_in_progress(t) -> int:
    """The READ-path tasks in progress over all connections, from a fresh state dump
    (SIGUSR1): a command whose data comes later counts there, in the CmdSN window."""
    before = t.log().count("state: LUN 0 ")
    t.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: t.log().count("state: LUN 0 ") > before, "the state dump")
    dump = t.log().rsplit("transmit buffers free", 1)[1]
    return sum(int(n) for n in re.findall(r" reads=(\d+)", dump))


def answer_to(ini: MiniInitiator, itt: int) -> tuple[int, bytes, bytes]:
    """Like ``read_response``, but every PDU that comes must belong to ``itt``."""
    data = bytearray()
    while True:
        bhs, seg = ini.recv()
        op = bhs[0] & 0x3F
        assert int.from_bytes(bhs[16:20], "big") == itt, f"a PDU {op:#x} of another task came"
        if op == 0x25:
            offset = int.from_bytes(bhs[40:44], "big")
            data[offset : offset + len(seg)] = seg
            if bhs[1] & 0x01:
                return bhs[3], bytes(data), b""
        else:
            assert op == 0x21, f"unexpected PDU opcode {op:#x}"
            return bhs[3], bytes(data), seg[2:] if seg else b""


@pytest.mark.timeout(90)
def test_a_get_lba_status_held_in_the_device_stops_no_one_else(
    gated_image, target_factory, tmp_path: Path
):
    """While the device holds GET LBA STATUS's lseek, another session logs in, reads and writes
    another LUN, and the same session's own commands are answered; once the device answers,
    the held command completes with the image's extents (all of it data)."""
    t, plain_data = start(target_factory, tmp_path, str(gated_image.path))
    stuck, itt = held_get_lba_status(t, gated_image)
    try:
        other_lun_serves(t.port, t.iqn, plain_data)
        stuck.nop()  # (the held command's data would come first if it were not held)
        tur = stuck.scsi(bytes(6), 0, lun=1)
        assert answer_to(stuck, tur)[0] == 0
        assert reads_in_progress(t) == 1  # the held command is a task

        # Its ITT is in use: a command that reuses it is rejected (RFC 7143 11.17.1)
        stuck.itt = itt - 1
        stuck.scsi(bytes(6), 0)
        bhs, _ = stuck.recv()
        assert bhs[0] & 0x3F == 0x3F and bhs[2] == 0x07, bhs.hex()  # Reject: task in progress

        gated_image.open_gate()
        status, data, sense = answer_to(stuck, itt)
        assert status == 0, sense.hex()
        assert extents(data) == [(0, MiB // BLOCK, 0)]
    finally:
        gated_image.open_gate()
        stuck.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("function", [ABORT_TASK, LOGICAL_UNIT_RESET])
def test_an_abort_of_a_held_get_lba_status_is_answered_and_no_data_follows(
    gated_image, target_factory, tmp_path: Path, function: int
):
    """ABORT TASK / LOGICAL UNIT RESET of a GET LBA STATUS whose lseek the device holds: the
    task is aborted at once (it changes no medium, nothing has to land), so the function is
    answered while the device still holds the lseek; when the device answers, nothing of the
    aborted command reaches the initiator, and the LUN answers GET LBA STATUS again."""
    t, _ = start(target_factory, tmp_path, str(gated_image.path))
    stuck, itt = held_get_lba_status(t, gated_image)
    try:
        send_task_management(stuck, function, itt, stuck.cmdsn - 1)
        rsp, _ = stuck.recv()  # (a target that waits for the device times out here)
        assert rsp[0] & 0x3F == 0x22 and rsp[2] == 0, rsp.hex()  # the TMF response: complete
        assert gated_image.waiting > 0, "the device was to hold the lseek until now"
        wait_for(lambda: reads_in_progress(t) == 0, "the aborted task to leave the task table")

        gated_image.open_gate()
        wait_for(lambda: gated_image.waiting == 0, "the device to answer the lseek")
        again = stuck.scsi(get_lba_status(), ALLOC, read=True)
        status, data, sense = answer_to(stuck, again)  # fails on a PDU of the aborted task
        if function == LOGICAL_UNIT_RESET:  # first the reset's unit attention
            assert status == 2 and sense[2] & 0x0F == 0x06, (status, sense.hex())
            again = stuck.scsi(get_lba_status(), ALLOC, read=True)
            status, data, sense = answer_to(stuck, again)
        assert status == 0, sense.hex()
        assert extents(data) == [(0, MiB // BLOCK, 0)]
        stuck.nop()
    finally:
        gated_image.open_gate()
        stuck.close()


@pytest.mark.timeout(90)
def test_a_session_ended_while_its_get_lba_status_is_held_goes_cleanly(
    gated_image, target_factory, tmp_path: Path
):
    """The initiator drops the connection while the device holds its GET LBA STATUS: the
    session ends at once (its task is aborted, nothing waits for the device), and once the
    device answers, the LUN answers the next session's GET LBA STATUS; the target stops
    without a traceback (``target_factory``)."""
    t, _ = start(target_factory, tmp_path, str(gated_image.path))
    stuck, _ = held_get_lba_status(t, gated_image)
    stuck.close()
    try:
        wait_for(lambda: "connection closed by initiator" in t.log(), "the session to end")
        assert gated_image.waiting > 0, "the device was to hold the lseek until now"
        wait_for(lambda: reads_in_progress(t) == 0, "the aborted task to leave the task table")
    finally:
        gated_image.open_gate()
    wait_for(lambda: gated_image.waiting == 0, "the device to answer the lseek")
    after = MiniInitiator(t.port)
    try:
        after.login(t.iqn)
        status, data, sense = answer_to(after, after.scsi(get_lba_status(), ALLOC, read=True))
        assert status == 0, sense.hex()
        assert extents(data) == [(0, MiB // BLOCK, 0)]
    finally:
        after.close()
