"""Where reservations meet the target's other features: a copy between LUNs, writes already in
a disk's hands, a reload, the state file, and resets.

- EXTENDED COPY addressed to one LUN reads and writes others: each is judged by its own
  reservations, and the copy counts as a change of its destination (a reset there waits for it).
- PREEMPT AND ABORT answers once the preempted nexus's writes already in the device landed: after
  the GOOD, nothing of the fenced node reaches the medium (the device is a FUSE file whose I/O
  waits at a gate, ``gatedfs``).
- A reload that adds or replaces a LUN gives it reservations of its own.
- The reservation state file is written off the event loop, in order, and PERSISTENT RESERVE OUT
  answers GOOD only once its state is durable.
- LOGICAL UNIT RESET is every nexus's (SAM-5), on the default settings.
"""

from __future__ import annotations

import os
import random
import struct
import threading
from pathlib import Path

import cuparse
import pytest
from iscsi_helpers import (
    IQN,
    MiniInitiator,
    make_image,
    need,
    read10,
    run,
    send_task_management,
    wait_for,
    write10,
)
from test_iscsi_diskio import mounted_gate, nothing_arrives
from test_iscsi_reload import reload, serve, write_config
from test_iscsi_reservations import (
    CHECK_CONDITION,
    EA,
    GOOD,
    KEY_A,
    KEY_B,
    NODE_A,
    NODE_B,
    PREEMPT_AND_ABORT,
    REGISTER,
    RESERVATION_CONFLICT,
    RESERVE,
    WE_RO,
    login,
    response,
    sense_code,
)

MiB = 1 << 20
BLOCK = 512
WRITE_BYTES = 32 * 1024  # all of it immediate data (within FirstBurstLength)
LOGICAL_UNIT_RESET, TARGET_WARM_RESET = 5, 6
AUTHORIZATION_FAILED = 6
TUR = bytes(6)


# -- commands to a given LUN


def command(ini: MiniInitiator, cdb: bytes, edtl: int = 0, data: bytes = b"", lun: int = 0,
            read: bool = False, write: bool = False) -> tuple[int, bytes, bytes]:  # fmt: skip
    """(status, data, sense) of one command."""
    ini.scsi(cdb, edtl, read=read, write=write, data=data, lun=lun)
    _, status, got, sense = response(ini)
    return status, got, sense


def prout_cdb(action: int, key: int, service_key: int = 0, kind: int = 0,
              aptpl: bool = False) -> tuple[bytes, bytes]:  # fmt: skip
    """(CDB, parameter list) of a PERSISTENT RESERVE OUT."""
    params = struct.pack(">QQ4xB3x", key, service_key, 0x01 if aptpl else 0)
    return struct.pack(">BBB2xIB", 0x5F, action, kind, len(params), 0), params


def prout(ini: MiniInitiator, action: int, key: int, service_key: int = 0, kind: int = 0,
          lun: int = 0, aptpl: bool = False) -> int:  # fmt: skip
    cdb, params = prout_cdb(action, key, service_key, kind, aptpl)
    return command(ini, cdb, len(params), params, lun=lun, write=True)[0]


def send_prout(ini: MiniInitiator, action: int, key: int, service_key: int = 0, kind: int = 0,
               aptpl: bool = False, lun: int = 0) -> int:  # fmt: skip
    """Send a PERSISTENT RESERVE OUT without waiting for its end; its ITT."""
    cdb, params = prout_cdb(action, key, service_key, kind, aptpl)
    return ini.scsi(cdb, len(params), write=True, data=params, lun=lun)


def read_keys(ini: MiniInitiator, lun: int = 0) -> list[int]:
    status, data, sense = command(ini, struct.pack(">BB5xHB", 0x5E, 0, 1024, 0), 1024, lun=lun,
                                  read=True)  # fmt: skip
    assert status == GOOD, sense.hex()
    (length,) = struct.unpack_from(">I", data, 4)
    return [k for (k,) in struct.iter_unpack(">Q", data[8 : 8 + length])]


def read_blocks(ini: MiniInitiator, lba: int, blocks: int, lun: int = 0) -> tuple[int, bytes]:
    status, data, _ = command(ini, read10(lba, blocks), blocks * BLOCK, lun=lun, read=True)
    return status, data


# -- EXTENDED COPY


def naa(ini: MiniInitiator, lun: int) -> bytes:
    """The NAA designator of a LUN's Device Identification page."""
    status, page, _ = command(ini, struct.pack(">BBBHB", 0x12, 1, 0x83, 255, 0), 255, lun=lun,
                              read=True)  # fmt: skip
    assert status == GOOD
    at = 4
    while at < 4 + struct.unpack_from(">H", page, 2)[0]:
        kind, length = page[at + 1] & 0x0F, page[at + 3]
        if kind == 3:
            return page[at : at + 4 + length]
        at += 4 + length
    raise AssertionError("no NAA designator")


def xcopy(targets: list[bytes], src: int, dst: int, blocks: int, src_lba: int,
          dst_lba: int) -> tuple[bytes, bytes]:  # fmt: skip
    """(CDB, parameter list) of an EXTENDED COPY of one segment, its result not held."""
    descriptors = b"".join(
        bytes((0xE4, 0, 0, 0)) + d + bytes(24 - len(d)) + b"\0" + BLOCK.to_bytes(3, "big")
        for d in targets
    )
    body = struct.pack(">BBHHH2xHQQ", 0x02, 0, 24, src, dst, blocks, src_lba, dst_lba)
    params = struct.pack(">BBH4xII", 1, 3 << 3, len(descriptors), len(body), 0)
    params += descriptors + body
    return struct.pack(">BB8xIBB", 0x83, 0, len(params), 0, 0), params


def test_extended_copy_is_judged_by_the_reservations_of_the_luns_it_reads_and_writes(
    target_factory, tmp_path: Path
):
    """Node A holds LUN 1 under Exclusive Access. Unregistered node B, addressing its copies to
    LUN 0, may neither overwrite LUN 1 nor copy LUN 1's data out; A may copy into LUN 1."""
    first, second = tmp_path / "first.img", tmp_path / "second.img"
    first_data, second_data = make_image(first, MiB, seed=41), make_image(second, MiB, seed=42)
    t = target_factory("--lun", str(first), "--lun", str(second))
    a, b = login(t.port, NODE_A), login(t.port, NODE_B)
    try:
        assert prout(a, REGISTER, 0, KEY_A, lun=1) == GOOD
        assert prout(a, RESERVE, KEY_A, kind=EA, lun=1) == GOOD
        disks = [naa(b, 0), naa(b, 1)]
        for src, dst in ((0, 1), (1, 0)):  # into the reserved LUN, out of it
            cdb, params = xcopy(disks, src, dst, 16, 0, 64)
            status, _, sense = command(b, cdb, len(params), params, write=True)
            assert status == RESERVATION_CONFLICT, (src, dst, status, sense.hex())
        assert first.read_bytes() == first_data and second.read_bytes() == second_data

        cdb, params = xcopy(disks, 0, 1, 16, 0, 64)  # the holder may
        assert command(a, cdb, len(params), params, write=True)[0] == GOOD
        assert second.read_bytes()[64 * BLOCK : 80 * BLOCK] == first_data[: 16 * BLOCK]
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(90)
def test_a_reset_of_the_copys_destination_waits_for_the_copy(target_factory, tmp_path: Path):
    """A copy addressed to LUN 0 writes LUN 1, whose device holds the write: LOGICAL UNIT RESET
    of LUN 1 is answered only once the copy's write landed there."""
    source = tmp_path / "source.img"
    source_data = make_image(source, MiB, seed=43)
    with mounted_gate(tmp_path, bytes(MiB)) as gated:
        t = target_factory("--lun", str(source), "--lun", str(gated.path))
        ini = MiniInitiator(t.port)
        try:
            ini.login(IQN)
            cdb, params = xcopy([naa(ini, 0), naa(ini, 1)], 0, 1, 16, 0, 32)
            gated.close_gate()
            copy_itt = ini.scsi(cdb, len(params), write=True, data=params)
            wait_for(lambda: gated.waiting > 0, "the copy's write to wait in the device")
            send_task_management(ini, LOGICAL_UNIT_RESET, lun=1)
            assert nothing_arrives(ini), "the reset was answered while the copy could still land"

            gated.open_gate()
            answers = {}
            for _ in range(2):
                bhs, _ = ini.recv()
                answers[bhs[0] & 0x3F] = bhs
            assert answers[0x22][2] == 0, answers[0x22].hex()  # the reset: complete
            assert int.from_bytes(answers[0x21][16:20], "big") == copy_itt
            assert answers[0x21][3] == GOOD
            assert gated.data[32 * BLOCK : 48 * BLOCK] == source_data[: 16 * BLOCK]
        finally:
            gated.open_gate()
            ini.close()
            t.stop()  # before the file system goes


@pytest.mark.timeout(90)
def test_preempt_and_abort_of_a_copys_destination_waits_for_the_copy(
    target_factory, tmp_path: Path
):
    """B, registered on LUN 1, copies into it with a copy addressed to LUN 0; the device of LUN 1
    holds the copy's write when A preempts B there: A's GOOD comes once the copy landed (the
    copy, a task of LUN 0, is not aborted), so what A writes after it stays."""
    source = tmp_path / "source.img"
    source_data = make_image(source, MiB, seed=51)
    with mounted_gate(tmp_path, bytes(MiB)) as gated:
        t = target_factory("--lun", str(source), "--lun", str(gated.path))
        a, b = login(t.port, NODE_A), login(t.port, NODE_B)
        try:
            assert prout(a, REGISTER, 0, KEY_A, lun=1) == GOOD
            assert prout(b, REGISTER, 0, KEY_B, lun=1) == GOOD
            assert prout(a, RESERVE, KEY_A, kind=WE_RO, lun=1) == GOOD
            cdb, params = xcopy([naa(b, 0), naa(b, 1)], 0, 1, 16, 0, 32)
            gated.close_gate()
            copy_itt = b.scsi(cdb, len(params), write=True, data=params)
            wait_for(lambda: gated.waiting > 0, "the copy's write to wait in the device")
            preempt = send_prout(a, PREEMPT_AND_ABORT, KEY_A, KEY_B, kind=WE_RO, lun=1)
            assert nothing_arrives(a), "PREEMPT AND ABORT answered while the copy could land"

            gated.open_gate()
            itt, status, _, sense = response(a)
            assert (itt, status) == (preempt, GOOD), sense.hex()
            assert gated.data[32 * BLOCK : 48 * BLOCK] == source_data[: 16 * BLOCK]
            assert response(b)[:2] == (copy_itt, GOOD)
            after = b"A" * 16 * BLOCK
            status, _, _ = command(a, write10(32, 16), len(after), after, lun=1, write=True)
            assert status == GOOD and gated.data[32 * BLOCK : 48 * BLOCK] == after
        finally:
            gated.open_gate()
            a.close()
            b.close()
            t.stop()  # before the file system goes


# -- PREEMPT AND ABORT: the fence


@pytest.mark.timeout(90)
def test_preempt_and_abort_answers_once_the_preempted_write_landed(target_factory, tmp_path: Path):
    """B's WRITE is in the device (held there) when A preempts B with PREEMPT AND ABORT: A's GOOD
    comes only once that WRITE landed, so what A writes after the GOOD stays; B's WRITE gets no
    status, and B is told its registration went, then refused."""
    with mounted_gate(tmp_path, os.urandom(MiB)) as gated:
        t = target_factory("--lun", str(gated.path))
        a, b = login(t.port, NODE_A), login(t.port, NODE_B)
        try:
            assert prout(a, REGISTER, 0, KEY_A) == GOOD
            assert prout(b, REGISTER, 0, KEY_B) == GOOD
            assert prout(a, RESERVE, KEY_A, kind=WE_RO) == GOOD  # registrants may write
            gated.close_gate()
            b.scsi(write10(256, WRITE_BYTES // BLOCK), WRITE_BYTES, write=True,
                   data=b"B" * WRITE_BYTES)  # fmt: skip
            wait_for(lambda: gated.waiting > 0, "B's WRITE to wait in the device")

            preempt = send_prout(a, PREEMPT_AND_ABORT, KEY_A, KEY_B, kind=WE_RO)
            assert nothing_arrives(a), "PREEMPT AND ABORT answered while B's WRITE could land"

            gated.open_gate()
            itt, status, _, sense = response(a)
            assert (itt, status) == (preempt, GOOD), sense.hex()
            after = b"A" * WRITE_BYTES
            status, _, _ = command(a, write10(256, WRITE_BYTES // BLOCK), WRITE_BYTES, after,
                                   write=True)  # fmt: skip
            assert status == GOOD
            assert gated.data[256 * BLOCK : 256 * BLOCK + WRITE_BYTES] == after

            status, _, sense = command(b, TUR)  # (a status of B's WRITE would come first)
            assert status == CHECK_CONDITION and sense_code(sense) == (0x6, 0x2A, 0x05)
            status, _, _ = command(b, write10(256, 1), BLOCK, b"b" * BLOCK, write=True)
            assert status == RESERVATION_CONFLICT
            assert gated.data[256 * BLOCK : 256 * BLOCK + WRITE_BYTES] == after
        finally:
            gated.open_gate()
            a.close()
            b.close()
            t.stop()  # before the file system goes


@pytest.mark.timeout(240)
def test_no_write_of_a_fenced_node_lands_after_the_fence(target_factory, tmp_path: Path):
    """A small history check of the fence. Each round B, registered, keeps many WRITEs in flight
    to a device that takes them in threads (FUSE), and A preempts B with PREEMPT AND ABORT after
    a random number of them completed, then writes its own data over the range. Invariant, once
    everything is quiet: the range holds A's data, whatever B's WRITEs did (each landed before
    the fence's GOOD, or never)."""
    rng = random.Random(53)
    span = WRITE_BYTES // BLOCK  # the range: A's one WRITE covers it
    with mounted_gate(tmp_path, bytes(MiB)) as gated:
        t = target_factory("--lun", str(gated.path))
        a, b = login(t.port, NODE_A), login(t.port, NODE_B)
        try:
            assert prout(a, REGISTER, 0, KEY_A) == GOOD
            assert prout(a, RESERVE, KEY_A, kind=WE_RO) == GOOD  # registrants may write
            for round_ in range(6):
                assert prout(b, REGISTER, 0, KEY_B) == GOOD
                data = bytes((round_,)) * 8 * BLOCK
                writes = [
                    b.scsi(write10(rng.randrange(span - 8), 8), len(data), write=True, data=data)
                    for _ in range(32)
                ]
                answered = rng.randrange(len(writes))
                for _ in range(answered):  # (in any order)
                    itt, status, _, _ = response(b)
                    assert itt in writes and status == GOOD
                preempt = send_prout(a, PREEMPT_AND_ABORT, KEY_A, KEY_B, kind=WE_RO)
                itt, status, _, sense = response(a)
                assert (itt, status) == (preempt, GOOD), sense.hex()
                fence = bytes((0xA0 + round_,)) * WRITE_BYTES
                status, _, _ = command(a, write10(0, span), WRITE_BYTES, fence, write=True)
                assert status == GOOD
                # The rest of B's WRITEs: landed before the fence, or (those the target took
                # after it) told of the preemption once, then refused; the aborted ones say
                # nothing. The TUR's status comes after all of them.
                tur = b.scsi(TUR, 0)
                told = 0
                while True:
                    itt, status, _, sense = response(b)
                    if status == CHECK_CONDITION:
                        assert sense_code(sense) == (0x6, 0x2A, 0x05)
                        told += 1
                    else:
                        assert status in (GOOD, RESERVATION_CONFLICT) and itt in [*writes, tur]
                    if itt == tur:
                        break
                assert told == 1
                assert gated.data[:WRITE_BYTES] == fence, f"round {round_}: B wrote after"
        finally:
            a.close()
            b.close()
            t.stop()  # before the file system goes


# -- reload


@pytest.mark.timeout(180)
def test_a_lun_added_by_a_reload_serves_real_clients(target_factory, tmp_path: Path):
    """SIGHUP adds LUN 1: iscsi-inq and qemu-img use it (they hung on it: its commands failed
    in admission and dropped the connection)."""
    inq, qemu = need("iscsi-inq"), need("qemu-img")
    first, second = tmp_path / "first.img", tmp_path / "second.img"
    make_image(first, MiB, seed=44)
    second_data = make_image(second, MiB, seed=45)
    t, config = serve(target_factory, tmp_path, [first])
    write_config(config, [first, second])
    reload(t)
    assert "ZEROSEND" in run([inq, t.url(1)], timeout=60).stdout
    out = tmp_path / "out.img"
    run([qemu, "convert", "-f", "raw", "-O", "raw", t.url(1), str(out)], timeout=60)
    assert out.read_bytes() == second_data


def test_a_lun_replaced_by_a_reload_has_reservations_of_its_own(target_factory, tmp_path: Path):
    """LUN 1's image is replaced: the old image's registration does not carry over, and a
    reservation taken on the new LUN refuses another node's READs (the READ fast path too)."""
    first, old, new = tmp_path / "first.img", tmp_path / "old.img", tmp_path / "new.img"
    make_image(first, MiB, seed=46)
    make_image(old, MiB, seed=47)
    make_image(new, MiB, seed=48)
    t, config = serve(target_factory, tmp_path, [first, old])
    a = login(t.port, NODE_A)
    assert prout(a, REGISTER, 0, KEY_A, lun=1) == GOOD
    a.close()
    write_config(config, [first, new])
    reload(t)
    a, b = login(t.port, NODE_A), login(t.port, NODE_B)
    try:
        assert read_keys(a, lun=1) == []
        assert prout(a, REGISTER, 0, KEY_A, lun=1) == GOOD
        assert prout(a, RESERVE, KEY_A, kind=EA, lun=1) == GOOD
        assert read_blocks(b, 0, 8, lun=1)[0] == RESERVATION_CONFLICT
        assert read_blocks(a, 0, 8, lun=1) == (GOOD, new.read_bytes()[: 8 * BLOCK])
    finally:
        a.close()
        b.close()


def test_a_reload_keeps_an_images_registrations_kept_across_restarts(
    target_factory, tmp_path: Path
):
    """A registration with APTPL belongs to the image: a reload that puts another image at
    LUN 1 shows none there, and one that puts the image back restores it (from the state
    file, which kept it meanwhile)."""
    first, kept, other = tmp_path / "first.img", tmp_path / "kept.img", tmp_path / "other.img"
    for seed, path in enumerate((first, kept, other), 52):
        make_image(path, MiB, seed=seed)
    t, config = serve(target_factory, tmp_path, [first, kept])
    a = login(t.port, NODE_A)
    assert prout(a, REGISTER, 0, KEY_A, lun=1, aptpl=True) == GOOD
    a.close()
    for luns, keys in (([first, other], []), ([first, kept], [KEY_A])):
        write_config(config, luns)
        reload(t)
        a = login(t.port, NODE_A)
        try:
            assert read_keys(a, lun=1) == keys, luns
        finally:
            a.close()
    assert f'"key": {KEY_A}' in (tmp_path / "target.reservations.json").read_text()


# -- the reservation state file


def waits_in_fifo_open(pid: int) -> bool:
    """A thread of process ``pid`` waits in open() for the other end of a FIFO."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "wchan").read_text() == "wait_for_partner":
                return True
        except OSError:  # the thread ended meanwhile
            pass
    return False


@pytest.mark.timeout(90)
def test_the_state_file_is_written_off_the_event_loop_and_in_order(target_factory, tmp_path: Path):
    """The state file's temporary is a FIFO: writing it waits (in open) until a reader comes.
    Meanwhile the target serves another node; a second PERSISTENT RESERVE OUT waits its turn.
    The FIFO cannot be synced: the first one fails (its state was never durable) and changes
    nothing; the second one is judged after it, saved, and answered GOOD."""
    image = tmp_path / "disk.img"
    data = make_image(image, MiB, seed=49)
    state = tmp_path / "pr.json"
    fifo = Path(f"{state}.tmp")
    os.mkfifo(fifo)
    t = target_factory("--lun", str(image), "--reservation-state", str(state))
    a = login(t.port, NODE_A)
    b: MiniInitiator | None = None
    unblocked = threading.Event()

    def unblock() -> None:  # pair with the target's open (by another name: the next is a file)
        if not unblocked.is_set():
            unblocked.set()
            os.rename(fifo, tmp_path / "fifo")
            with open(tmp_path / "fifo", "rb") as f:
                f.read()

    try:
        first = send_prout(a, REGISTER, 0, KEY_A, aptpl=True)
        wait_for(lambda: waits_in_fifo_open(t.proc.pid), "the save to wait for the FIFO")
        b = login(t.port, NODE_B)  # the event loop is free
        assert read_blocks(b, 0, 8) == (GOOD, data[: 8 * BLOCK])
        second = send_prout(b, REGISTER, 0, KEY_B, aptpl=True)
        assert nothing_arrives(a) and nothing_arrives(b), "answered before the state was saved"

        reader = threading.Thread(target=unblock, daemon=True)
        reader.start()
        itt, status, _, sense = response(a)
        assert (itt, status) == (first, CHECK_CONDITION)
        assert sense_code(sense)[0] == 0x4, sense.hex()  # HARDWARE ERROR: not durable
        itt, status, _, sense = response(b)
        assert (itt, status) == (second, GOOD), sense.hex()
        assert read_keys(a) == [KEY_B]
        assert f'"key": {KEY_B}' in state.read_text()
        assert str(KEY_A) not in state.read_text()
    finally:
        if waits_in_fifo_open(t.proc.pid):
            unblock()
        a.close()
        if b is not None:
            b.close()


# -- LOGICAL UNIT RESET on the default settings


def test_logical_unit_reset_from_another_node_on_the_default_settings(
    target_factory, tmp_path: Path
):
    """B's LOGICAL UNIT RESET is carried out although A is logged in: A's queued WRITE is
    aborted and A hears of the reset; TARGET WARM RESET from B stays refused."""
    image = tmp_path / "disk.img"
    data = make_image(image, MiB, seed=50)
    t = target_factory("--lun", str(image))
    a, b = login(t.port, NODE_A), login(t.port, NODE_B)
    try:
        itt = a.scsi(write10(8, 8), 8 * BLOCK, write=True)  # InitialR2T=Yes: an R2T comes
        r2t, _ = a.recv()
        assert r2t[0] & 0x3F == 0x31
        send_task_management(b, TARGET_WARM_RESET)
        assert b.recv()[0][2] == AUTHORIZATION_FAILED
        send_task_management(b, LOGICAL_UNIT_RESET)
        assert b.recv()[0][2] == 0
        a.data_out(itt, int.from_bytes(r2t[20:24], "big"), 0, 0, b"\x11" * 8 * BLOCK, True)
        for ini in (a, b):
            status, _, sense = command(ini, TUR)  # (a status of A's WRITE would come first)
            assert status == CHECK_CONDITION and sense_code(sense) == (0x6, 0x29, 0x00)
        assert image.read_bytes() == data
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(300)
def test_libiscsi_reserve6_lun_reset_on_the_default_settings(target_factory, tmp_path: Path):
    """libiscsi's Reserve6.LUNReset: a second initiator's RESERVE(6) is cleared by the first
    one's LOGICAL UNIT RESET (it failed with "Function Authorization Failed")."""
    cu = need("iscsi-test-cu")
    image = tmp_path / "cu.img"
    with image.open("wb") as f:
        f.truncate(64 * MiB)
    t = target_factory("--lun", str(image))
    res = run([cu, "-d", "-v", "-t", "SCSI.Reserve6.LUNReset", t.url(), t.url()], timeout=240,
              check=False)  # fmt: skip
    text = res.stdout + res.stderr
    outcomes = cuparse.parse(text)
    assert [(o.suite, o.test, o.result) for o in outcomes] == [("Reserve6", "LUNReset", "pass")], (
        text
    )
