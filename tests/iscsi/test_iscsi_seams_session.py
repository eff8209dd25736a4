"""The session layer where its features meet, driven with raw PDUs: failed commands whose
unsolicited data is still coming (the task table and the CmdSN window), memory held on the
receive side (parameter lists, commands held for their CmdSN) counted in the session's budget,
and protocol corners (a Text request's MaxRecvDataSegmentLength, FirstBurstLength answered
after its clamp to MaxBurstLength, an ITT reused while its task is in progress)."""

from __future__ import annotations

import re
import signal
import struct
import time
from pathlib import Path

import pytest
from iscsi_helpers import IQN, MiniInitiator, RunningTarget, make_image, read10, write10

MiB = 1 << 20
NO_TAG = 0xFFFFFFFF
OP_NOP_IN, OP_SCSI_RSP, OP_TEXT_RSP, OP_DATA_IN, OP_R2T, OP_REJECT = (
    0x20, 0x21, 0x24, 0x25, 0x31, 0x3F,
)  # fmt: skip
REJECT_TASK_IN_PROGRESS = 0x07
GOOD, CHECK_CONDITION, TASK_SET_FULL = 0x00, 0x02, 0x28


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "disk.img"
    return path, make_image(path, 4 * MiB)


def session(port: int, name: str = "mini", **keys: str) -> MiniInitiator:
    ini = MiniInitiator(port, timeout=60)  # a hang guard only: the machine may be loaded
    ini.login(IQN, {"InitiatorName": f"iqn.2024-01.org.zerosend:{name}", **keys})
    return ini


def command(ini: MiniInitiator, cdb: bytes, edtl: int, flags: int, data: bytes = b"",
            itt: int | None = None, cmdsn: int | None = None) -> int:  # fmt: skip
    """A SCSI Command PDU with exactly the given flags byte; a fresh ITT unless told."""
    bhs = bytearray(48)
    bhs[0] = 0x01
    bhs[1] = flags
    if itt is None:
        itt = ini.next_itt()
    bhs[16:20] = itt.to_bytes(4, "big")
    bhs[20:24] = edtl.to_bytes(4, "big")
    bhs[24:28] = (ini.cmdsn if cmdsn is None else cmdsn).to_bytes(4, "big")
    bhs[28:32] = ini.expstatsn.to_bytes(4, "big")
    bhs[32 : 32 + len(cdb)] = cdb
    if cmdsn is None:
        ini.cmdsn += 1
    ini.send(bhs, data)
    return itt


def next_pdu(ini: MiniInitiator) -> tuple[bytes, bytes]:
    """The next PDU that is not a NOP-In of the target's own (a window update, or a ping,
    which is answered)."""
    while True:
        bhs, seg = ini.recv()
        if bhs[0] & 0x3F != OP_NOP_IN or int.from_bytes(bhs[16:20], "big") != NO_TAG:
            return bhs, seg
        if bhs[20:24] != b"\xff\xff\xff\xff":  # a ping: answered with its TTT
            out = bytearray(48)
            out[0], out[1] = 0x40, 0x80
            out[8:16] = bhs[8:16]
            out[16:20] = b"\xff\xff\xff\xff"
            out[20:24] = bhs[20:24]
            out[24:28] = ini.cmdsn.to_bytes(4, "big")
            out[28:32] = ini.expstatsn.to_bytes(4, "big")
            ini.send(out)


def status_of(ini: MiniInitiator, itt: int, window: bool = False) -> tuple[int, bytes]:
    """The next PDU must be the SCSI Response of ``itt``: (status, sense). ``window``: it must
    leave room for the next command (with one command at a time, only what the target holds
    can close it)."""
    bhs, seg = next_pdu(ini)
    assert bhs[0] & 0x3F == OP_SCSI_RSP, f"expected SCSI Response, got opcode {bhs[0] & 0x3F:#x}"
    assert int.from_bytes(bhs[16:20], "big") == itt
    if window:
        maxcmdsn = int.from_bytes(bhs[32:36], "big")
        assert maxcmdsn >= ini.cmdsn, f"MaxCmdSN {maxcmdsn} stopped before CmdSN {ini.cmdsn}"
    return bhs[3], seg[2:]


def r2t_of(ini: MiniInitiator, itt: int) -> tuple[int, int, int]:
    """The next PDU must be an R2T for ``itt``: (TTT, offset, length)."""
    bhs, _ = next_pdu(ini)
    assert bhs[0] & 0x3F == OP_R2T, f"expected R2T, got opcode {bhs[0] & 0x3F:#x}"
    assert int.from_bytes(bhs[16:20], "big") == itt
    ttt, offset, length = struct.unpack_from(">I16xII", bhs, 20)
    return ttt, offset, length


def state(t: RunningTarget, name: str) -> dict[str, int]:
    """The numbers of the state line of the session of initiator ``name`` (SIGUSR1)."""
    after = len(t.log())
    t.proc.send_signal(signal.SIGUSR1)
    pattern = re.compile(rf"state: \S+ iqn\.2024-01\.org\.zerosend:{name} .*")
    deadline = time.monotonic() + 60  # a hang guard
    while time.monotonic() < deadline:
        m = pattern.search(t.log(), after)
        if m:
            return {k: int(v) for k, v in re.findall(r"([\w-]+)=(\d+)\b", m[0])}
        time.sleep(0.05)
    pytest.fail(f"no state line for {name}:\n{t.log()[-4000:]}")


def send_burst(ini: MiniInitiator, itt: int, ttt: int, offset: int, data: bytes) -> None:
    """``data`` as Data-Out PDUs of at most 256 KiB (the target's MaxRecvDataSegmentLength)."""
    step = 256 * 1024
    for n, at in enumerate(range(0, len(data), step)):
        chunk = data[at : at + step]
        ini.data_out(itt, ttt, n, offset + at, chunk, at + step >= len(data))


def pr_out(length: int) -> bytes:
    """PERSISTENT RESERVE OUT (REGISTER) with a parameter list of ``length`` bytes."""
    return struct.pack(">BBBxxIx", 0x5F, 0x00, 0x00, length)


# -- 9: a failed command whose unsolicited data is still coming


def test_failed_commands_with_unsolicited_data_keep_the_session_moving(target_factory, image):
    """Each failed WRITE left a placeholder task (to swallow its unsolicited Data-Out) that
    never left the task table and held a CmdSN slot: after 128 of them MaxCmdSN stopped and
    the session with it. Now the placeholder goes with the last Data-Out, and counts in no
    window."""
    path, data = image
    t = target_factory("--lun", str(path))
    ini = session(t.port, InitialR2T="No", ImmediateData="Yes")
    beyond = 4 * MiB // 512  # the first LBA past the end: LOGICAL BLOCK ADDRESS OUT OF RANGE
    for i in range(300):
        immediate = b"\x5a" * 512 * (i % 2)  # every other one with immediate data
        itt = command(ini, write10(beyond, 2), 1024, 0x20, immediate)  # W, not final
        ini.data_out(itt, NO_TAG, 0, len(immediate), b"\x5a" * (1024 - len(immediate)), True)
        st, sense = status_of(ini, itt, window=True)
        assert st == CHECK_CONDITION and sense[12] == 0x21, (i, st, sense.hex())
    ini.nop()
    s = state(t, "mini")
    assert (s["active"], s["writes"], s["discarding"]) == (0, 0, 0), s
    # Still a working session: a write lands.
    itt = command(ini, write10(0, 1), 512, 0xA0, b"\x11" * 512)
    assert status_of(ini, itt)[0] == GOOD
    ini.close()
    assert path.read_bytes()[:512] == b"\x11" * 512
    assert path.read_bytes()[512:] == data[512:]


def test_failed_commands_whose_data_never_comes_hold_nothing(target_factory, image):
    """An initiator may stop sending a command's unsolicited data once its status came: the
    placeholders are bounded and hold no CmdSN slot."""
    path, _ = image
    t = target_factory("--lun", str(path))
    ini = session(t.port, InitialR2T="No", ImmediateData="Yes")
    beyond = 4 * MiB // 512
    for i in range(600):
        itt = command(ini, write10(beyond, 2), 1024, 0x20, b"\x5a" * 512)
        st, _ = status_of(ini, itt, window=True)
        assert st == CHECK_CONDITION, (i, st)
    ini.nop()
    s = state(t, "mini")
    assert (s["active"], s["writes"]) == (0, 0), s
    assert 0 < s["discarding"] <= 256, s
    ini.close()


# -- 10: memory the session holds on the receive side


def test_parameter_lists_count_in_the_session_budget(target_factory, image):
    """Each parameter-list command (here PERSISTENT RESERVE OUT of 1 MiB) holds a buffer for its
    list until it is whole: these count in --session-bytes; past it a command is refused with
    TASK SET FULL (before: every one got its buffer, 128 MiB a session). The target stays up,
    other sessions are unaffected, and the buffers are given back once the lists came."""
    path, _ = image
    t = target_factory("--lun", str(path), "--session-bytes", "4M")
    ini = session(t.port, "hog", InitialR2T="Yes", ImmediateData="No",
                  MaxBurstLength="1048576")  # fmt: skip
    waiting: list[tuple[int, int, int]] = []
    refused = 0
    for _ in range(8):
        itt = command(ini, pr_out(MiB), MiB, 0xA0)  # F, W: the list comes on R2T
        bhs, _ = next_pdu(ini)
        op = bhs[0] & 0x3F
        if op == OP_R2T:
            ttt, offset, length = struct.unpack_from(">I16xII", bhs, 20)
            assert (offset, length) == (0, MiB)
            waiting.append((itt, ttt, length))
        else:
            assert op == OP_SCSI_RSP and bhs[3] == TASK_SET_FULL, (op, bhs[3])
            refused += 1
    assert refused, "every 1 MiB parameter list was taken past a 4 MiB session budget"
    assert 1 <= len(waiting) <= 4, len(waiting)
    held = state(t, "hog")
    assert held["held-bytes"] == len(waiting) * MiB, held
    # Another session is not affected.
    other = session(t.port, "other")
    itt = other.scsi(read10(0, 8), 4096, read=True)
    assert other.read_response()[0] == GOOD
    other.close()
    # The lists come (whatever the commands make of them); their buffers go back.
    for itt, ttt, length in waiting:
        send_burst(ini, itt, ttt, 0, bytes(length))
        status_of(ini, itt)
    assert state(t, "hog")["held-bytes"] == 0
    itt = command(ini, pr_out(MiB), MiB, 0xA0)
    ttt, _, _ = r2t_of(ini, itt)  # taken again
    send_burst(ini, itt, ttt, 0, bytes(MiB))
    status_of(ini, itt)
    ini.close()


def nop_out(ini: MiniInitiator, cmdsn: int, data: bytes) -> int:
    """A non-immediate NOP-Out (a ping: it takes a CmdSN) at ``cmdsn``."""
    bhs = bytearray(48)
    bhs[0], bhs[1] = 0x00, 0x80
    itt = ini.next_itt()
    bhs[16:20] = itt.to_bytes(4, "big")
    bhs[20:24] = NO_TAG.to_bytes(4, "big")
    bhs[24:28] = cmdsn.to_bytes(4, "big")
    bhs[28:32] = ini.expstatsn.to_bytes(4, "big")
    ini.send(bhs, data)
    return itt


def test_commands_held_out_of_order_count_in_the_session_budget(target_factory, image):
    """Commands that arrive ahead of their CmdSN are held with their data (up to 256 KiB each)
    until the gap fills; on one connection only an initiator that leaves a gap on purpose gets
    there. Their bytes count in --session-bytes: past it the session is ended (before: held
    without limit). The target stays up and other sessions are unaffected."""
    path, _ = image
    t = target_factory("--lun", str(path), "--session-bytes", "1M")
    ini = session(t.port, "gap", MaxRecvDataSegmentLength="262144")
    gap = ini.cmdsn
    other = session(t.port, "other")
    ended = False
    for i in range(1, 9):  # 8 x 200 KiB held behind CmdSN ``gap``
        try:
            nop_out(ini, gap + i, bytes([i]) * 200 * 1024)
        except (BrokenPipeError, ConnectionResetError):
            ended = True
            break
    if not ended:
        try:
            ended = ini.sock.recv(48) == b""
        except ConnectionResetError:
            ended = True
    assert ended, "the session held 1.6 MB of out-of-order commands past a 1 MiB budget"
    assert "past the session's budget" in t.log()
    ini.close()
    other.nop()
    other.scsi(read10(0, 8), 4096, read=True)
    assert other.read_response()[0] == GOOD
    other.close()


def test_commands_held_out_of_order_within_the_budget_still_run(target_factory, image):
    """The budget does not refuse what fits: held commands run once the gap fills."""
    path, _ = image
    t = target_factory("--lun", str(path), "--session-bytes", "4M")
    ini = session(t.port, MaxRecvDataSegmentLength="262144")
    gap = ini.cmdsn
    held = {nop_out(ini, gap + i, bytes([i]) * 100 * 1024): bytes([i]) * 100 * 1024
            for i in (1, 2, 3)}  # fmt: skip
    ini.nop()  # answered after the target read the held ones
    s = state(t, "mini")
    assert s["held-bytes"] >= 300 * 1024, s
    ini.cmdsn = gap
    itt = ini.scsi(bytes(6), 0)  # TEST UNIT READY fills the gap
    got = {}
    for _ in range(4):
        bhs, data = next_pdu(ini)
        got[int.from_bytes(bhs[16:20], "big")] = data
    assert got[itt] == b""
    assert {k: got[k] for k in held} == held
    assert state(t, "mini")["held-bytes"] == 0
    ini.close()


# -- 11: protocol corners


def text_request(ini: MiniInitiator, text: bytes) -> dict[str, str]:
    bhs = bytearray(48)
    bhs[0], bhs[1] = 0x44, 0x80  # immediate Text Request, final
    bhs[16:20] = ini.next_itt().to_bytes(4, "big")
    bhs[20:24] = NO_TAG.to_bytes(4, "big")
    bhs[24:28] = ini.cmdsn.to_bytes(4, "big")
    bhs[28:32] = ini.expstatsn.to_bytes(4, "big")
    ini.send(bhs, text)
    rsp, data = ini.recv()
    assert rsp[0] & 0x3F == OP_TEXT_RSP, rsp.hex()
    return dict(kv.split("=", 1) for kv in data.decode().split("\0") if kv)


def test_text_max_recv_data_segment_length_is_answered_with_the_targets_own(target_factory, image):
    """MaxRecvDataSegmentLength is declarative (RFC 7143 13.12): each side declares what it
    receives. The target answered a Text request's with the initiator's own value."""
    t = target_factory("--lun", str(image[0]))
    ini = session(t.port)
    answers = text_request(ini, b"MaxRecvDataSegmentLength=4096\0")
    assert answers == {"MaxRecvDataSegmentLength": "262144"}
    answers = text_request(ini, b"MaxRecvDataSegmentLength=lots\0")
    assert answers == {"MaxRecvDataSegmentLength": "Reject"}
    ini.nop()
    ini.close()


def test_first_burst_is_answered_after_its_clamp_to_max_burst(target_factory, image):
    """FirstBurstLength must not exceed MaxBurstLength (RFC 7143 13.14): the target clamped its
    own value but had already answered the unclamped one."""
    path, _ = image
    t = target_factory("--lun", str(path))
    ini = MiniInitiator(t.port, timeout=60)
    answers = ini.login(IQN, {"InitialR2T": "No", "FirstBurstLength": "262144",
                              "MaxBurstLength": "16384"})  # fmt: skip
    assert answers["MaxBurstLength"] == "16384"
    assert answers["FirstBurstLength"] == "16384"
    # What the target answered is what it enforces: 16 KiB of unsolicited data is taken.
    itt = command(ini, write10(0, 64), 32768, 0x20)
    ini.data_out(itt, NO_TAG, 0, 0, b"\x22" * 16384, True)
    ttt, offset, length = r2t_of(ini, itt)
    assert (offset, length) == (16384, 16384)
    ini.data_out(itt, ttt, 0, offset, b"\x33" * 16384, True)
    assert status_of(ini, itt)[0] == GOOD
    ini.close()
    assert path.read_bytes()[:32768] == b"\x22" * 16384 + b"\x33" * 16384


@pytest.mark.parametrize("unsolicited", [False, True], ids=["solicited", "unsolicited-data"])
def test_itt_reused_while_its_task_is_in_progress_is_rejected(target_factory, image, unsolicited):
    """RFC 7143 11.17.1: a command whose ITT belongs to a task in progress is answered with a
    Reject, reason "Task in progress"; the old task carries on (before: the new command took
    the ITT's slot in the task table and the old task was orphaned). The rejected command's
    own unsolicited data, if any, is swallowed without touching the old task."""
    path, data = image
    t = target_factory("--lun", str(path))
    keys = {"InitialR2T": "No", "ImmediateData": "Yes"} if unsolicited else {}
    ini = session(t.port, **keys)
    old = command(ini, write10(16, 8), 4096, 0xA0)  # F, W: all its data on R2T
    ttt, offset, length = r2t_of(ini, old)
    assert (offset, length) == (0, 4096)
    if unsolicited:  # W, not final: 512 bytes immediate, 512 unsolicited
        again = command(ini, write10(64, 2), 1024, 0x20, b"\x77" * 512, itt=old)
        ini.data_out(old, NO_TAG, 0, 512, b"\x77" * 512, True)
    else:
        again = command(ini, write10(64, 2), 1024, 0xA0, itt=old)
    bhs, seg = next_pdu(ini)
    assert bhs[0] & 0x3F == OP_REJECT, f"expected a Reject, got opcode {bhs[0] & 0x3F:#x}"
    assert bhs[2] == REJECT_TASK_IN_PROGRESS, f"reject reason {bhs[2]:#x}"
    assert int.from_bytes(seg[16:20], "big") == again
    # The old task is intact: its data lands and it completes.
    ini.data_out(old, ttt, 0, 0, b"\x99" * 4096, True)
    assert status_of(ini, old)[0] == GOOD
    ini.nop()
    ini.close()
    assert path.read_bytes()[16 * 512 : 24 * 512] == b"\x99" * 4096
    assert path.read_bytes()[64 * 512 : 66 * 512] == data[64 * 512 : 66 * 512]


@pytest.mark.parametrize("read_loop", ["native", "python"])
def test_a_plain_read_that_reuses_an_itt_in_progress_is_rejected(target_factory, image, read_loop):
    """The same rule on the READ inner loop, which serves plain READs straight out of the
    receive buffer: a READ(10) reusing the ITT of a write in progress is rejected (before: it
    was served, its Data-In carrying the write's ITT)."""
    path, data = image
    t = target_factory("--lun", str(path), "--read-loop", read_loop)
    ini = session(t.port)
    ini.scsi(read10(0, 1), 512, read=True)  # the image is in the page cache: the inner loop
    assert ini.read_response()[0] == GOOD
    old = command(ini, write10(16, 8), 4096, 0xA0)  # all its data on R2T: in progress
    ttt, _, _ = r2t_of(ini, old)
    again = command(ini, read10(0, 1), 512, 0xC0, itt=old)  # F, R: a plain READ
    bhs, seg = next_pdu(ini)
    assert bhs[0] & 0x3F == OP_REJECT, f"expected a Reject, got opcode {bhs[0] & 0x3F:#x}"
    assert bhs[2] == REJECT_TASK_IN_PROGRESS, f"reject reason {bhs[2]:#x}"
    assert int.from_bytes(seg[16:20], "big") == again
    ini.data_out(old, ttt, 0, 0, b"\x99" * 4096, True)
    assert status_of(ini, old)[0] == GOOD
    ini.scsi(read10(0, 1), 512, read=True)  # the inner loop serves on
    status, got, _ = ini.read_response()
    assert (status, got) == (GOOD, data[:512])
    ini.close()
    assert path.read_bytes()[16 * 512 : 24 * 512] == b"\x99" * 4096
