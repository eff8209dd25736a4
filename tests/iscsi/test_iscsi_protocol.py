"""Protocol-level behaviour with a raw-PDU initiator: digests, R2T, bad input, CmdSN window, TMF."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest
from iscsi_helpers import IQN, MiniInitiator, make_image, need, run

MiB = 1 << 20


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "disk.img"
    return path, make_image(path, 4 * MiB)


def test_header_and_data_digests_read_and_write_with_r2t(target_factory, image):
    path, data = image
    t = target_factory("--lun", str(path))
    ini = MiniInitiator(t.port)
    answers = ini.login(IQN, {"HeaderDigest": "CRC32C,None", "DataDigest": "CRC32C,None"})
    assert answers["HeaderDigest"] == "CRC32C" and answers["DataDigest"] == "CRC32C"
    # 64 KiB read in 8 KiB Data-In PDUs (our MaxRecvDataSegmentLength), every one digested
    ini.scsi(read10(8, 128), 128 * 512, read=True)
    status, got, _ = ini.read_response()
    assert status == 0 and got == data[8 * 512 : 136 * 512]
    # 24 KiB write: 8 KiB immediate, the rest solicited by R2T (InitialR2T=Yes)
    new = bytes(range(256)) * 96
    itt = ini.scsi(write10(100, 48), len(new), write=True, data=new[:8192])
    sent = 8192
    while True:
        bhs, _ = ini.recv()
        op = bhs[0] & 0x3F
        if op == 0x21:
            assert bhs[3] == 0, "write failed"
            break
        assert op == 0x31, f"expected R2T, got opcode {op:#x}"
        ttt, offset, length = struct.unpack_from(">I16xII", bhs, 20)
        assert offset == sent
        for i, pos in enumerate(range(offset, offset + length, 8192)):
            chunk = new[pos : min(pos + 8192, offset + length)]
            ini.data_out(itt, ttt, i, pos, chunk, pos + len(chunk) == offset + length)
        sent = offset + length
    ini.close()
    assert path.read_bytes()[100 * 512 : 148 * 512] == new


class _Collect:
    """Stands in for the socket while a burst of PDUs is built."""

    def __init__(self, into: bytearray) -> None:
        self.sendall = into.extend


def read16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0)


@pytest.mark.parametrize("mode", ["", ":mmap", "python"])
def test_pipelined_burst_of_mixed_commands(target_factory, image, mode):
    """Many commands in one TCP write, so the target reads them in one go and answers them in
    one batch: small reads (the fast path) mixed with multi-PDU reads, a residual, an error,
    commands out of CmdSN order and an immediate NOP. Every answer must carry the right bytes,
    and StatSN must count up by one along the stream."""
    path, data = image
    extra = []
    if mode == "python":  # the same fast path without its Rust inner loop
        extra = ["--read-loop", "python"]
        mode = ""
    t = target_factory("--lun", str(path) + mode, *extra)
    ini = MiniInitiator(t.port)
    ini.login(IQN)
    blocks_total = len(data) // 512
    expect: dict[int, tuple[int, bytes]] = {}  # ITT -> (status, data)
    real_sock = ini.sock
    burst = bytearray()
    ini.sock = _Collect(burst)  # type: ignore[assignment]
    for i in range(40):
        lba = (i * 977) % (blocks_total - 64)
        if i % 10 == 7:  # 20 KiB: three Data-In PDUs of at most 8 KiB, then status
            itt = ini.scsi(read10(lba, 40), 40 * 512, read=True)
            expect[itt] = (0, data[lba * 512 : (lba + 40) * 512])
        elif i % 10 == 3:
            itt = ini.scsi(read16(lba, 8), 8 * 512, read=True)
            expect[itt] = (0, data[lba * 512 : (lba + 8) * 512])
        elif i == 15:  # the initiator expects less than the command reads: overflow residual
            itt = ini.scsi(read10(lba, 8), 2048, read=True)
            expect[itt] = (0, data[lba * 512 : lba * 512 + 2048])
        elif i == 25:  # past the end of the LUN
            itt = ini.scsi(read10(blocks_total - 4, 8), 8 * 512, read=True)
            expect[itt] = (2, b"")
        else:
            itt = ini.scsi(read10(lba, 8), 8 * 512, read=True)
            expect[itt] = (0, data[lba * 512 : (lba + 8) * 512])
    # Two more with their CmdSNs swapped, then an immediate NOP (no CmdSN of its own)
    first, second = ini.cmdsn, ini.cmdsn + 1
    itt = ini.scsi(read10(3, 8), 4096, read=True, cmdsn=second)
    expect[itt] = (0, data[3 * 512 : 11 * 512])
    itt = ini.scsi(read10(5, 1), 512, read=True, cmdsn=first)
    expect[itt] = (0, data[5 * 512 : 6 * 512])
    ini.cmdsn += 2
    nop = bytearray(48)
    nop[0], nop[1] = 0x40, 0x80
    nop_itt = ini.next_itt()
    nop[16:20] = nop_itt.to_bytes(4, "big")
    nop[20:24] = b"\xff\xff\xff\xff"
    nop[24:28] = ini.cmdsn.to_bytes(4, "big")
    ini.send(nop, b"ping")
    ini.sock = real_sock
    ini.sock.sendall(bytes(burst))

    got: dict[int, bytearray] = {}
    statsns: list[int] = []
    done: dict[int, int] = {}
    pong = False
    while len(done) < len(expect) or not pong:
        bhs, seg = ini.recv()
        op = bhs[0] & 0x3F
        itt = int.from_bytes(bhs[16:20], "big")
        if op == 0x20:
            assert itt == nop_itt and seg == b"ping"
            statsns.append(int.from_bytes(bhs[24:28], "big"))
            pong = True
            continue
        assert op in (0x21, 0x25), f"unexpected opcode {op:#x}"
        assert itt in expect and itt not in done, f"answer for ITT {itt:#x}"
        if op == 0x25:
            offset = int.from_bytes(bhs[40:44], "big")
            buf = got.setdefault(itt, bytearray())
            assert offset == len(buf), "Data-In out of order within a command"
            buf += seg
        if op == 0x21 or bhs[1] & 0x01:
            statsns.append(int.from_bytes(bhs[24:28], "big"))
            done[itt] = bhs[3]
    for itt, (status, want) in expect.items():
        assert done[itt] == status, f"ITT {itt:#x}: status {done[itt]:#x}"
        assert bytes(got.get(itt, b"")) == want, f"ITT {itt:#x}: wrong data"
    assert statsns == list(range(statsns[0], statsns[0] + len(statsns))), statsns
    ini.nop()  # the session still works
    ini.close()


def test_read_residuals_and_bad_lba(target_factory, image):
    path, data = image
    t = target_factory("--lun", str(path))
    ini = MiniInitiator(t.port)
    ini.login(IQN)
    ini.scsi(read10(0, 4), 1024, read=True)  # 2048 wanted, room for 1024: overflow
    bhs, seg = b"", b""
    got = bytearray()
    while True:
        bhs, seg = ini.recv()
        got += seg
        if bhs[1] & 0x01:
            break
    assert bhs[1] & 0x04 and struct.unpack_from(">I", bhs, 44)[0] == 1024
    assert bytes(got) == data[:1024]
    ini.scsi(read10(len(data) // 512, 1), 512, read=True)
    status, _, sense = ini.read_response()
    assert status == 2 and sense[2] & 0x0F == 0x05 and sense[12] == 0x21  # LBA out of range


def test_cmdsn_outside_window_is_ignored(target_factory, image):
    t = target_factory("--lun", str(image[0]))
    ini = MiniInitiator(t.port)
    ini.login(IQN)
    ini.scsi(b"\x00" * 6, 0, cmdsn=ini.cmdsn + 100_000)  # far outside [ExpCmdSN, MaxCmdSN]
    # The next PDU we get must answer the ping, not the ignored TEST UNIT READY.
    ini.nop()
    ini.scsi(b"\x00" * 6, 0)
    status, _, _ = ini.read_response()
    assert status == 0
    assert "outside window" in t.log()


def test_unknown_opcode_is_rejected_and_session_continues(target_factory, image):
    t = target_factory("--lun", str(image[0]))
    ini = MiniInitiator(t.port)
    ini.login(IQN)
    bogus = bytearray(48)
    bogus[0] = 0x1C  # not an initiator opcode
    bogus[1] = 0x80
    ini.send(bogus)
    bhs, seg = ini.recv()
    assert bhs[0] & 0x3F == 0x3F and bhs[2] == 0x05  # Reject: command not supported
    assert seg[:48] == bytes(bogus)
    ini.nop()


def test_task_management_answers(target_factory, image):
    t = target_factory("--lun", str(image[0]))
    ini = MiniInitiator(t.port)
    ini.login(IQN)

    def tmf(function: int, ref: int = 0xFFFFFFFF, lun: int = 0) -> int:
        bhs = bytearray(48)
        bhs[0] = 0x42  # immediate TMF request
        bhs[1] = 0x80 | function
        bhs[9] = lun
        bhs[16:20] = ini.next_itt().to_bytes(4, "big")
        bhs[20:24] = ref.to_bytes(4, "big")
        bhs[24:28] = ini.cmdsn.to_bytes(4, "big")
        bhs[32:36] = (ini.cmdsn - 1).to_bytes(4, "big")
        ini.send(bhs)
        rsp, _ = ini.recv()
        assert rsp[0] & 0x3F == 0x22
        return rsp[2]

    assert tmf(1, ref=0x7777) == 1  # ABORT TASK of a task that does not exist
    assert tmf(5) == 0  # LOGICAL UNIT RESET
    assert tmf(5, lun=9) == 2  # no such LUN
    assert tmf(2) == 0  # ABORT TASK SET
    assert tmf(3) == 5  # CLEAR ACA: not supported
    assert tmf(8) == 4  # TASK REASSIGN: needs ErrorRecoveryLevel 2
    ini.nop()


def test_bad_input_never_stops_the_target(target_factory, image):
    inq = need("iscsi-inq")
    path, _ = image
    t = target_factory("--lun", str(path))

    def conn() -> socket.socket:
        return socket.create_connection(("127.0.0.1", t.port), timeout=10)

    def closed_by_target(s: socket.socket) -> bool:
        """True once the target ended the connection (EOF or reset); False if it kept it open
        (the read timed out)."""
        s.settimeout(10)
        try:
            while s.recv(4096):
                pass
            closed = True
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            closed = False
        s.close()
        return closed

    s = conn()  # garbage instead of a PDU
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\xff" * 64)
    assert closed_by_target(s)
    s = conn()  # a SCSI command before login
    cmd = bytearray(48)
    cmd[0] = 0x01
    s.sendall(cmd)
    assert closed_by_target(s)
    s = conn()  # a login PDU announcing 16 MiB of text
    login = bytearray(48)
    login[0], login[1] = 0x43, 0x87
    login[5:8] = (16 * MiB - 1).to_bytes(3, "big")
    s.sendall(login)
    assert closed_by_target(s)
    s = conn()  # a truncated PDU, then the peer goes away
    s.sendall(bytes(20))
    s.close()
    # a peer that resets the connection in the middle of a large read
    ini = MiniInitiator(t.port)
    ini.login(IQN)
    for lba in range(0, 8192, 2048):
        ini.scsi(read10(lba, 2048), 2048 * 512, read=True)
    ini.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    ini.close()
    # a logged-in session that sends a Data-Out larger than it was allowed to
    ini = MiniInitiator(t.port)
    ini.login(IQN)
    ini.data_out(0x1234, 0xFFFFFFFF, 0, 0, bytes(300_000), True)
    assert closed_by_target(ini.sock)
    # the target still serves a real client
    assert "Vendor:ZEROSEND" in run([inq, t.url()]).stdout
    log = t.log()
    assert "before login completed" in log
    assert "bad PDU during login" in log
    assert "exceeds" in log


def test_flood_of_idle_connections_evicts_oldest(target_factory, image):
    inq = need("iscsi-inq")
    t = target_factory("--lun", str(image[0]), "--max-pending-logins", "8")
    idle = [socket.create_connection(("127.0.0.1", t.port), timeout=10) for _ in range(40)]
    try:
        assert "Vendor:ZEROSEND" in run([inq, t.url()]).stdout
    finally:
        for s in idle:
            s.close()
    assert "evicted" in t.log()
