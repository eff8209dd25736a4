"""One initiator must not be able to stall another: a session that never reads its socket keeps
only its share of the target's transmit buffers and of its own CmdSN window, is found dead by its
missing answer to a NOP-In ping (or by the kernel's TCP_USER_TIMEOUT), and leaves with
everything it held."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import socket
import struct
import time
from pathlib import Path

import pytest
from iscsi_helpers import IQN, MiniInitiator, RunningTarget, make_image, need, run

from zerosend.iscsi.wire.bufpool import MmapPool

MiB = 1 << 20
HANG = 60.0  # seconds: a hang detector, not a timing check
NO_TAG = 0xFFFFFFFF


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


def u32(bhs: bytes, at: int) -> int:
    return int.from_bytes(bhs[at : at + 4], "big")


def nop_out(itt: int, ttt: int, cmdsn: int, immediate: bool = True) -> bytearray:
    bhs = bytearray(48)
    bhs[0], bhs[1] = 0x40 if immediate else 0x00, 0x80
    bhs[16:20] = itt.to_bytes(4, "big")
    bhs[20:24] = ttt.to_bytes(4, "big")
    bhs[24:28] = cmdsn.to_bytes(4, "big")
    return bhs


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "disk.img"
    return path, make_image(path, 16 * MiB)


def small_window_initiator(port: int, name: str) -> MiniInitiator:
    """Logged in over a socket with a tiny receive buffer (set before connect: a small window)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(HANG)
    sock.connect(("127.0.0.1", port))
    ini = MiniInitiator(port, sock=sock)
    ini.login(IQN, {"InitiatorName": f"iqn.2024-01.org.zerosend:{name}"})
    return ini


def stalled_initiator(port: int, name: str = "stalled") -> MiniInitiator:
    """Queues 400 READs of 256 KiB (100 MiB) regardless of the CmdSN window, and never reads
    its socket again."""
    ini = small_window_initiator(port, name)
    blocks = 512
    span = 16 * MiB // 512 - blocks
    for i in range(400):
        ini.scsi(read10((i * blocks) % span, blocks), blocks * 512, read=True)
    return ini


def one_block_read(port: int, data: bytes) -> None:
    """Another initiator's login and 512-byte READ, which must complete."""
    ini = MiniInitiator(port, timeout=HANG)
    ini.login(IQN, {"InitiatorName": "iqn.2024-01.org.zerosend:bystander"})
    ini.scsi(read10(7, 1), 512, read=True)
    status, got, _ = ini.read_response()
    assert status == 0 and got == data[7 * 512 : 8 * 512]
    ini.close()


def wait_for_log(t: RunningTarget, pattern: str, after: int = 0) -> re.Match[str]:
    """The first match of ``pattern`` in the target's log past offset ``after``."""
    deadline = time.monotonic() + HANG
    while time.monotonic() < deadline:
        m = re.compile(pattern).search(t.log(), after)
        if m:
            return m
        time.sleep(0.1)
    pytest.fail(f"no {pattern!r} in the target's log:\n{t.log()[-4000:]}")


def session_state(t: RunningTarget, initiator: str) -> tuple[int, int, int]:
    """Commands in progress, statuses not yet released and buffers held by the session of
    ``initiator``, from a fresh state dump (SIGUSR1)."""
    after = len(t.log())
    t.proc.send_signal(signal.SIGUSR1)
    m = wait_for_log(
        t, rf"zerosend:{initiator} .*active=(\d+) .*unreleased-statuses=(\d+) .*buffers=(\d+)",
        after,
    )  # fmt: skip
    return int(m[1]), int(m[2]), int(m[3])


def target_sockets(target_port: int, peer_port: int) -> list[str]:
    """The target's TCP sockets of the connection to ``peer_port`` (its state, hex), from
    /proc/net/tcp: a socket still open in any descriptor keeps its entry."""
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state = fields[1], fields[2], fields[3]
        if (
            int(local.split(":")[1], 16) == target_port
            and int(remote.split(":")[1], 16) == peer_port
        ):
            found.append(state)
    return found


@pytest.mark.parametrize(
    "limits", [[], ["--session-commands", "1000"]], ids=["defaults", "share-of-the-pool-alone"]
)
def test_stalled_initiator_does_not_freeze_another(target_factory, image, limits):
    """Dead-peer detection off: the bystander can only get through by the per-session limits
    (with a window wider than the stalled initiator's queue, by its share of the pool alone)."""
    path, data = image
    inq = need("iscsi-inq")
    t = target_factory("--lun", str(path), "--nop-interval", "0", "--user-timeout", "0", *limits)
    stalled = stalled_initiator(t.port)
    one_block_read(t.port, data)
    assert "Vendor:ZEROSEND" in run([inq, t.url()], timeout=HANG).stdout
    assert target_sockets(t.port, stalled.sock.getsockname()[1]), "the stalled one is still there"
    # It queued 400 commands: the target took on no more than its limits (128 commands, from
    # dispatch until their status is released; 32 buffers). The rest it dropped as outside the
    # window, or left unread in the socket while the session had no buffer to serve them with.
    active, statuses, buffers = session_state(t, "stalled")
    assert active + statuses <= (128 if not limits else 1000) and buffers <= 32
    stalled.close()


def test_dead_initiator_leaves_with_everything_it_held(target_factory, image, backend):
    """Pinged, unanswered, declared dead: its connection is reset (zerosend's duplicate of the
    descriptor included), its buffers are back in the pool, and others carry on."""
    # Every backend, each one this kernel lacks a visible skip (or, required, a failure).
    path, data = image
    t = target_factory("--lun", str(path), "--nop-interval", "1", "--nop-timeout", "1",
                       "--user-timeout", "0", "--backend", backend, "--zerocopy-probe", "off",
                       "--buffers", "64", "--session-buffers", "16")  # fmt: skip
    stalled = stalled_initiator(t.port)
    peer_port = stalled.sock.getsockname()[1]
    assert target_sockets(t.port, peer_port)
    wait_for_log(t, r"declared dead")
    wait_for_log(t, r"iqn.2024-01.org.zerosend:stalled tsih=\d+: session ended")
    assert target_sockets(t.port, peer_port) == [], "the connection outlived its session"
    # The stalled initiator sees what it was sent, then the reset.
    with pytest.raises(ConnectionResetError):
        while stalled.sock.recv(1 << 20):
            pass
    stalled.close()
    mark = len(t.log())
    t.proc.send_signal(signal.SIGUSR1)
    m = wait_for_log(t, r"state: (\d+) connections, (\d+)/(\d+) transmit buffers free", mark)
    assert m.group(1) == "0" and m.group(2) == m.group(3) == "64", m.group(0)
    one_block_read(t.port, data)


def test_user_timeout_drops_a_peer_that_stopped_reading(target_factory, image):
    """No pings: the kernel's TCP_USER_TIMEOUT ends the connection whose peer keeps its window
    shut; keepalive is on for every accepted connection."""
    path, data = image
    t = target_factory("--lun", str(path), "--nop-interval", "0", "--user-timeout", "2")
    idle = MiniInitiator(t.port, timeout=HANG)
    idle.login(IQN, {"InitiatorName": "iqn.2024-01.org.zerosend:idle"})
    ss = shutil.which("ss")
    if ss is not None:
        out = run([ss, "-tnoH", "state", "established", f"( sport = :{t.port} )"]).stdout
        assert "keepalive" in out, out
    stalled = stalled_initiator(t.port)
    wait_for_log(t, r"stalled tsih=\d+: .*Connection timed out")
    wait_for_log(t, r"stalled tsih=\d+: session ended")
    assert target_sockets(t.port, stalled.sock.getsockname()[1]) == []
    stalled.close()
    idle.nop()  # the idle session was left alone
    idle.close()
    one_block_read(t.port, data)


def test_cmdsn_window_is_what_the_session_may_still_queue(target_factory, image):
    """MaxCmdSN never lets the initiator queue more than the session's limit (its answers not
    yet sent count); a command past it is dropped, an immediate one rejected, and the window
    reopens by itself once the answers went out."""
    path, data = image
    limit = 4
    t = target_factory("--lun", str(path), "--session-commands", str(limit))
    ini = small_window_initiator(t.port, "windowed")
    first = ini.cmdsn
    reads = {}  # ITT -> LBA of 4 MiB reads: more than the socket buffers hold
    for i in range(limit):
        reads[ini.scsi(read10(i * 8192 % 24576, 8192), 4 * MiB, read=True)] = i * 8192 % 24576
    ini.scsi(b"\x00" * 6, 0, cmdsn=first + limit)  # past MaxCmdSN: dropped
    tur = bytearray(48)  # an immediate TEST UNIT READY: no room, rejected
    tur[0], tur[1] = 0x41, 0x80
    tur[16:20] = ini.next_itt().to_bytes(4, "big")
    tur[24:28] = ini.cmdsn.to_bytes(4, "big")
    ini.send(tur)
    wait_for_log(t, r"outside window")
    got: dict[int, bytearray] = {}
    done = 0
    rejected = False
    while True:
        bhs, seg = ini.recv()
        op = bhs[0] & 0x3F
        expcmdsn, maxcmdsn = u32(bhs, 28), u32(bhs, 32)
        open_slots = (maxcmdsn - expcmdsn + 1) & 0xFFFFFFFF
        unanswered = ((expcmdsn - first) & 0xFFFFFFFF) - done  # received by the target
        assert open_slots + unanswered <= limit, (
            f"MaxCmdSN {maxcmdsn} lets the initiator queue {open_slots} more while the target "
            f"holds {unanswered} unanswered commands (limit {limit})"
        )
        if op == 0x3F:
            assert bhs[2] == 0x06 and seg[:48] == bytes(tur)  # immediate command reject
            rejected = True
        elif op == 0x25:
            itt = u32(bhs, 16)
            buf = got.setdefault(itt, bytearray())
            assert u32(bhs, 40) == len(buf)
            buf += seg
            if bhs[1] & 0x01:
                assert bhs[3] == 0
                done += 1
        elif op == 0x20:
            assert u32(bhs, 16) == NO_TAG and u32(bhs, 20) == NO_TAG  # a window update
        else:
            raise AssertionError(f"unexpected opcode {op:#x}")
        if done == limit and rejected and open_slots > 0:
            break
    for itt, lba in reads.items():
        assert bytes(got[itt]) == data[lba * 512 : lba * 512 + 4 * MiB]
    # the dropped TEST UNIT READY again, in the window now
    ini.scsi(b"\x00" * 6, 0, cmdsn=first + limit)
    status, _, _ = ini.read_response()
    assert status == 0
    ini.close()


def test_pending_writes_are_bounded_by_the_window(target_factory, image):
    """WRITEs that never send their data: the table of pending writes holds no more than the
    session's limit; the rest are dropped as outside the window."""
    path, _ = image
    limit = 4
    t = target_factory("--lun", str(path), "--session-commands", str(limit))
    ini = MiniInitiator(t.port, timeout=HANG)
    ini.login(IQN, {"InitialR2T": "Yes", "ImmediateData": "No"})
    for i in range(10):
        ini.scsi(write10(i * 16, 16), 16 * 512, write=True)
    wait_for_log(t, r"outside window")
    ini.send(nop_out(ini.next_itt(), NO_TAG, ini.cmdsn), b"ping")
    r2ts = 0
    while True:
        bhs, seg = ini.recv()
        if bhs[0] & 0x3F == 0x20:
            assert seg == b"ping"
            break
        assert bhs[0] & 0x3F == 0x31, f"expected R2T, got {bhs[0] & 0x3F:#x}"
        r2ts += 1
    assert r2ts == limit
    assert t.log().count("outside window") == 10 - limit
    ini.close()


def test_pool_shares_cap_a_session_and_serve_the_one_holding_fewest():
    """The fair-share rule of the transmit pool, on real buffers."""

    async def scenario() -> None:
        pool = MmapPool(4, 4096)
        hog, a, b = pool.share(3), pool.share(4), pool.share(4)
        held = [hog.try_acquire() for _ in range(4)]
        assert held[3] is None, "a session never holds more than its cap"
        extra = a.try_acquire()
        assert extra is not None and pool.available == 0
        wait_a = asyncio.ensure_future(a.acquire())
        wait_b = asyncio.ensure_future(b.acquire())
        await asyncio.sleep(0)
        lease = held[0]
        assert lease is not None
        lease.release()  # b holds none, a holds one: b gets it
        await asyncio.sleep(0)
        assert wait_b.done() and not wait_a.done()
        lease = held[1]
        assert lease is not None
        lease.release()
        await asyncio.sleep(0)
        assert wait_a.done() and (a.held, b.held, hog.held) == (2, 1, 1)
        b.close()
        a.close()

    asyncio.run(scenario())


def test_initiator_answering_pings_is_kept(target_factory, image):
    """A write waiting for data makes no progress, so the target pings; an initiator that
    answers every ping keeps its session, then completes the write."""
    path, _ = image
    # A generous answer time: this test's own answers may be late on a loaded machine. The
    # verdict is an event: the target pings again only once it took the answer (an ignored
    # answer would leave it waiting, then declaring the initiator dead, never pinging again).
    t = target_factory("--lun", str(path), "--nop-interval", "1", "--nop-timeout", str(HANG / 2))
    ini = MiniInitiator(t.port, timeout=HANG)
    ini.login(IQN, {"InitialR2T": "Yes", "ImmediateData": "No"})
    block = bytes(range(256)) * 2
    itt = ini.scsi(write10(3, 1), 512, write=True)
    r2t, _ = ini.recv()
    assert r2t[0] & 0x3F == 0x31
    for _ in range(3):
        ping, _ = ini.recv()
        assert ping[0] & 0x3F == 0x20 and u32(ping, 16) == NO_TAG and u32(ping, 20) != NO_TAG
        ini.send(nop_out(NO_TAG, u32(ping, 20), ini.cmdsn))  # the answer: the ping's TTT
    ini.data_out(itt, u32(r2t, 20), 0, 0, block, True)
    status, _, _ = ini.read_response()
    assert status == 0
    assert "declared dead" not in t.log()
    ini.close()
    assert path.read_bytes()[3 * 512 : 4 * 512] == block


def test_limit_and_liveness_settings_say_what_is_wrong(tmp_path):
    from zerosend.iscsi.service.config import load_config

    cfg = load_config({"luns": ["null:1M"], "nop_interval": "2.5", "session_bytes": "8M"})
    assert (cfg.nop_interval, cfg.session_bytes, cfg.session_commands) == (2.5, 8 * MiB, 128)
    with pytest.raises(ValueError, match="--session-commands: must be 1 or more"):
        load_config({"luns": ["null:1M"], "session_commands": "0"})
    with pytest.raises(ValueError, match="--nop-timeout: must be a number of seconds"):
        load_config({"luns": ["null:1M"], "nop_timeout": "-1"})
    toml = tmp_path / "target.toml"
    toml.write_text('luns = ["null:1M"]\nuser_timeout = 0\nsession_buffers = 8\n')
    cfg = load_config({}, str(toml))
    assert (cfg.user_timeout, cfg.session_buffers) == (0.0, 8)
