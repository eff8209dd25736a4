"""A device that blocks stops only the commands of its own LUN.

The LUN's image lies on a FUSE file system whose reads, writes and fsyncs wait at a gate
(``gatedfs``): a real device that does not answer. While a command of that LUN waits there,
another session must log in and read and write another LUN; once the gate opens, the stuck
command completes with the right data on the medium. An aborted write that is already in the
device's hands cannot be called back: the abort is answered only once it landed, so it cannot
land over what the initiator writes next.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from gatedfs import GatedFile
from iscsi_helpers import (
    MiniInitiator,
    make_image,
    need,
    read10,
    send_task_management,
    task_management,
    wait_for,
    write10,
)

from tests.helpers import require, require_probed

MiB = 1 << 20
BLOCK = 512
READ_BYTES = 64 * 1024  # one Data-In PDU (MaxRecvDataSegmentLength below)
WRITE_BYTES = 32 * 1024  # all of it immediate data (within FirstBurstLength)
ABORT_TASK, LOGICAL_UNIT_RESET = 1, 5
OTHER = "iqn.2024-01.org.zerosend:other"


@contextlib.contextmanager
def mounted_gate(tmp_path: Path, data: bytes) -> Iterator[GatedFile]:
    """A FUSE file holding ``data`` whose I/O waits at a gate (root only), unmounted after."""
    require_probed("fuse")
    try:
        fs = GatedFile(tmp_path / "gated", data)
    except OSError as e:  # e.g. a container without the right to mount
        require("fuse", f"cannot mount: {e}")
    try:
        yield fs
    finally:
        fs.unmount()


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[GatedFile]:
    """The gated file, 1 MiB. Ask for it before ``target_factory``: the target must close the
    file before the file system goes."""
    with mounted_gate(tmp_path, random.Random(26).randbytes(1 * MiB)) as fs:
        yield fs


def dump_state(t) -> str:
    """The target's state line of transmit buffers, fresh from SIGUSR1."""
    before = t.log().count("transmit buffers free")
    t.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: t.log().count("transmit buffers free") > before, "the state dump")
    return re.findall(r"(\d+/\d+) transmit buffers free", t.log())[-1]


def nothing_arrives(ini: MiniInitiator, seconds: float = 1.0) -> bool:
    """No PDU reaches ``ini`` within ``seconds`` (the gate holds what would send one)."""
    ini.sock.settimeout(seconds)
    try:
        return not ini.sock.recv(1, socket.MSG_PEEK)
    except TimeoutError:
        return True
    finally:
        ini.sock.settimeout(10)


def other_lun_serves(port: int, iqn: str, plain_data: bytes) -> None:
    """A second session reads and writes LUN 1 (an ordinary file) and gets the right data."""
    other = MiniInitiator(port)
    try:
        other.login(iqn, {"InitiatorName": OTHER})
        for at in (0, 5 * READ_BYTES):
            other.scsi(read10(at // BLOCK, 8), 8 * BLOCK, read=True, lun=1)
            status, data, _ = other.read_response()
            assert status == 0 and data == plain_data[at : at + 8 * BLOCK]
        new = os.urandom(WRITE_BYTES)
        other.scsi(write10(16, WRITE_BYTES // BLOCK), WRITE_BYTES, write=True, data=new, lun=1)
        assert other.read_response()[0] == 0
        other.scsi(read10(16, WRITE_BYTES // BLOCK), WRITE_BYTES, read=True, lun=1)
        status, data, _ = other.read_response()
        assert status == 0 and data == new
    finally:
        other.close()


def stuck_read(t, fs: GatedFile, lba: int) -> MiniInitiator:
    """A session whose READ of LUN 0 at ``lba`` waits in the gated device (the gate closed)."""
    stuck = MiniInitiator(t.port)
    stuck.mrdsl = READ_BYTES
    stuck.login(t.iqn, {"MaxRecvDataSegmentLength": str(READ_BYTES)})
    fs.close_gate()
    stuck.scsi(read10(lba, READ_BYTES // BLOCK), READ_BYTES, read=True)
    wait_for(lambda: fs.waiting > 0, "the READ to wait in the device")
    return stuck


def start(target_factory, tmp_path: Path, *luns: str):
    plain = tmp_path / "plain.img"
    plain_data = make_image(plain, 1 * MiB, seed=27)
    t = target_factory("--buffers", "2", *(a for lun in luns for a in ("--lun", lun)),
                       "--lun", str(plain))  # fmt: skip
    return t, plain_data


@pytest.mark.timeout(90)
def test_a_blocked_device_stops_only_its_own_reads(gated, target_factory, tmp_path: Path):
    """A READ stuck in its device is read by a thread: another session logs in and reads
    another LUN meanwhile; ABORT TASK of the stuck READ leaves its buffer with the thread until
    the device answers (the thread still writes into it); then the LUN serves READs again."""
    t, plain_data = start(target_factory, tmp_path, f"{gated.path}:ro")
    stuck = stuck_read(t, gated, 0)
    try:
        other_lun_serves(t.port, t.iqn, plain_data)

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


@pytest.mark.timeout(90)
@pytest.mark.parametrize("fua", [False, True], ids=["write", "write FUA"])
def test_a_blocked_device_stops_only_its_own_writes(gated, target_factory, tmp_path, fua):
    """A WRITE whose data waits in the device (and, with FUA, its sync) holds up no other
    session; its status comes once the device took the data, which is then on the medium."""
    t, plain_data = start(target_factory, tmp_path, str(gated.path))
    stuck = MiniInitiator(t.port)
    try:
        stuck.login(t.iqn)
        new = os.urandom(WRITE_BYTES)
        gated.close_gate()
        stuck.scsi(write10(64, WRITE_BYTES // BLOCK, fua=fua), WRITE_BYTES, write=True, data=new)
        wait_for(lambda: gated.waiting > 0, "the WRITE to wait in the device")

        other_lun_serves(t.port, t.iqn, plain_data)
        assert nothing_arrives(stuck), "a WRITE answered before its data reached the device"

        syncs = gated.syncs
        gated.open_gate()
        assert stuck.read_response()[0] == 0
        assert gated.data[64 * BLOCK : 64 * BLOCK + WRITE_BYTES] == new
        if fua:  # synced before the status
            assert gated.syncs > syncs
    finally:
        gated.open_gate()
        stuck.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("opcode", [0x35, 0x91], ids=["SYNCHRONIZE CACHE(10)", "(16)"])
def test_a_sync_waiting_for_the_device_stops_no_one_else(gated, target_factory, tmp_path, opcode):
    """SYNCHRONIZE CACHE waits for the device's fsync in a thread; its GOOD comes after it."""
    t, plain_data = start(target_factory, tmp_path, str(gated.path))
    stuck = MiniInitiator(t.port)
    try:
        stuck.login(t.iqn)
        stuck.scsi(write10(0, 8), 8 * BLOCK, write=True, data=os.urandom(8 * BLOCK))
        assert stuck.read_response()[0] == 0
        gated.close_gate()
        cdb = bytes((0x35,)) + bytes(9) if opcode == 0x35 else bytes((0x91,)) + bytes(15)
        stuck.scsi(cdb, 0)
        wait_for(lambda: gated.waiting > 0, "the fsync to wait in the device")

        other_lun_serves(t.port, t.iqn, plain_data)
        assert nothing_arrives(stuck), "SYNCHRONIZE CACHE answered before the device synced"

        syncs = gated.syncs
        gated.open_gate()
        assert stuck.read_response()[0] == 0
        assert gated.syncs > syncs
    finally:
        gated.open_gate()
        stuck.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("function", [ABORT_TASK, LOGICAL_UNIT_RESET])
def test_an_abort_is_answered_once_the_aborted_write_landed(
    gated, target_factory, tmp_path, function
):
    """The device has the aborted WRITE's data: the abort's response waits until it landed
    (after it, nothing of the WRITE may change the medium), and the WRITE gets no status."""
    t, _ = start(target_factory, tmp_path, str(gated.path))
    stuck = MiniInitiator(t.port)
    try:
        stuck.login(t.iqn)
        old = os.urandom(WRITE_BYTES)
        stuck.scsi(write10(128, WRITE_BYTES // BLOCK), WRITE_BYTES, write=True, data=old)
        assert stuck.read_response()[0] == 0
        gated.close_gate()
        itt = stuck.scsi(write10(128, WRITE_BYTES // BLOCK), WRITE_BYTES, write=True,
                         data=os.urandom(WRITE_BYTES))  # fmt: skip
        wait_for(lambda: gated.waiting > 0, "the WRITE to wait in the device")
        send_task_management(stuck, function, itt, stuck.cmdsn - 1)
        assert nothing_arrives(stuck), "the abort was answered while its WRITE could still land"

        gated.open_gate()
        rsp, _ = stuck.recv()
        assert rsp[0] & 0x3F == 0x22 and rsp[2] == 0, rsp.hex()  # the TMF response: complete
        # What the initiator writes after the abort stays
        after = os.urandom(WRITE_BYTES)
        stuck.scsi(write10(128, WRITE_BYTES // BLOCK), WRITE_BYTES, write=True, data=after)
        status, _, sense = stuck.read_response()  # (a status of the aborted WRITE fails here)
        if function == LOGICAL_UNIT_RESET:  # first the reset's unit attention
            assert status == 2 and sense[2] & 0x0F == 0x06, (status, sense.hex())
            stuck.scsi(write10(128, WRITE_BYTES // BLOCK), WRITE_BYTES, write=True, data=after)
            status, _, sense = stuck.read_response()
        assert status == 0, (status, sense.hex())
        assert gated.data[128 * BLOCK : 128 * BLOCK + WRITE_BYTES] == after
    finally:
        gated.open_gate()
        stuck.close()


@pytest.mark.timeout(90)
def test_a_blocked_qcow2_image_stops_only_its_own_reads(target_factory, tmp_path: Path):
    """A qcow2 image's clusters are looked up and read (inflated, if compressed) in a thread:
    its device stuck, other LUNs are served; then the READ completes with the image's data."""
    qemu_img = need("qemu-img")
    raw = tmp_path / "source.img"
    source = make_image(raw, 1 * MiB, seed=28)
    image = tmp_path / "image.qcow2"
    subprocess.run([qemu_img, "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(image)],
                   check=True, capture_output=True)  # fmt: skip
    with mounted_gate(tmp_path, image.read_bytes()) as fs:
        t, plain_data = start(target_factory, tmp_path, str(fs.path))
        stuck = stuck_read(t, fs, 256)
        try:
            other_lun_serves(t.port, t.iqn, plain_data)
            assert nothing_arrives(stuck)
            fs.open_gate()
            status, data, _ = stuck.read_response()
            assert status == 0 and data == source[256 * BLOCK : 256 * BLOCK + READ_BYTES]
        finally:
            fs.open_gate()
            stuck.close()
            t.stop()  # before the file system goes


@pytest.mark.timeout(90)
def test_a_reinstating_login_waits_for_the_old_sessions_write(gated, target_factory, tmp_path):
    """The initiator reconnects (same name and ISID) while its old session's WRITE is in the
    device: the new session is up only once that WRITE landed, so the WRITE the initiator then
    retries or sends anew is the one that stays on the medium."""
    t, _ = start(target_factory, tmp_path, str(gated.path))
    old_session = MiniInitiator(t.port)
    new_session = MiniInitiator(t.port)
    try:
        old_session.login(t.iqn)
        gated.close_gate()
        old_session.scsi(write10(192, WRITE_BYTES // BLOCK), WRITE_BYTES, write=True,
                         data=os.urandom(WRITE_BYTES))  # fmt: skip
        wait_for(lambda: gated.waiting > 0, "the WRITE to wait in the device")

        login = threading.Thread(target=new_session.login, args=(t.iqn,), daemon=True)
        login.start()
        login.join(1.0)
        assert login.is_alive(), "the new session was up while the old one's WRITE could land"
        gated.open_gate()
        login.join(20)
        assert not login.is_alive()
        retried = os.urandom(WRITE_BYTES)
        new_session.scsi(write10(192, WRITE_BYTES // BLOCK), WRITE_BYTES, write=True,
                         data=retried)  # fmt: skip
        assert new_session.read_response()[0] == 0
        assert gated.data[192 * BLOCK : 192 * BLOCK + WRITE_BYTES] == retried
    finally:
        gated.open_gate()
        old_session.close()
        new_session.close()


def test_a_held_up_write_sends_the_images_writes_to_threads(gated, tmp_path: Path):
    """Writes to an image on a local file system go to the page cache on the event loop until
    one is held up by the kernel; then to the threads for a while, and back once it passed.
    An image on FUSE (or NFS, ...) is written by the threads from the start."""
    from zerosend.iscsi.storage.file import WRITE_STALL, FileStore

    make_image(tmp_path / "local.img", 1 * MiB)
    local, remote = FileStore(str(tmp_path / "local.img")), FileStore(str(gated.path))
    try:
        assert local.writes_on_loop() and not remote.writes_on_loop()
        local.wrote_on_loop(WRITE_STALL / 10)
        assert local.writes_on_loop()
        local.wrote_on_loop(WRITE_STALL * 2)
        assert not local.writes_on_loop()
        wait_for(local.writes_on_loop, "writes back on the event loop after the pause")
    finally:
        local.close()
        remote.close()
