"""Protocol corners answered as RFC 7143 and SBC-4 say, with the raw-PDU initiator: data where
the negotiated rules allow none (rejected, nothing written, the session carries on), data past
an R2T or FirstBurstLength (the command fails before a byte is written), MAXIMUM TRANSFER
LENGTH, a login that names full feature phase as its current stage, and resets that would reach
other sessions; VERIFY with BYTCHK=3 compared off the event loop."""

from __future__ import annotations

import asyncio
import queue
import struct
import threading
from pathlib import Path

import pytest
from iscsi_helpers import IQN, MiniInitiator, make_image, write10

from zerosend.iscsi.scsi.unit import LogicalUnit
from zerosend.iscsi.service.config import LunSpec, TargetConfig
from zerosend.iscsi.service.target import Target
from zerosend.iscsi.storage.file import FileStore

MiB = 1 << 20
OP_SCSI_RSP, OP_TMF_RSP, OP_R2T, OP_REJECT = 0x21, 0x22, 0x31, 0x3F
REJECT_PROTOCOL_ERROR = 0x04
MAX_TRANSFER_BLOCKS = 16384  # what the Block Limits VPD page advertises


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "disk.img"
    return path, make_image(path, 4 * MiB)


def command(ini: MiniInitiator, cdb: bytes, edtl: int, flags: int, data: bytes = b"") -> int:
    """A SCSI Command PDU with exactly the given flags byte (F, R, W, attributes)."""
    bhs = bytearray(48)
    bhs[0] = 0x01
    bhs[1] = flags
    itt = ini.next_itt()
    bhs[16:20] = itt.to_bytes(4, "big")
    bhs[20:24] = edtl.to_bytes(4, "big")
    bhs[24:28] = ini.cmdsn.to_bytes(4, "big")
    bhs[28:32] = ini.expstatsn.to_bytes(4, "big")
    bhs[32 : 32 + len(cdb)] = cdb
    ini.cmdsn += 1
    ini.send(bhs, data)
    return itt


def expect_reject(ini: MiniInitiator, itt: int, reason: int = REJECT_PROTOCOL_ERROR) -> None:
    bhs, seg = ini.recv()
    assert bhs[0] & 0x3F == OP_REJECT, f"expected a Reject, got opcode {bhs[0] & 0x3F:#x}"
    assert bhs[2] == reason, f"reject reason {bhs[2]:#x}"
    assert int.from_bytes(seg[16:20], "big") == itt, "the Reject must carry the rejected header"


def expect_check(ini: MiniInitiator, itt: int, key: int, asc: int, ascq: int = 0) -> None:
    bhs, seg = ini.recv()
    assert bhs[0] & 0x3F == OP_SCSI_RSP, f"expected SCSI Response, got {bhs[0] & 0x3F:#x}"
    assert int.from_bytes(bhs[16:20], "big") == itt
    assert bhs[3] == 0x02, f"status {bhs[3]:#x}, expected CHECK CONDITION"
    sense = seg[2:]
    assert (sense[2] & 0x0F, sense[12], sense[13]) == (key, asc, ascq), sense.hex()


def session(port: int, **keys: str) -> MiniInitiator:
    ini = MiniInitiator(port)
    ini.login(IQN, keys)
    return ini


# -- data the negotiated rules do not allow


@pytest.mark.parametrize(
    "case",
    ["no W bit", "past EDTL", "after ImmediateData=No", "past FirstBurstLength"],
)
def test_immediate_data_against_the_rules_is_rejected_and_not_written(target_factory, image, case):
    """RFC 7143 11.3.1 / 13.11 / 13.14: such a command PDU is a protocol error, answered with a
    Reject. Before, the first two ended the connection with an internal error and the last two
    were written."""
    path, data = image
    t = target_factory("--lun", str(path))
    keys = {"FirstBurstLength": "4096"}
    if case == "after ImmediateData=No":
        keys["ImmediateData"] = "No"
    ini = session(t.port, **keys)
    new = b"\xa5" * 8192
    final_write = 0x80 | 0x20
    if case == "no W bit":
        itt = command(ini, write10(8, 2), 1024, 0x80, new[:1024])
    elif case == "past EDTL":
        itt = command(ini, write10(8, 2), 512, final_write, new[:1024])
    elif case == "after ImmediateData=No":
        itt = command(ini, write10(8, 2), 1024, final_write, new[:1024])
    else:
        itt = command(ini, write10(8, 16), 8192, final_write, new)
    expect_reject(ini, itt)
    ini.nop()  # the session carries on
    ini.close()
    assert path.read_bytes() == data, "refused data reached the medium"


def test_unsolicited_data_out_past_first_burst_fails_before_writing(target_factory, image):
    path, data = image
    t = target_factory("--lun", str(path))
    ini = session(t.port, InitialR2T="No", FirstBurstLength="4096")
    itt = command(ini, write10(8, 16), 8192, 0x20)  # W, not final: unsolicited data follows
    ini.data_out(itt, 0xFFFFFFFF, 0, 0, b"\x5a" * 8192, True)  # 8 KiB, FirstBurst 4 KiB
    expect_check(ini, itt, 0x0B, 0x4B)  # ABORTED COMMAND, DATA PHASE ERROR
    ini.nop()
    ini.close()
    assert path.read_bytes() == data, "data past FirstBurstLength reached the medium"


def test_data_out_past_r2t_length_fails_before_writing(target_factory, image):
    path, data = image
    t = target_factory("--lun", str(path))
    ini = session(t.port, ImmediateData="No", MaxBurstLength="4096", FirstBurstLength="4096")
    itt = command(ini, write10(8, 16), 8192, 0xA0)
    bhs, _ = ini.recv()
    assert bhs[0] & 0x3F == OP_R2T
    ttt, offset, length = struct.unpack_from(">I16xII", bhs, 20)
    assert (offset, length) == (0, 4096)
    ini.data_out(itt, ttt, 0, 0, b"\x5a" * 8192, True)  # twice what the R2T asked for
    expect_check(ini, itt, 0x0B, 0x4B)
    ini.nop()
    ini.close()
    assert path.read_bytes() == data, "data past the R2T reached the medium"


# -- MAXIMUM TRANSFER LENGTH


def test_max_transfer_length_is_advertised_and_enforced(target_factory):
    t = target_factory("--lun", "mem:16M")
    ini = session(t.port)
    inquiry = struct.pack(">BBBHB", 0x12, 1, 0xB0, 64, 0)
    ini.scsi(inquiry, 64, read=True)
    status, page, _ = ini.read_response()
    assert status == 0 and struct.unpack_from(">I", page, 8)[0] == MAX_TRANSFER_BLOCKS
    too_long = MAX_TRANSFER_BLOCKS + 1
    read16 = struct.pack(">BBQIBB", 0x88, 0, 0, too_long, 0, 0)
    itt = ini.scsi(read16, too_long * 512, read=True)
    expect_check(ini, itt, 0x05, 0x24)  # ILLEGAL REQUEST, INVALID FIELD IN CDB
    write16 = struct.pack(">BBQIBB", 0x8A, 0, 0, too_long, 0, 0)
    itt = ini.scsi(write16, too_long * 512, write=True)
    expect_check(ini, itt, 0x05, 0x24)  # refused at once: no R2T for 8 MiB first
    verify16 = struct.pack(">BBQIBB", 0x8F, 0, 0, too_long, 0, 0)  # BYTCHK 0
    itt = ini.scsi(verify16, 0)
    expect_check(ini, itt, 0x05, 0x24)
    # The limit itself is served.
    ini.scsi(struct.pack(">BBQIBB", 0x88, 0, 0, MAX_TRANSFER_BLOCKS, 0, 0), 8 * MiB, read=True)
    status, got, _ = ini.read_response()
    assert status == 0 and len(got) == 8 * MiB
    ini.close()


# -- login


def test_login_naming_full_feature_phase_as_current_stage_fails(target_factory, image):
    """CSG=3 is no stage a login can be in (RFC 7143 11.12.3): Initiator Error (class 2)."""
    t = target_factory("--lun", str(image[0]))
    ini = MiniInitiator(t.port)
    bhs = bytearray(48)
    bhs[0] = 0x43
    bhs[1] = 0x80 | (3 << 2) | 3  # T, CSG=3, NSG=3
    bhs[8:14] = b"\x80\x00\x00\x01\x02\x03"
    bhs[16:20] = (1).to_bytes(4, "big")
    text = f"InitiatorName=iqn.2024-01.org.zerosend:mini\0TargetName={IQN}\0".encode()
    ini.send(bhs, text)
    rsp, _ = ini.recv()
    assert rsp[0] & 0x3F == 0x23
    assert (rsp[36], rsp[37]) == (0x02, 0x00), f"status {rsp[36]:#x}/{rsp[37]:#x}"
    ini.close()
    assert "invalid login stage CSG=3" in t.log()


# -- task management scope


def tmf(ini: MiniInitiator, function: int) -> int:
    bhs = bytearray(48)
    bhs[0] = 0x42  # immediate TMF request
    bhs[1] = 0x80 | function
    bhs[16:20] = ini.next_itt().to_bytes(4, "big")
    bhs[20:24] = b"\xff\xff\xff\xff"
    bhs[24:28] = ini.cmdsn.to_bytes(4, "big")
    ini.send(bhs)
    rsp, _ = ini.recv()
    assert rsp[0] & 0x3F == OP_TMF_RSP
    return rsp[2]


LUN_RESET, WARM_RESET, COLD_RESET = 5, 6, 7
AUTHORIZATION_FAILED = 6


def _pending_write(ini: MiniInitiator) -> tuple[int, int]:
    """A WRITE waiting for its Data-Out: (ITT, TTT of its R2T)."""
    itt = ini.scsi(write10(8, 8), 4096, write=True)
    bhs, _ = ini.recv()
    assert bhs[0] & 0x3F == OP_R2T
    return itt, int.from_bytes(bhs[20:24], "big")


def test_resets_may_not_reach_other_sessions_by_default(target_factory, image):
    path, _ = image
    t = target_factory("--lun", str(path))
    victim = session(t.port, InitiatorName="iqn.2024-01.org.zerosend:victim")
    itt, ttt = _pending_write(victim)
    other = session(t.port, InitiatorName="iqn.2024-01.org.zerosend:other")
    for function in (WARM_RESET, COLD_RESET):  # (LUN RESET is every nexus's: SAM-5)
        assert tmf(other, function) == AUTHORIZATION_FAILED, function
    # The victim's write is still there and completes.
    victim.data_out(itt, ttt, 0, 0, b"\x11" * 4096, True)
    status, _, _ = victim.read_response()
    assert status == 0
    assert path.read_bytes()[8 * 512 : 16 * 512] == b"\x11" * 4096
    victim.close()
    other.close()
    # (A session alone on the target may reset: test_task_management_answers.)


def test_cross_session_resets_when_configured(target_factory, image):
    path, data = image
    t = target_factory("--lun", str(path), "--cross-session-resets", "on")
    victim = session(t.port, InitiatorName="iqn.2024-01.org.zerosend:victim")
    itt, ttt = _pending_write(victim)
    other = session(t.port, InitiatorName="iqn.2024-01.org.zerosend:other")
    assert tmf(other, LUN_RESET) == 0
    victim.data_out(itt, ttt, 0, 0, b"\x11" * 4096, True)  # for a task that is gone
    victim.nop()  # answered: the aborted write sent no status
    assert path.read_bytes() == data
    victim.close()
    other.close()


# -- VERIFY with BYTCHK=3 off the event loop


class GatedStore(FileStore):
    """An image whose reads wait for a gate, as an uncached disk under load would: what reads
    it on the event loop stops every session until the gate opens."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def read_into(self, offset: int, view: memoryview) -> None:
        if not self.gate.is_set():
            self.waiting.set()
            self.gate.wait(120)
        super().read_into(offset, view)


def test_verify_bytchk3_compares_off_the_event_loop(tmp_path: Path):
    """The comparison reads up to MAXIMUM TRANSFER LENGTH blocks: while they are being read,
    the target answers other PDUs. Before, the scan ran on the event loop, so the NOP below was
    never answered while the read waited."""
    path = tmp_path / "disk.img"
    block = bytes(range(256)) * 2
    path.write_bytes(block * 2048)  # 1 MiB of one repeated block
    store = GatedStore(str(path))
    started: queue.Queue[int] = queue.Queue()
    loop = asyncio.new_event_loop()
    target = Target(TargetConfig(listen="127.0.0.1:0", iqn=IQN, luns=[LunSpec(str(path))]))
    target.luns[0] = LogicalUnit(0, store, IQN)

    async def serve() -> None:
        started.put((await target.start())[1])
        await target.serve()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    try:
        ini = MiniInitiator(started.get(timeout=30))
        ini.login(IQN)
        verify16 = struct.pack(">BBQIBB", 0x8F, 0x06, 0, 2048, 0, 0)  # BYTCHK=3, 2048 blocks
        itt = ini.scsi(verify16, 512, write=True, data=block)
        assert store.waiting.wait(30), "the comparison never read the medium"
        ini.nop()  # answered while the comparison waits for the medium
        store.gate.set()
        status, _, _ = ini.read_response()
        assert status == 0, f"VERIFY ITT {itt:#x}: status {status:#x}"
        # A block that differs: MISCOMPARE, with the offset of the first difference.
        other = bytearray(block)
        other[7] ^= 0xFF
        itt = ini.scsi(verify16, 512, write=True, data=bytes(other))
        bhs, seg = ini.recv()
        assert bhs[3] == 0x02
        sense = seg[2:]
        assert sense[2] & 0x0F == 0x0E and struct.unpack_from(">I", sense, 3)[0] == 7
        ini.close()
    finally:
        store.gate.set()
        loop.call_soon_threadsafe(target.stop)
        thread.join(60)
        loop.close()
        store.close()


# -- commands held for their CmdSN


def test_out_of_order_nop_out_keeps_its_own_data(target_factory, image):
    """A NOP-Out that arrives ahead of its CmdSN is held until the gap is filled; its ping data
    must be what it carried, not what later PDUs left in the reused receive buffer."""
    t = target_factory("--lun", str(image[0]))
    ini = session(t.port)
    gap = ini.cmdsn
    held = bytearray(48)
    held[0], held[1] = 0x00, 0x80  # NOP-Out, not immediate: it takes a CmdSN
    held_itt = ini.next_itt()
    held[16:20] = held_itt.to_bytes(4, "big")
    held[20:24] = b"\xff\xff\xff\xff"
    held[24:28] = (gap + 1).to_bytes(4, "big")
    ping = b"held-ping:" + bytes(range(200))
    ini.send(held, ping)
    for i in range(40):  # immediate pings: about 40 KiB through the receive buffer
        bhs = bytearray(48)
        bhs[0], bhs[1] = 0x40, 0x80
        bhs[16:20] = ini.next_itt().to_bytes(4, "big")
        bhs[20:24] = b"\xff\xff\xff\xff"
        bhs[24:28] = gap.to_bytes(4, "big")
        ini.send(bhs, bytes([i]) * len(ping) * 5)
        rsp, _ = ini.recv()
        assert rsp[0] & 0x3F == 0x20
    ini.cmdsn = gap
    ini.scsi(bytes(6), 0)  # TEST UNIT READY fills the gap: both run now
    ini.cmdsn = gap + 2
    answers = {}
    for _ in range(2):
        rsp, data = ini.recv()
        answers[int.from_bytes(rsp[16:20], "big")] = (rsp[0] & 0x3F, data)
    assert answers[held_itt] == (0x20, ping)
    ini.close()
