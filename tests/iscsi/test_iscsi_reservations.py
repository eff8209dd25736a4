"""Reservations across real sessions: two initiators (raw PDUs) on one LUN, persistent
reservations of every type, PREEMPT AND ABORT, RESERVE/RELEASE, and the APTPL state file
across a restart of the target process."""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from iscsi_helpers import IQN, MiniInitiator, RunningTarget, make_image

from zerosend.iscsi.scsi.nexus import Nexus
from zerosend.iscsi.scsi.reservations import Reservations
from zerosend.iscsi.scsi.sense import HARDWARE_ERROR, CheckCondition, StatusReply
from zerosend.iscsi.scsi.unit import LogicalUnit
from zerosend.iscsi.service.config import load_config
from zerosend.iscsi.storage.opening import open_store

NODE_A = "iqn.2024-01.org.zerosend:node-a"
NODE_B = "iqn.2024-01.org.zerosend:node-b"
KEY_A, KEY_B = 0xAAAA0001, 0xBBBB0002
GOOD, CHECK_CONDITION, RESERVATION_CONFLICT = 0x00, 0x02, 0x18
WE, EA, WE_RO, EA_RO, WE_AR, EA_AR = 1, 3, 5, 6, 7, 8
REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_AND_ABORT = 0, 1, 2, 3, 4, 5
REGISTER_AND_IGNORE, REGISTER_AND_MOVE = 6, 7
READ_KEYS, READ_RESERVATION, REPORT_CAPABILITIES, READ_FULL_STATUS = 0, 1, 2, 3
BLOCK = 512


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "shared.img"
    return path, make_image(path, 1 << 20)


def login(port: int, name: str, isid: bytes = b"\x80\x00\x00\x01\x02\x03") -> MiniInitiator:
    ini = MiniInitiator(port)
    ini.isid = isid
    ini.login(IQN, {"InitiatorName": name})
    return ini


def response(ini: MiniInitiator) -> tuple[int, int, bytes, bytes]:
    """The next command's end: (ITT, status, data, sense)."""
    data = bytearray()
    while True:
        bhs, seg = ini.recv()
        op = bhs[0] & 0x3F
        itt = int.from_bytes(bhs[16:20], "big")
        if op == 0x25:
            data += seg
            if bhs[1] & 0x01:
                return itt, bhs[3], bytes(data), b""
        elif op == 0x21:
            return itt, bhs[3], bytes(data), seg[2:] if seg else b""
        else:
            raise AssertionError(f"unexpected PDU opcode {op:#x}")


def command(ini: MiniInitiator, cdb: bytes, edtl: int = 0, data: bytes = b"", **kw: bool):
    """(status, data, sense) of one command."""
    ini.scsi(cdb, edtl, data=data, **kw)
    _, status, got, sense = response(ini)
    return status, got, sense


def sense_code(sense: bytes) -> tuple[int, int, int]:
    return sense[2] & 0x0F, sense[12], sense[13]


def prout(ini: MiniInitiator, action: int, key: int = 0, service_key: int = 0,
          kind: int = 0, aptpl: bool = False, tail: bytes = b"", flags: int = 0):  # fmt: skip
    params = struct.pack(">QQ4xB3x", key, service_key, flags | (0x01 if aptpl else 0)) + tail
    cdb = struct.pack(">BBB2xIB", 0x5F, action, kind, len(params), 0)
    return command(ini, cdb, len(params), params, write=True)


def prin(ini: MiniInitiator, action: int, alloc: int = 8192) -> bytes:
    status, data, sense = command(ini, struct.pack(">BB5xHB", 0x5E, action, alloc, 0), alloc,
                                  read=True)  # fmt: skip
    assert status == GOOD, sense.hex()
    return data


def read_keys(ini: MiniInitiator) -> tuple[int, list[int]]:
    data = prin(ini, READ_KEYS)
    generation, length = struct.unpack_from(">II", data)
    return generation, [k for (k,) in struct.iter_unpack(">Q", data[8 : 8 + length])]


def read_reservation(ini: MiniInitiator) -> tuple[int, int] | None:
    """(key, type) of the persistent reservation, or None."""
    data = prin(ini, READ_RESERVATION)
    if struct.unpack_from(">I", data, 4)[0] == 0:
        return None
    return struct.unpack_from(">Q", data, 8)[0], data[21] & 0x0F


def read_block(ini: MiniInitiator, lba: int) -> tuple[int, bytes]:
    status, data, _ = command(ini, struct.pack(">BBIBHB", 0x28, 0, lba, 0, 1, 0), BLOCK,
                              read=True)  # fmt: skip
    return status, data


def write_cdb(lba: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, 1, 0)


def write_block(ini: MiniInitiator, lba: int, data: bytes) -> int:
    return command(ini, write_cdb(lba), BLOCK, data, write=True)[0]


TUR = bytes(6)


def wait_for_log(t: RunningTarget, text: str) -> None:
    """Wait (up to a minute) for the target to log ``text``: what the target does after a
    connection closes happens after the initiator's close returns."""
    deadline = time.monotonic() + 60
    while text not in t.log():
        assert time.monotonic() < deadline, f"the target never logged {text!r}:\n{t.log()}"
        time.sleep(0.02)


# Per type: (registered B may read, may write, unregistered B may read, may write), per SPC-4
ACCESS = {
    WE: (True, False, True, False),
    EA: (False, False, False, False),
    WE_RO: (True, True, True, False),
    EA_RO: (True, True, False, False),
    WE_AR: (True, True, True, False),
    EA_AR: (True, True, False, False),
}


@pytest.mark.parametrize("kind", ACCESS)
def test_reservation_of_one_initiator_decides_what_another_may_read_and_write(
    target_factory, image, kind
):
    """A registers and reserves; B's READs and WRITEs (plain ones, which the READ fast path
    serves) get RESERVATION CONFLICT exactly where the type excludes B, registered or not."""
    path, original = image
    t = target_factory("--lun", str(path))
    a, b = login(t.port, NODE_A), login(t.port, NODE_B)
    assert prout(a, REGISTER, 0, KEY_A)[0] == GOOD
    assert prout(a, RESERVE, KEY_A, kind=kind)[0] == GOOD
    assert read_reservation(b) == ((0 if kind in (WE_AR, EA_AR) else KEY_A), kind)
    new = b"B" * BLOCK
    # B unregistered, then registered
    reg_read, reg_write, unreg_read, unreg_write = ACCESS[kind]
    for may_read, may_write, lba in ((unreg_read, unreg_write, 3), (reg_read, reg_write, 4)):
        status, data = read_block(b, lba)
        assert status == (GOOD if may_read else RESERVATION_CONFLICT)
        if may_read:
            assert data == original[lba * BLOCK : (lba + 1) * BLOCK]
        assert write_block(b, lba, new) == (GOOD if may_write else RESERVATION_CONFLICT)
        assert command(b, TUR)[0] == GOOD  # allowed under every type
        if lba == 3:
            assert prout(b, REGISTER, 0, KEY_B)[0] == GOOD
    # the holder reads and writes
    assert write_block(a, 5, new) == GOOD
    assert read_block(a, 5) == (GOOD, new)
    image_now = path.read_bytes()
    assert image_now[3 * BLOCK : 4 * BLOCK] == (
        new if unreg_write else original[3 * BLOCK : 4 * BLOCK]
    )
    assert image_now[4 * BLOCK : 5 * BLOCK] == (
        new if reg_write else original[4 * BLOCK : 5 * BLOCK]
    )
    a.close()
    b.close()


@pytest.mark.parametrize("abort", [True, False], ids=["preempt-and-abort", "preempt"])
def test_preempt_and_abort_aborts_the_preempted_initiators_queued_write(
    target_factory, image, abort
):
    """B holds the reservation and has a WRITE waiting for its data (R2T sent); A preempts B.
    PREEMPT AND ABORT aborts the write (its data is dropped, no status comes; B's next command
    reports REGISTRATIONS PREEMPTED); plain PREEMPT lets it finish."""
    path, original = image
    t = target_factory("--lun", str(path))
    a, b = login(t.port, NODE_A), login(t.port, NODE_B)
    assert prout(a, REGISTER, 0, KEY_A)[0] == GOOD
    assert prout(b, REGISTER, 0, KEY_B)[0] == GOOD
    assert prout(b, RESERVE, KEY_B, kind=WE)[0] == GOOD
    write_itt = b.scsi(write_cdb(7), BLOCK, write=True)  # InitialR2T=Yes: the target asks
    r2t, _ = b.recv()
    assert r2t[0] & 0x3F == 0x31
    generation = read_keys(a)[0]
    action = PREEMPT_AND_ABORT if abort else PREEMPT
    assert prout(a, action, KEY_A, KEY_B, kind=EA)[0] == GOOD
    b.data_out(write_itt, int.from_bytes(r2t[20:24], "big"), 0, 0, b"W" * BLOCK, True)
    tur_itt = b.scsi(TUR, 0)
    itt, status, _, sense = response(b)
    if abort:
        assert (itt, status) == (tur_itt, CHECK_CONDITION)  # the write never answers
        assert sense_code(sense) == (0x6, 0x2A, 0x05)  # UNIT ATTENTION, REGISTRATIONS PREEMPTED
        assert path.read_bytes()[7 * BLOCK : 8 * BLOCK] == original[7 * BLOCK : 8 * BLOCK]
    else:
        assert (itt, status) == (write_itt, GOOD)
        itt, status, _, sense = response(b)
        assert (itt, status) == (tur_itt, CHECK_CONDITION)
        assert path.read_bytes()[7 * BLOCK : 8 * BLOCK] == b"W" * BLOCK
    assert read_keys(a) == (generation + 1, [KEY_A])
    assert read_reservation(a) == (KEY_A, EA)
    assert read_block(b, 7)[0] == RESERVATION_CONFLICT  # B is no longer registered: EA
    a.close()
    b.close()


def test_a_new_isid_is_a_new_nexus_and_the_same_isid_the_same_one(target_factory, image):
    """Registrations belong to the I_T nexus (initiator name and ISID): after A's connection
    ends, A logging in again with its ISID still holds the reservation; the same initiator
    with another ISID is an unregistered nexus."""
    path, _ = image
    t = target_factory("--lun", str(path))
    a = login(t.port, NODE_A)
    assert prout(a, REGISTER, 0, KEY_A)[0] == GOOD
    assert prout(a, RESERVE, KEY_A, kind=EA_RO)[0] == GOOD
    a.close()
    again = login(t.port, NODE_A)
    assert read_block(again, 1)[0] == GOOD
    assert write_block(again, 1, b"a" * BLOCK) == GOOD
    other_port = login(t.port, NODE_A, isid=b"\x80\x00\x00\x01\x02\x04")
    assert read_block(other_port, 1)[0] == RESERVATION_CONFLICT
    assert prout(other_port, REGISTER, KEY_A, KEY_A)[0] == RESERVATION_CONFLICT  # not its key
    assert prout(other_port, REGISTER_AND_IGNORE, 0, KEY_B)[0] == GOOD
    assert read_block(other_port, 1)[0] == GOOD  # registrants only: now a registrant
    assert read_keys(other_port)[1] == [KEY_A, KEY_B]
    again.close()
    other_port.close()


def test_register_and_move_hands_the_reservation_to_the_nexus_named(target_factory, image):
    path, _ = image
    t = target_factory("--lun", str(path))
    a, b = login(t.port, NODE_A), login(t.port, NODE_B, isid=b"\x80\x12\x34\x56\x78\x9a")
    assert prout(a, REGISTER, 0, KEY_A)[0] == GOOD
    assert prout(a, RESERVE, KEY_A, kind=WE)[0] == GOOD
    name = f"{NODE_B},i,0x80123456789a".encode() + b"\0"
    name += b"\0" * (-len(name) % 4)
    tid = bytes((0x45, 0)) + struct.pack(">H", len(name)) + name
    tail = struct.pack(">HI", 1, len(tid)) + tid
    params = struct.pack(">QQxB", KEY_A, KEY_B, 0x02) + tail  # UNREG: A leaves
    cdb = struct.pack(">BBB2xIB", 0x5F, REGISTER_AND_MOVE, WE, len(params), 0)
    assert command(a, cdb, len(params), params, write=True)[0] == GOOD
    assert read_reservation(a) == (KEY_B, WE)
    assert write_block(b, 2, b"b" * BLOCK) == GOOD
    assert write_block(a, 2, b"a" * BLOCK) == RESERVATION_CONFLICT
    full = prin(a, READ_FULL_STATUS)
    (length,) = struct.unpack_from(">I", full, 4)
    key, holder, kind, port, tid_length = struct.unpack_from(">Q4xBB4xHI", full, 8)
    assert (key, holder, kind, port) == (KEY_B, 0x01, WE, 1)
    assert full[32 : 32 + tid_length] == tid and length == 24 + tid_length
    a.close()
    b.close()


def test_reserve6_excludes_other_nexuses_and_conflicts_with_persistent_reservations(
    target_factory, image
):
    path, _ = image
    t = target_factory("--lun", str(path))
    a, b = login(t.port, NODE_A), login(t.port, NODE_B)
    reserve6, release6 = bytes((0x16, 0, 0, 0, 0, 0)), bytes((0x17, 0, 0, 0, 0, 0))
    inquiry = bytes((0x12, 0, 0, 0, 36, 0))
    assert command(a, reserve6)[0] == GOOD
    assert command(b, TUR)[0] == RESERVATION_CONFLICT
    assert command(b, reserve6)[0] == RESERVATION_CONFLICT
    assert command(b, inquiry, 36, read=True)[0] == GOOD
    assert command(b, release6)[0] == GOOD  # not the holder's: does nothing
    assert read_block(b, 0)[0] == RESERVATION_CONFLICT
    assert prout(a, REGISTER, 0, KEY_A)[0] == RESERVATION_CONFLICT  # even the holder's
    a.close()  # the nexus ends: its SPC-2 reservation with it
    wait_for_log(t, f"{NODE_A} tsih=1: session ended")
    assert command(b, reserve6)[0] == GOOD
    assert command(b, release6)[0] == GOOD
    assert prout(b, REGISTER, 0, KEY_B)[0] == GOOD
    assert command(b, reserve6)[0] == RESERVATION_CONFLICT  # while anyone is registered
    b.close()


def test_logical_unit_reset_ends_reserve6_and_raises_a_unit_attention(target_factory, image):
    path, _ = image
    # (one session's LUN RESET reaches the other's only when the target is set up to allow it)
    t = target_factory("--lun", str(path), "--cross-session-resets", "on")
    a, b = login(t.port, NODE_A), login(t.port, NODE_B)
    assert command(a, bytes((0x16, 0, 0, 0, 0, 0)))[0] == GOOD
    tmf = bytearray(48)
    tmf[0], tmf[1] = 0x42, 0x80 | 5  # immediate LOGICAL UNIT RESET
    tmf[16:20] = a.next_itt().to_bytes(4, "big")
    tmf[20:24] = b"\xff\xff\xff\xff"
    tmf[24:28] = a.cmdsn.to_bytes(4, "big")
    a.send(tmf)
    assert a.recv()[0][0] & 0x3F == 0x22
    for ini in (a, b):  # every nexus hears of the reset once
        status, _, sense = command(ini, TUR)
        assert status == CHECK_CONDITION and sense_code(sense) == (0x6, 0x29, 0x00)
        assert command(ini, TUR)[0] == GOOD
    assert write_block(b, 0, b"x" * BLOCK) == GOOD  # the reservation ended
    a.close()
    b.close()


def test_report_capabilities_offers_aptpl_only_with_a_state_file(target_factory, image, tmp_path):
    path, _ = image
    t = target_factory("--lun", str(path))
    a = login(t.port, NODE_A)
    caps = prin(a, REPORT_CAPABILITIES)
    assert caps[2] & 0x01 == 0  # PTPL_C
    assert struct.unpack_from(">H", caps, 4)[0] == 0xEA01  # the six types
    status, _, sense = prout(a, REGISTER, 0, KEY_A, aptpl=True)
    assert status == CHECK_CONDITION and sense_code(sense) == (0x5, 0x26, 0x00)
    a.close()
    t2 = target_factory("--lun", str(path), "--reservation-state", str(tmp_path / "pr.json"))
    a = login(t2.port, NODE_A)
    assert prin(a, REPORT_CAPABILITIES)[2] & 0x01 == 0x01
    assert prout(a, REGISTER, 0, KEY_A, aptpl=True)[0] == GOOD
    assert prin(a, REPORT_CAPABILITIES)[3] & 0x01 == 0x01  # PTPL_A
    a.close()


def test_aptpl_reservations_survive_a_target_restart(target_factory, image, tmp_path):
    """A registers with APTPL and reserves; the target process stops and starts again; the
    registration, the reservation and PRgeneration are back, and A (same name and ISID) holds
    it. Without APTPL, the restart clears them."""
    path, _ = image
    state = tmp_path / "pr.json"
    args = ("--lun", str(path), "--reservation-state", str(state))
    t = target_factory(*args)
    a, b = login(t.port, NODE_A), login(t.port, NODE_B)
    assert prout(a, REGISTER, 0, KEY_A, aptpl=True)[0] == GOOD
    assert prout(b, REGISTER, 0, KEY_B, aptpl=True)[0] == GOOD
    assert prout(a, RESERVE, KEY_A, kind=WE_RO)[0] == GOOD
    generation = read_keys(a)[0]
    a.close()
    b.close()
    assert t.stop() == 0
    assert json.loads(state.read_text())["version"] == 1
    assert not list(tmp_path.glob("pr.json.tmp"))

    t = target_factory(*args)
    assert "persistent reservations restored" in t.log()
    stranger = login(t.port, "iqn.2024-01.org.zerosend:stranger")
    assert read_keys(stranger) == (generation, [KEY_A, KEY_B])
    assert read_reservation(stranger) == (KEY_A, WE_RO)
    assert write_block(stranger, 9, b"s" * BLOCK) == RESERVATION_CONFLICT
    a, b = login(t.port, NODE_A), login(t.port, NODE_B)
    assert write_block(a, 9, b"a" * BLOCK) == GOOD
    assert write_block(b, 9, b"b" * BLOCK) == GOOD  # registrants only: B is registered
    # The last APTPL received governs: 0 here, so the next restart starts with nothing.
    assert prout(b, REGISTER, KEY_B, KEY_B, aptpl=False)[0] == GOOD
    a.close()
    b.close()
    stranger.close()
    assert t.stop() == 0
    t = target_factory(*args)
    c = login(t.port, NODE_A)
    assert read_keys(c)[1] == []
    assert read_reservation(c) is None
    c.close()


def test_a_corrupt_state_file_stops_the_start_and_says_what_to_do(image, tmp_path):
    path, _ = image
    state = tmp_path / "pr.json"
    state.write_text('{"format": "zerosend-iscsi reservations", "version": 1, "units": {"0:')
    before = state.read_bytes()
    res = subprocess.run(
        [sys.executable, "-m", "zerosend.iscsi", "--listen", "127.0.0.1:0", "--iqn", IQN,
         "--lun", str(path), "--reservation-state", str(state)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2
    assert "is corrupt" in res.stderr and "move it aside" in res.stderr, res.stderr
    assert state.read_bytes() == before  # nothing is lost


def test_a_missing_state_file_starts_with_no_reservations(target_factory, image, tmp_path):
    path, _ = image
    state = tmp_path / "state" / "pr.json"
    state.parent.mkdir()
    t = target_factory("--lun", str(path), "--reservation-state", str(state))
    assert "no saved persistent reservations" in t.log()
    a = login(t.port, NODE_A)
    assert read_keys(a) == (0, [])
    assert prout(a, REGISTER, 0, KEY_A, aptpl=True)[0] == GOOD
    a.close()
    assert json.loads(state.read_text())["units"]


def test_the_state_file_defaults_to_the_config_files_directory(tmp_path):
    config = tmp_path / "target.toml"
    config.write_text('luns = ["mem:1M"]\n')
    assert load_config({}, str(config)).reservation_state == str(
        tmp_path / "target.reservations.json"
    )
    assert load_config({"luns": ["mem:1M"]}).reservation_state == ""


# -- the rules, driven directly (no session): the cases two initiators rarely reach


def _unit(state: str | None = None) -> tuple[LogicalUnit, Reservations]:
    lu = LogicalUnit(0, open_store("mem:1M"), IQN)
    return lu, Reservations({0: lu}, state)


def _out(reservations, lu, nexus, action, key=0, service_key=0, kind=0, aptpl=False):
    params = struct.pack(">QQ4xB3x", key, service_key, 0x01 if aptpl else 0)
    cdb = struct.pack(">BBB2xIB", 0x5F, action, kind, len(params), 0)
    later = reservations.persistent_reserve_out(lu, cdb, params, nexus)
    if later is not None:  # the state file's save (in a thread), then the command's end
        asyncio.run(later)


def test_release_of_another_type_is_refused_and_keeps_the_reservation():
    lu, pr = _unit()
    a = Nexus(NODE_A, bytes(6))
    _out(pr, lu, a, REGISTER, 0, KEY_A)
    _out(pr, lu, a, RESERVE, KEY_A, kind=WE)
    with pytest.raises(CheckCondition) as refused:
        _out(pr, lu, a, RELEASE, KEY_A, kind=EA)
    assert (refused.value.asc, refused.value.ascq) == (0x26, 0x04)
    assert pr.units[0].type == WE


def test_preempt_of_an_all_registrants_reservation_with_key_zero_takes_it_over():
    lu, pr = _unit()
    a, b, c = (Nexus(n, bytes(6)) for n in (NODE_A, NODE_B, "iqn.2024-01.org.zerosend:c"))
    for nexus, key in ((a, KEY_A), (b, KEY_B), (c, 3)):
        _out(pr, lu, nexus, REGISTER, 0, key)
    _out(pr, lu, b, RESERVE, KEY_B, kind=EA_AR)
    _out(pr, lu, a, PREEMPT, KEY_A, 0, kind=WE)
    unit = pr.units[0]
    assert (unit.type, unit.holder, list(unit.registrations)) == (WE, a, [a])
    write = struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0)
    for nexus in (b, c):  # told once that their registrations went, then refused
        with pytest.raises(CheckCondition) as told:
            pr.admit(lu, write, nexus)
        assert (told.value.key, told.value.asc, told.value.ascq) == (0x6, 0x2A, 0x05)
        with pytest.raises(StatusReply):
            pr.admit(lu, write, nexus)
    pr.admit(lu, write, a)


def test_a_state_file_that_cannot_be_written_fails_the_command_and_changes_nothing(tmp_path):
    directory = tmp_path / "state"
    directory.mkdir()
    lu, pr = _unit(str(directory / "pr.json"))
    a = Nexus(NODE_A, bytes(6))
    _out(pr, lu, a, REGISTER, 0, KEY_A, aptpl=True)
    saved = (directory / "pr.json").read_text()
    directory.chmod(0o500)  # (root ignores modes: a file where the directory was, then)
    (directory / "pr.json.tmp").mkdir()
    try:
        with pytest.raises(CheckCondition) as failed:
            _out(pr, lu, a, REGISTER, KEY_A, 0)
    finally:
        directory.chmod(0o700)
    assert failed.value.key == HARDWARE_ERROR
    assert pr.units[0].registrations == {a: KEY_A} and pr.units[0].generation == 1
    assert (directory / "pr.json").read_text() == saved
