"""Where the storage of the target meets its other features (issue 20, seams 3, 7, 8, 11).

- Two syncs in two disk threads: a SYNCHRONIZE CACHE that finds nothing dirty while another
  one's fdatasync is still in the device must wait for it, not answer GOOD at once.
- A reload removes a LUN while disk work still holds its image: no write may land in a file
  opened afterwards that got the image's descriptor number.
- A LUN or CHAP table with a typo or a value of the wrong type is refused, naming the key, at
  start and on reload (a refused reload keeps the old config).
- The slow parts of a reload (reading the config, opening images, the removed ones' final
  sync) run off the event loop.

The device that blocks is a FUSE file whose I/O waits at a gate (``gatedfs``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from gatedfs import GatedFile
from iscsi_helpers import (
    IQN,
    MiniInitiator,
    RunningTarget,
    make_image,
    read10,
    wait_for,
    write10,
)
from test_iscsi_diskio import mounted_gate, nothing_arrives, other_lun_serves
from test_iscsi_sbc import naa, segment, xcopy_cdb, xcopy_params

from zerosend.iscsi.service.config import load_config

MiB = 1 << 20
BLOCK = 512
OTHER = "iqn.2024-01.org.zerosend:other"
SECOND = "iqn.2024-01.org.zerosend:second"
SYNC10 = bytes((0x35,)) + bytes(9)


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[GatedFile]:
    """A 1 MiB gated file. Ask for it before ``target_factory``: the target must close the
    file before the file system goes."""
    with mounted_gate(tmp_path, bytes(1 * MiB)) as fs:
        yield fs


def reload(t: RunningTarget, outcome: str) -> str:
    """SIGHUP, then the log once one more line says ``outcome``."""
    before = t.log().count(outcome)
    t.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: t.log().count(outcome) > before or t.proc.poll() is not None, outcome, 60)
    assert t.proc.poll() is None, t.log()
    return t.log()


def descriptors_of(t: RunningTarget, path: Path) -> set[int]:
    """The target's descriptor numbers open on ``path``."""
    found = set()
    for fd in Path(f"/proc/{t.proc.pid}/fd").iterdir():
        try:
            if os.readlink(fd) == str(path):
                found.add(int(fd.name))
        except OSError:  # closed meanwhile
            pass
    return found


# -- seam 3: a sync answers only once the data it covers is durable


@pytest.mark.timeout(90)
def test_a_sync_waits_for_the_sync_under_way_in_another_thread(gated, target_factory, tmp_path):
    """A WRITE, then SYNCHRONIZE CACHE whose fdatasync waits in the device; a second
    SYNCHRONIZE CACHE, from another session, finds nothing left dirty: it must still wait for
    that fdatasync (the WRITE is durable only then), and both answer GOOD after it."""
    plain = tmp_path / "plain.img"
    plain_data = make_image(plain, 1 * MiB, seed=31)
    t = target_factory("--lun", str(gated.path), "--lun", str(plain))
    first, second = MiniInitiator(t.port), MiniInitiator(t.port)
    try:
        first.login(t.iqn)
        second.login(t.iqn, {"InitiatorName": SECOND})
        data = os.urandom(8 * BLOCK)
        first.scsi(write10(0, 8), len(data), write=True, data=data)
        assert first.read_response()[0] == 0
        gated.close_gate()
        first.scsi(SYNC10, 0)
        wait_for(lambda: gated.waiting > 0, "the first fdatasync to wait in the device")
        syncs = gated.syncs

        second.scsi(SYNC10, 0)
        assert nothing_arrives(second), "a sync answered while the fdatasync was in the device"
        other_lun_serves(t.port, t.iqn, plain_data)  # (the loop is free meanwhile)

        gated.open_gate()
        assert first.read_response()[0] == 0
        assert second.read_response()[0] == 0
        assert gated.syncs > syncs
        assert gated.data[: len(data)] == data
    finally:
        gated.open_gate()
        first.close()
        second.close()


def test_a_flush_waits_only_for_the_syncs_that_cover_its_range(gated):
    """The store itself, from threads (as FUA and SYNCHRONIZE CACHE run): while a sync of the
    written blocks waits in the device, a flush of those blocks waits for it too, and a
    flush of blocks nobody wrote since the last sync returns at once."""
    from zerosend.iscsi.storage.file import FileStore

    store = FileStore(str(gated.path))
    waiting: list[threading.Thread] = []
    try:
        store.flush()  # the image is clean
        before = gated.syncs
        store.write(0, os.urandom(4096))
        assert store.unsynced == (0, 4096)
        gated.close_gate()
        first = threading.Thread(target=store.flush, daemon=True)
        first.start()
        waiting.append(first)
        wait_for(lambda: gated.waiting > 0, "the first sync to wait in the device")
        assert store.unsynced == (0, 4096), "a sync under way has not made its span durable"

        elsewhere = threading.Thread(target=store.flush, args=(512 * 1024, 4096), daemon=True)
        elsewhere.start()
        wait_for(lambda: not elsewhere.is_alive(), "a flush of unwritten blocks to return")
        covered = threading.Thread(target=store.flush, args=(2048, 512), daemon=True)
        covered.start()
        waiting.append(covered)
        covered.join(1.0)
        assert covered.is_alive(), "a flush returned while the sync of its blocks was under way"
        assert gated.syncs == before
    finally:
        gated.open_gate()
        for thread in waiting:
            thread.join(30)
        store.close()
    assert not any(thread.is_alive() for thread in waiting)
    assert gated.syncs == before + 1 and store.unsynced is None  # (one sync served all three)


# -- seam 7: a removed LUN's image is closed only when no disk work uses it


def _config(path: Path, luns: list[Path]) -> None:
    path.write_text("luns = [" + ", ".join(f'"{p}"' for p in luns) + "]\n")


@pytest.mark.timeout(120)
def test_a_removed_luns_queued_writes_never_reach_a_file_opened_after(
    gated, target_factory, tmp_path
):
    """WRITEs to LUN 1 wait in the device and in its disk threads (one holds the medium); a
    reload removes LUN 1 and ends the session; a second reload adds new images, which the
    target opens while those writes are pending (on the lowest free descriptor numbers: the
    removed image's among them, if it was closed). Once the device answers, the new images
    must be untouched: each write reached the removed image or failed."""
    plain = tmp_path / "plain.img"
    make_image(plain, 1 * MiB, seed=32)
    config = tmp_path / "target.toml"
    _config(config, [plain, gated.path])
    t = target_factory("--config", str(config))
    ini = MiniInitiator(t.port)
    fresh = [tmp_path / f"fresh{n}.img" for n in range(8)]
    fresh_data = [make_image(path, 1 * MiB, seed=33 + n) for n, path in enumerate(fresh)]
    try:
        ini.login(t.iqn)
        # A sync first: nothing is left dirty, so removing the LUN needs no sync of the device
        ini.scsi(SYNC10, 0, lun=1)
        assert ini.read_response()[0] == 0
        gated.close_gate()
        writes = [os.urandom(8 * BLOCK) for _ in range(12)]
        for n, data in enumerate(writes):
            ini.scsi(write10(64 * n, 8), len(data), write=True, data=data, lun=1)
        wait_for(lambda: gated.waiting > 0, "a WRITE to wait in the device")
        ini.nop()  # answered once every WRITE before it went to the disk threads
        (image_fd,) = descriptors_of(t, gated.path)

        _config(config, [plain])
        reload(t, "reload done")
        # The image is closed, or its closing waits for the writes under way
        wait_for(
            lambda: not descriptors_of(t, gated.path) or "closes once its I/O" in t.log(),
            "the removed LUN's image to be closed",
        )
        _config(config, [plain, *fresh])
        reload(t, "reload done")
        fresh_fds = {fd for path in fresh for fd in descriptors_of(t, path)}
        assert len(fresh_fds) == len(fresh), t.log()

        gated.open_gate()

        def done(n: int, data: bytes) -> bool:
            """The n-th WRITE landed somewhere, or failed (the target logs it)."""
            at = 64 * n * BLOCK
            if gated.data[at : at + len(data)] == data:
                return True
            if f"write of {len(data)} bytes at {at} failed" in t.log():
                return True
            for path in fresh:
                with open(path, "rb") as f:
                    f.seek(at)
                    if f.read(len(data)) == data:
                        return True
            return False

        wait_for(lambda: all(done(n, d) for n, d in enumerate(writes)), "every WRITE to end")
        wait_for(lambda: not descriptors_of(t, gated.path), "the removed image to be closed")
        for path, data in zip(fresh, fresh_data, strict=True):
            assert path.read_bytes() == data, (
                f"writes to the removed LUN (descriptor {image_fd}) landed in {path.name} "
                f"(new images on descriptors {sorted(fresh_fds)})"
            )
        for n, data in enumerate(writes):  # landed whole in the old image, or not at all
            assert gated.data[64 * n * BLOCK :][: len(data)] in (data, bytes(len(data)))
        # The new LUN serves
        check = MiniInitiator(t.port)
        try:
            check.login(t.iqn, {"InitiatorName": OTHER})
            check.scsi(read10(0, 8), 8 * BLOCK, read=True, lun=1)
            status, got, _ = check.read_response()
            assert status == 0 and got == fresh_data[0][: 8 * BLOCK]
        finally:
            check.close()
    finally:
        gated.open_gate()
        ini.close()


@pytest.mark.timeout(120)
def test_a_copy_into_a_removed_lun_never_reaches_a_file_opened_after(
    gated, target_factory, tmp_path
):
    """Two EXTENDED COPYs addressed to LUN 0 write into LUN 1: the first waits in LUN 1's
    device, the second for the first (it holds LUN 1's medium). A reload removes LUN 1; the
    copying session never addressed LUN 1, so it stays. A second reload opens new images.
    Once the device answers, each copy landed in the removed image or failed (CHECK
    CONDITION), and the new images are untouched."""
    plain = tmp_path / "plain.img"
    plain_data = make_image(plain, 1 * MiB, seed=38)
    config = tmp_path / "target.toml"
    _config(config, [plain, gated.path])
    t = target_factory("--config", str(config))
    fresh = [tmp_path / f"fresh{n}.img" for n in range(8)]
    fresh_data = [make_image(path, 1 * MiB, seed=40 + n) for n, path in enumerate(fresh)]
    setup = MiniInitiator(t.port)
    try:
        setup.login(t.iqn, {"InitiatorName": SECOND})
        setup.scsi(SYNC10, 0, lun=1)  # nothing left dirty: removing LUN 1 needs no sync
        assert setup.read_response()[0] == 0
        disks = [naa(setup, 0), naa(setup, 1)]
    finally:
        setup.close()
    wait_for(lambda: "session ended" in t.log(), "the setup session to end")
    ini = MiniInitiator(t.port)
    gated.close_gate()
    try:
        ini.login(t.iqn)
        for list_id, lba in ((1, 0), (2, 64)):
            plist = xcopy_params(list_id, disks, [segment(0, 1, 8, lba, lba)], hold=False)
            ini.scsi(xcopy_cdb(len(plist)), len(plist), write=True, data=plist)
        wait_for(lambda: gated.waiting > 0, "the first copy's write to wait in the device")
        ini.nop()  # both copies went to LUN 0's disk threads
        _config(config, [plain])
        log = reload(t, "reload done")
        assert "ending session" not in log
        wait_for(
            lambda: not descriptors_of(t, gated.path) or "closes once its I/O" in t.log(),
            "the removed LUN's image to be closed",
        )
        _config(config, [plain, *fresh])
        reload(t, "reload done")
        assert all(descriptors_of(t, path) for path in fresh), t.log()
    finally:
        gated.open_gate()
    try:
        statuses = [ini.read_response()[0] for _ in range(2)]
    finally:
        ini.close()
    for path, data in zip(fresh, fresh_data, strict=True):
        assert path.read_bytes() == data, f"a copy into the removed LUN landed in {path.name}"
    assert all(status in (0, 2) for status in statuses), statuses
    for lba in (0, 64):  # the copied blocks in the removed image, or its old zeros
        got = gated.data[lba * BLOCK : (lba + 8) * BLOCK]
        assert got in (plain_data[lba * BLOCK : (lba + 8) * BLOCK], bytes(8 * BLOCK))


# -- seam 11: what a reload does that may wait for a device runs off the event loop


@pytest.mark.timeout(120)
def test_a_reload_opens_a_new_image_off_the_event_loop(gated, target_factory, tmp_path):
    """A reload replaces LUN 1 by an image that waits in its device (the target reads its
    first bytes to tell qcow2 from raw): meanwhile other sessions are served; once the device
    answers the reload completes and the new LUN 1 serves."""
    plain = tmp_path / "plain.img"
    plain_data = make_image(plain, 1 * MiB, seed=35)
    other = tmp_path / "other.img"
    make_image(other, 1 * MiB, seed=37)
    config = tmp_path / "target.toml"
    _config(config, [plain, other])
    t = target_factory("--config", str(config))
    _config(config, [plain, gated.path])
    gated.close_gate()
    try:  # (the gate must open before the target stops: it cannot while held in the device)
        before = t.log().count("reload done")
        t.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: gated.waiting > 0, "the reload's open to wait in the device")
        serve_plain_lun0(t, plain_data)
        assert t.log().count("reload done") == before
    finally:
        gated.open_gate()
    wait_for(lambda: t.log().count("reload done") > before, "the reload to complete")
    ini = MiniInitiator(t.port)
    try:
        ini.login(t.iqn, {"InitiatorName": SECOND})
        ini.scsi(read10(0, 8), 8 * BLOCK, read=True, lun=1)
        status, got, _ = ini.read_response()
        assert status == 0 and got == gated.data[: 8 * BLOCK]
    finally:
        ini.close()


@pytest.mark.timeout(120)
def test_a_reload_syncs_a_removed_image_off_the_event_loop(gated, target_factory, tmp_path):
    """A reload removes a LUN with written data: its last sync waits in the device while
    other sessions are served; the image is closed once the sync is done."""
    plain = tmp_path / "plain.img"
    plain_data = make_image(plain, 1 * MiB, seed=36)
    config = tmp_path / "target.toml"
    _config(config, [plain, gated.path])
    t = target_factory("--config", str(config))
    ini = MiniInitiator(t.port)
    try:
        ini.login(t.iqn)
        data = os.urandom(8 * BLOCK)
        ini.scsi(write10(0, 8), len(data), write=True, data=data, lun=1)
        assert ini.read_response()[0] == 0
    finally:
        ini.close()
    wait_for(lambda: "session ended" in t.log(), "the session to end")
    gated.close_gate()
    try:
        syncs = gated.syncs
        _config(config, [plain])
        reload(t, "reload done")
        wait_for(lambda: gated.waiting > 0, "the removed image's sync to wait in the device")
        serve_plain_lun0(t, plain_data)
        assert descriptors_of(t, gated.path), "the image was closed before its sync"
    finally:
        gated.open_gate()
    wait_for(lambda: not descriptors_of(t, gated.path), "the removed image to be closed")
    assert gated.syncs > syncs and gated.data[: len(data)] == data


def serve_plain_lun0(t: RunningTarget, plain_data: bytes) -> None:
    """A new session logs in and reads LUN 0 (an ordinary file): the event loop is free."""
    other = MiniInitiator(t.port)
    try:
        other.login(t.iqn, {"InitiatorName": OTHER})
        other.scsi(read10(16, 8), 8 * BLOCK, read=True)
        status, data, _ = other.read_response()
        assert status == 0 and data == plain_data[16 * BLOCK : 24 * BLOCK]
    finally:
        other.close()


# -- seam 8: nested tables refuse unknown keys and wrong types, naming the key


BAD_TABLES = [
    ('luns = [{ path = "a.img", read_only = true }]', "config key luns[0].read_only: unknown key"),
    ('luns = [{ path = "a.img", readonly = "false" }]', "config key luns[0].readonly: must be"),
    ('luns = ["b.img", { path = "a.img", mmap = true }]', "config key luns[1].mmap: unknown key"),
    ('luns = [{ path = "a.img", mapped = 1 }]', "config key luns[0].mapped: must be"),
    ("luns = [{ readonly = true }]", "config key luns[0].path: missing"),
    ("luns = [{ path = 5 }]", "config key luns[0].path: must be a string"),
    ('luns = ["a.img", 5]', "config key luns[1]: must be a string"),
    (
        'luns = ["a.img"]\nchap = { user = "u", secret = "s", scret = "t" }',
        "config key chap.scret: unknown key",
    ),
    (
        'luns = ["a.img"]\nchap = { user = "u", secret = 123456789012 }',
        "config key chap.secret: must be a string",
    ),
    (
        'luns = ["a.img"]\nmutual_chap = { usr = "u", secret = "s" }',
        "config key mutual_chap.usr: unknown key",
    ),
    ('luns = ["a.img"]\nlisten = { host = "127.0.0.1" }', "config key listen: must be a string"),
    ('luns = ["a.img"]\nallow = [{ iqn = "iqn.x" }]', "config key allow[0]: must be a string"),
]


@pytest.mark.parametrize(("toml", "error"), BAD_TABLES)
def test_a_nested_table_with_a_typo_is_refused_naming_the_key(tmp_path: Path, toml, error):
    config = tmp_path / "target.toml"
    config.write_text(toml + "\n")
    with pytest.raises(ValueError, match=r"^" + error.replace("[", r"\[").replace(".", r"\.")):
        load_config({}, str(config))


def test_a_lun_table_sets_what_it_says(tmp_path: Path):
    config = tmp_path / "target.toml"
    config.write_text(
        'luns = [{ path = "a.img", readonly = true, mapped = true }, '
        '{ path = "b.img" }]\nchap = { user = "u", secret = "0123456789ab" }\n'
    )
    cfg = load_config({}, str(config))
    assert [(lun.path, lun.readonly, lun.mapped) for lun in cfg.luns] == [
        ("a.img", True, True),
        ("b.img", False, False),
    ]
    assert cfg.chap is not None and cfg.chap.user == "u"


def test_a_lun_table_with_a_typo_stops_the_start(tmp_path: Path):
    """The target does not start (rather than serve the image writable), and says why."""
    image = tmp_path / "a.img"
    make_image(image, 1 * MiB)
    config = tmp_path / "target.toml"
    config.write_text(f'luns = [{{ path = "{image}", read_only = true }}]\n')
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "zerosend.iscsi",
            "--listen",
            "127.0.0.1:0",
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "luns[0].read_only: unknown key" in proc.stdout + proc.stderr


@pytest.mark.timeout(90)
def test_a_reload_with_a_typo_in_a_lun_table_is_refused(target_factory, tmp_path: Path):
    """The reload is refused naming the key; the LUN stays as it was (read-only here: a WRITE
    is still refused), and a correct reload then applies."""
    image = tmp_path / "a.img"
    data = make_image(image, 1 * MiB, seed=34)
    config = tmp_path / "target.toml"
    config.write_text(f'luns = [{{ path = "{image}", readonly = true }}]\n')
    t = target_factory("--config", str(config))
    ini = MiniInitiator(t.port)
    try:
        ini.login(IQN)
        config.write_text(f'luns = [{{ path = "{image}", readonly = "false" }}]\n')
        log = reload(t, "reload refused")
        assert "luns[0].readonly: must be true or false" in log
        config.write_text(f'luns = [{{ path = "{image}", read_only = false }}]\n')
        log = reload(t, "reload refused")
        assert "luns[0].read_only: unknown key" in log
        # The session was left alone and the LUN is still read-only
        ini.scsi(write10(0, 8), 8 * BLOCK, write=True, data=os.urandom(8 * BLOCK))
        status, _, sense = ini.read_response()
        assert status == 2 and sense[2] & 0x0F == 0x07, (status, sense.hex())  # DATA PROTECT
        assert image.read_bytes() == data
    finally:
        ini.close()
    config.write_text(f'luns = [{{ path = "{image}" }}]\n')
    reload(t, "reload done")
    ini = MiniInitiator(t.port)
    try:
        ini.login(IQN)
        ini.scsi(write10(0, 8), 8 * BLOCK, write=True, data=bytes(8 * BLOCK))
        assert ini.read_response()[0] == 0
    finally:
        ini.close()
