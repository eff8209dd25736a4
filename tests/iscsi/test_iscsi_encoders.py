"""The target's per-command pieces that exist once per language, checked against each other:
the Data-In and SCSI Response encoders (Python ``pdu`` / Rust ``zerosend-iscsi``) and the READ
path's inner loop (``readloop.ReadLoop`` / ``IscsiReadPath``), byte for byte."""

from __future__ import annotations

import itertools
import os
import random
import struct
from pathlib import Path

import pytest

from zerosend.iscsi import _native
from zerosend.iscsi._accel import RUN_FIELDS
from zerosend.iscsi.session.readloop import ReadLoop
from zerosend.iscsi.wire import pdu as P

LUNS = [bytes(8), P.encode_lun(1), P.encode_lun(300), bytes(range(1, 9))]
U32_EDGES = [0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]


def _u32s(rnd: random.Random, n: int) -> list[int]:
    return [rnd.choice(U32_EDGES) if rnd.random() < 0.3 else rnd.getrandbits(32) for _ in range(n)]


def test_data_in_headers_match_byte_for_byte():
    rnd = random.Random(13)
    flag_values = [0x00, 0x80, 0x81, 0x83, 0x85, 0xC0, 0xC1, 0x01, 0xFF]
    cases = 0
    for flags, status, dsl, lun in itertools.product(
        flag_values, [0x00, 0x02, 0x08], [0, 1, 512, 8192, 0xFFFFFF], LUNS
    ):
        for _ in range(6):
            itt, statsn, exp, mx, datasn, offset, residual = _u32s(rnd, 7)
            args = (flags, status, dsl, lun, itt, statsn, exp, mx, datasn, offset, residual)
            rs = _native._encode_data_in(*args)
            py = bytearray(100)
            P.data_in_into(py, 52, *args)
            assert py[52:] == rs, f"Data-In {args}"
            assert py[:52] == bytes(52)
            cases += 1
    assert cases > 3000
    # StatSN is reserved without the S bit, in both
    rs = _native._encode_data_in(0x80, 0, 1, bytes(8), 1, 77, 2, 3, 0, 0, 0)
    py = bytearray(48)
    P.data_in_into(py, 0, 0x80, 0, 1, bytes(8), 1, 77, 2, 3, 0, 0, 0)
    assert rs[24:28] == py[24:28] == bytes(4)


def test_scsi_response_headers_match_byte_for_byte():
    rnd = random.Random(17)
    for flags, status, dsl in itertools.product(
        [0, P.RSP_OVERFLOW, P.RSP_UNDERFLOW, 0x80], [0x00, 0x02, 0x08, 0x28], [0, 20, 260]
    ):
        for _ in range(40):
            itt, statsn, exp, mx, expdatasn, residual = _u32s(rnd, 6)
            py = P.scsi_response(itt, status, flags, residual, expdatasn, dsl)
            P.stamp(py, statsn, exp, mx)
            rs = _native._encode_scsi_response(
                flags, status, dsl, itt, statsn, exp, mx, expdatasn, residual
            )
            assert bytes(py) == rs, (flags, status, dsl, itt, statsn, exp, mx, expdatasn)


# -- the READ path's inner loop

BS = 512
BLOCKS = 256


@pytest.fixture
def image(tmp_path: Path) -> tuple[int, bytes]:
    data = random.Random(3).randbytes(BLOCKS * BS)
    path = tmp_path / "image"
    path.write_bytes(data[: (BLOCKS - 8) * BS])  # the LUN claims 8 blocks more than the file has
    fd = os.open(path, os.O_RDONLY)
    yield fd, data
    os.close(fd)


def _command(rnd: random.Random, cmdsn: int, itt: int) -> bytes:
    """A SCSI Command BHS, plain READ most of the time, otherwise off in one random way."""
    bhs = bytearray(48)
    bhs[0] = P.OP_SCSI_CMD
    bhs[1] = 0x80 | P.CMD_READ | 0x01
    blocks = rnd.choice([1, 2, 8, 16, 19, 20, 21, 40])
    lba = rnd.randrange(0, BLOCKS - blocks + 1)
    cdb = (struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0) if rnd.random() < 0.5
           else struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0))  # fmt: skip
    edtl = blocks * BS
    struct.pack_into(">II", bhs, 16, itt, edtl)
    struct.pack_into(">I", bhs, 24, cmdsn)
    bhs[32 : 32 + len(cdb)] = cdb
    if rnd.random() < 0.15:
        flaw = rnd.randrange(9)
        if flaw == 0:
            bhs[0] |= 0x40  # immediate
        elif flaw == 1:
            bhs[1] |= P.CMD_WRITE
        elif flaw == 2:
            bhs[9] = 1  # another LUN
        elif flaw == 3:
            struct.pack_into(">I", bhs, 24, cmdsn + 1)
        elif flaw == 4:
            struct.pack_into(">I", bhs, 20, edtl + BS)  # a residual
        elif flaw == 5:
            bhs[33] = 0x20  # RDPROTECT
        elif flaw == 6:
            bhs[32] = 0xA8  # READ(12)
        elif flaw == 7:
            bhs[7] = 4  # a data segment
        else:
            bhs[0] = P.OP_NOP_OUT
    return bytes(bhs)


def test_inner_loops_agree_on_random_command_streams(image):
    fd, _ = image
    rnd = random.Random(29)
    lun = bytes(8)
    for case in range(300):
        max_len = rnd.choice([4096, 8192, 10240, 20480])
        zc_min = rnd.choice([4096, 10240])
        refer_min = rnd.choice([0xFFFFFFFF, 0xFFFFFFFF, zc_min, 8192])
        args = (fd, lun, BS, BLOCKS, max_len, zc_min, refer_min)
        loops = (_native.IscsiReadPath(*args), ReadLoop(*args))
        cmdsn = rnd.getrandbits(32)
        rx = bytearray(rnd.randbytes(rnd.randrange(0, 3)))  # where the commands start
        start = len(rx)
        for i in range(rnd.randrange(1, 12)):
            rx += _command(rnd, (cmdsn + i) & 0xFFFFFFFF, 0x1000 + i)
        rx += rnd.randbytes(rnd.randrange(0, 47))  # a partial PDU at the end
        size, pos = rnd.choice([(0, 0), (4096, 0), (65536, 100), (65536, 60000), (300000, 7)])
        top = cmdsn + rnd.choice([-1, 0, 2, 127])  # MaxCmdSN: a closed window up to a wide one
        sn = (cmdsn, rnd.getrandbits(32), top & 0xFFFFFFFF)
        outs = [bytearray(b"\xee" * size) for _ in loops]
        runs = [
            loop.serve(rx, start, len(rx), memoryview(out), pos, sn)
            for loop, out in zip(loops, outs, strict=True)
        ]
        native, python = runs
        assert native == python, f"case {case}: {dict(zip(RUN_FIELDS, native, strict=True))}"
        assert outs[0] == outs[1], f"case {case}: the transmit buffers differ"


def test_inner_loop_output_is_data_in_with_the_image_bytes(image):
    fd, data = image
    loop = _native.IscsiReadPath(fd, bytes(8), BS, BLOCKS, 8192, 10240, 0xFFFFFFFF)
    rx = bytearray()
    for i, (lba, blocks) in enumerate([(0, 1), (7, 8), (100, 2)]):
        bhs = bytearray(48)
        bhs[0], bhs[1] = P.OP_SCSI_CMD, 0xC1
        struct.pack_into(">III", bhs, 16, 0x500 + i, blocks * BS, 10 + i)
        bhs[32:42] = struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)
        rx += bhs
    out = bytearray(16384)
    run = dict(zip(RUN_FIELDS, loop.serve(rx, 0, len(rx), out, 0, (10, 1000, 137)), strict=True))
    assert (run["commands"], run["start"], run["nbytes"]) == (3, 144, 11 * BS)
    assert (run["expcmdsn"], run["statsn"], run["maxcmdsn"]) == (13, 1003, 137)  # the caller's
    at = 0
    for i, (lba, blocks) in enumerate([(0, 1), (7, 8), (100, 2)]):
        n = blocks * BS
        want = bytearray(48)
        P.data_in_into(want, 0, 0x81, 0, n, bytes(8), 0x500 + i, 1000 + i, 11 + i, 137, 0, 0, 0)
        assert out[at : at + 48] == want
        assert out[at + 48 : at + 48 + n] == data[lba * BS : lba * BS + n]
        at += 48 + n
    assert run["pos"] == at
