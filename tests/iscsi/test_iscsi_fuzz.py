"""Fuzzing (Hypothesis) the target's parsers: the PDU reader, the READ inner loop (Rust against
its Python twin), login and text negotiation, the SCSI CDB decoder and every opcode of the
command set; and a live target fed malformed PDUs over a socket.

The property everywhere: no exception but the documented protocol errors (``PduError``,
``ConnectionClosed``, ``LoginFailed``, ``NegotiationError``, ``CheckCondition``), and a live
target answers each malformed PDU (Reject, login failure, CHECK CONDITION ...) or closes that
connection with a logged reason, and goes on serving everyone else.

``make test`` runs a fixed number of examples, derandomized (the same ones every run: a
failure reproduces); ``make fuzz`` (``ZEROSEND_FUZZ=long``) runs many more, random ones,
keeping what it finds in .hypothesis/. A crash found becomes an ``@example`` here.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from iscsi_helpers import IQN, MiniInitiator, RunningTarget, make_image, start_target

from tests.helpers import require_probed
from zerosend.iscsi._accel import RUN_FIELDS
from zerosend.iscsi._accel import NativeReadPath as IscsiReadPath
from zerosend.iscsi.scsi.commands import CommandSet
from zerosend.iscsi.scsi.families import command_set as build_command_set
from zerosend.iscsi.scsi.nexus import Nexus
from zerosend.iscsi.scsi.sense import (
    ABORTED_COMMAND,
    DATA_PROTECT,
    ILLEGAL_REQUEST,
    LBA_OUT_OF_RANGE,
    MEDIUM_ERROR,
    MISCOMPARE,
    NOT_READY,
    UNIT_ATTENTION,
    CheckCondition,
)
from zerosend.iscsi.scsi.unit import (
    READ10,
    READ16,
    READ_OPS,
    VERIFY_OPS,
    WRITE_OPS,
    LogicalUnit,
    decode_rw,
)
from zerosend.iscsi.session.login import LoginFailed, LoginMachine
from zerosend.iscsi.session.readloop import ReadLoop
from zerosend.iscsi.storage.opening import open_store
from zerosend.iscsi.wire import pdu as P
from zerosend.iscsi.wire.chap import Credentials
from zerosend.iscsi.wire.params import MAX_BURST, NegotiationError, SessionParams, negotiate
from zerosend.iscsi.wire.reader import ConnectionClosed, PduReader

LONG = os.environ.get("ZEROSEND_FUZZ") == "long"
# Examples per test: a few seconds each in `make test`, minutes in `make fuzz`.
SCALE = 100 if LONG else 1
settings.register_profile(
    "zerosend-fuzz",
    deadline=None,
    derandomize=not LONG,
    database=None if not LONG else settings.default.database,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("zerosend-fuzz")


def examples(n: int) -> settings:
    return settings(max_examples=n * SCALE)


BLOCK = 512
IMAGE_BLOCKS = 64
LUN0 = P.encode_lun(0)


@pytest.fixture(scope="module")
def image_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="zerosend-fuzz-") as d:
        path = Path(d)
        make_image(path / "disk.img", IMAGE_BLOCKS * BLOCK)
        yield path


# ---------------------------------------------------------------- the PDU reader


def _read_all(stream: bytes, login: bool, header_digest: bool, data_digest: bool) -> list[P.Pdu]:
    """Every PDU ``PduReader`` finds in ``stream`` until the protocol error or the end."""

    async def run() -> list[P.Pdu]:
        a, b = socket.socketpair()
        with a, b:
            a.setblocking(False)
            b.sendall(stream)
            b.shutdown(socket.SHUT_WR)
            reader = PduReader(a, 2 * P.BHS_LEN + 64, lambda: None)
            pdus: list[P.Pdu] = []
            try:
                while True:
                    pdus.append(await reader.read_pdu(8192, header_digest, data_digest, login))
            except (P.PduError, ConnectionClosed):
                return pdus
            finally:
                reader.close()

    return asyncio.run(run())


@st.composite
def framed_pdus(draw: st.DrawFn) -> bytes:
    """A PDU with consistent lengths (random contents), or random bytes."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=200))
    bhs = bytearray(draw(st.binary(min_size=P.BHS_LEN, max_size=P.BHS_LEN)))
    ahs = draw(st.binary(max_size=24).map(lambda b: b[: len(b) // 4 * 4]))
    data = draw(st.binary(max_size=300))
    bhs[4] = len(ahs) // 4
    bhs[5:8] = len(data).to_bytes(3, "big")
    return bytes(bhs) + ahs + data + P.pad_for(len(data))


@examples(150)
@given(
    stream=st.lists(framed_pdus(), max_size=4).map(b"".join),
    login=st.booleans(),
    header_digest=st.booleans(),
    data_digest=st.booleans(),
)
def test_pdu_reader_raises_only_protocol_errors(stream, login, header_digest, data_digest):
    for pdu in _read_all(stream, login, header_digest, data_digest):
        ahs_len, dsl = P.header_lengths(pdu.bhs)
        assert len(pdu.bhs) == P.BHS_LEN and len(pdu.ahs) == ahs_len and len(pdu.data) == dsl
        assert dsl <= 8192 and not (login and pdu.opcode != P.OP_LOGIN_REQ)


@examples(200)
@given(data=st.binary(max_size=300))
@example(data=b"=x\0")
@example(data=b"Key\0")
@example(data=b"K=\xff\0")
def test_text_segments_parse_or_raise_pdu_error(data):
    try:
        pairs = P.parse_text(data)
    except P.PduError as e:
        assert e.reason == P.REJECT_INVALID_FIELD
        return
    assert P.parse_text(P.build_text(pairs)) == pairs


@examples(200)
@given(field=st.binary(min_size=8, max_size=8))
def test_lun_fields_decode(field):
    lun = P.decode_lun(field)
    assert -1 <= lun < 1 << 14
    if lun >= 0:
        assert P.decode_lun(P.encode_lun(lun)) == lun


# ---------------------------------------------------------------- the READ inner loop


@st.composite
def read_runs(draw: st.DrawFn) -> tuple[bytes, int, int]:
    """A receive buffer of READ commands, mostly plain, mutated here and there."""
    expcmdsn = draw(st.sampled_from([0, 1, 0xFFFFFFFE, draw(st.integers(0, 0xFFFFFFFF))]))
    out = bytearray()
    for i in range(draw(st.integers(0, 6))):
        bhs = bytearray(P.BHS_LEN)
        bhs[0], bhs[1] = P.OP_SCSI_CMD, P.F_FINAL | P.CMD_READ | 1
        bhs[8:16] = LUN0
        struct.pack_into(">III", bhs, 16, i, 0, (expcmdsn + i) & 0xFFFFFFFF)
        lba = draw(st.integers(0, IMAGE_BLOCKS + 2))
        blocks = draw(st.integers(0, IMAGE_BLOCKS))
        if draw(st.booleans()):
            struct.pack_into(">BBIBHB", bhs, 32, READ10, 0, lba, 0, blocks, 0)
        else:
            struct.pack_into(">BBQIBB", bhs, 32, READ16, 0, lba, blocks, 0, 0)
        struct.pack_into(">I", bhs, 20, blocks * BLOCK)
        for at, value in draw(st.lists(st.tuples(st.integers(0, 47), st.integers(0, 255)),
                                       max_size=2)):  # fmt: skip
            bhs[at] = value
        out += bhs
    out += draw(st.binary(max_size=60))
    start = draw(st.integers(0, len(out)))
    return bytes(out), start, expcmdsn


@pytest.fixture
def rust_read_loop() -> None:
    """The pure-Python install has no Rust loop to compare."""
    require_probed("native")


@pytest.mark.usefixtures("rust_read_loop")
@examples(300)
@given(
    run=read_runs(),
    out_size=st.sampled_from([0, 47, 48, 560, 4096, 40000]),
    pos=st.integers(0, 100),
    max_len=st.sampled_from([512, 4096, 32768]),
    zc_min=st.sampled_from([512, 10240]),
    refer_min=st.sampled_from([0, 4096, 0xFFFFFFFF]),
    window=st.integers(1, 256),
    statsn=st.integers(0, 0xFFFFFFFF),
)
def test_rust_and_python_read_loops_agree(
    image_dir, run, out_size, pos, max_len, zc_min, refer_min, window, statsn
):
    rx, start, expcmdsn = run
    pos = min(pos, out_size)
    sn = (expcmdsn, statsn, (expcmdsn + window - 1) & 0xFFFFFFFF)
    with open(image_dir / "disk.img", "rb") as f:
        args = (f.fileno(), LUN0, BLOCK, IMAGE_BLOCKS, max_len, zc_min, refer_min)
        outs, runs = [], []
        for kind in (IscsiReadPath, ReadLoop):
            out = bytearray(b"\xee" * out_size)
            result = kind(*args).serve(bytearray(rx), start, len(rx), out, pos, sn)
            outs.append(out)
            runs.append(dict(zip(RUN_FIELDS, result, strict=True)))
    assert runs[0] == runs[1]
    assert outs[0] == outs[1]
    assert start <= runs[0]["start"] <= len(rx)


# ---------------------------------------------------------------- login and negotiation

KEYS = (
    "InitiatorName", "TargetName", "SessionType", "AuthMethod", "HeaderDigest", "DataDigest",
    "MaxConnections", "InitialR2T", "ImmediateData", "MaxRecvDataSegmentLength",
    "MaxBurstLength", "FirstBurstLength", "DefaultTime2Wait", "DefaultTime2Retain",
    "MaxOutstandingR2T", "DataPDUInOrder", "DataSequenceInOrder", "ErrorRecoveryLevel",
    "IFMarker", "OFMarker", "IFMarkInt", "iSCSIProtocolLevel", "TaskReporting", "TargetAlias",
    "CHAP_A", "CHAP_N", "CHAP_R", "CHAP_I", "CHAP_C", "X-com.example.key", "Unknown",
)  # fmt: skip
VALUES = st.one_of(
    st.sampled_from([
        "Yes", "No", "None", "CRC32C", "CRC32C,None", "CHAP", "CHAP,None", "None,CHAP", "5",
        "0", "-1", "0x10", "1", "2", "512", "65536", "16777215", "16777216", "Normal",
        "Discovery", IQN, "iqn.2024-01.org.zerosend:fuzz", "", "0x" + "ab" * 16, "0bAAAA",
        "alice", "Irrelevant", "Reject", "NotUnderstood",
    ]),
    st.text(max_size=12),
)  # fmt: skip
PAIRS = st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=8)


@dataclass
class Policy:
    iqn: str = IQN
    chap: Credentials | None = None
    mutual_chap: Credentials | None = None
    allow: frozenset[str] = frozenset()
    acls: tuple[()] = ()
    discovery_chap: Credentials | None = None


POLICIES = st.sampled_from([
    Policy(),
    Policy(chap=Credentials("alice", "a-long-secret-1")),
    Policy(chap=Credentials("alice", "a-long-secret-1"),
           mutual_chap=Credentials("target", "another-secret-2")),
    Policy(allow=frozenset({"iqn.2024-01.org.zerosend:fuzz"})),
])  # fmt: skip


# The keys a login that can succeed starts with; the fuzzer adds, drops and garbles from there.
GOOD_START = [
    ("InitiatorName", "iqn.2024-01.org.zerosend:fuzz"),
    ("TargetName", IQN),
    ("SessionType", "Normal"),
    ("AuthMethod", "None,CHAP"),
]
CHAP_ANSWER = [("CHAP_A", "5"), ("CHAP_N", "alice"), ("CHAP_R", "0x" + "00" * 16)]


@st.composite
def login_requests(draw: st.DrawFn) -> P.Pdu:
    bhs = bytearray(P.BHS_LEN)
    bhs[0] = draw(st.sampled_from([0x43] * 8 + [0x03, draw(st.integers(0, 255))]))
    # T with CSG/NSG security->operational, security->full, operational->full; C; garbage
    bhs[1] = draw(st.sampled_from([0x81, 0x87, 0x83, 0x85, 0x81, 0x87, 0x40, 0x04, 0xC1,
                                   draw(st.integers(0, 255))]))  # fmt: skip
    bhs[3] = draw(st.sampled_from([0] * 9 + [1]))
    bhs[8:14] = draw(st.sampled_from([b"\x80\0\0\1\2\3"] * 4 + [bytes(6)]))
    bhs[14:16] = draw(st.sampled_from([b"\0\0"] * 9 + [b"\0\1"]))
    bhs[16:48] = draw(st.binary(min_size=32, max_size=32))
    kind = draw(st.integers(0, 9))
    if kind == 0:
        data = draw(st.binary(max_size=100))
    else:
        base = GOOD_START if kind < 6 else CHAP_ANSWER if kind < 8 else []
        pairs = [p for p in base if draw(st.integers(0, 9))] + draw(PAIRS)
        data = P.build_text(pairs)
    return P.Pdu(bytes(bhs), b"", data)


@examples(400)
@given(policy=POLICIES, requests=st.lists(login_requests(), min_size=1, max_size=5))
def test_login_answers_or_fails_with_a_status(policy, requests):
    machine = LoginMachine(policy)
    for req in requests:
        try:
            hdr, data = machine.step(req)
        except LoginFailed as e:
            assert e.status[0] in (0x02, 0x03) and str(e)
            event(f"login failed {e.status[0]:#x}/{e.status[1]:#x}")
            return
        assert len(hdr) == P.BHS_LEN and hdr[0] == P.OP_LOGIN_RSP
        assert int.from_bytes(hdr[5:8], "big") == len(data)
        P.parse_text(data)  # what the target answers is well-formed text
        if machine.done:
            event("full feature phase reached")
            st_ = machine.state
            assert st_.initiator
            assert st_.authenticated or policy.chap is None
            assert not policy.allow or st_.initiator in policy.allow
            return


@examples(400)
@given(pairs=PAIRS, discovery=st.booleans())
def test_negotiation_stays_in_rfc_ranges(pairs, discovery):
    params = SessionParams()
    try:
        answers = negotiate(params, pairs, discovery)
    except NegotiationError as e:
        assert str(e)
        return
    assert len(answers) <= len(pairs)
    assert 512 <= params.initiator_max_recv_dsl <= 16777215
    assert 512 <= params.first_burst <= params.max_burst <= MAX_BURST
    assert params.max_connections == 1 and params.error_recovery_level == 0
    assert params.max_outstanding_r2t == 1


# ---------------------------------------------------------------- SCSI CDBs


@pytest.fixture(scope="module")
def command_set(image_dir: Path) -> Iterator[tuple[CommandSet, LogicalUnit]]:
    store = open_store(str(image_dir / "disk.img"))
    luns = {0: LogicalUnit(0, store, IQN), 1: LogicalUnit(1, open_store("mem:64K"), IQN)}
    yield build_command_set(luns), luns[0]
    for lu in luns.values():
        lu.store.close()


CDBS = st.tuples(st.integers(0, 255), st.binary(min_size=15, max_size=31)).map(
    lambda t: bytes((t[0],)) + t[1]
)


FUZZ_NEXUS = Nexus("iqn.2024-01.org.zerosend:fuzz", bytes(6))


@examples(1500)
@given(cdb=CDBS, no_lun=st.booleans())
@example(cdb=bytes((0x12, 0x01, 0xB0)) + bytes(13), no_lun=True)
@example(cdb=bytes((0xA0,)) + bytes(15), no_lun=False)
def test_every_opcode_returns_data_or_check_condition(command_set, cdb, no_lun):
    commands, lu = command_set
    try:
        data = commands.execute(None if no_lun else lu, cdb, FUZZ_NEXUS)
    except CheckCondition as cc:
        assert cc.key in (ILLEGAL_REQUEST, DATA_PROTECT, MEDIUM_ERROR, MISCOMPARE,
                          NOT_READY, UNIT_ATTENTION, ABORTED_COMMAND)  # fmt: skip
        return
    assert isinstance(data, bytes)


RW_OPS = sorted(READ_OPS | WRITE_OPS | VERIFY_OPS)


@examples(300)
@given(op=st.sampled_from(RW_OPS), rest=st.binary(min_size=15, max_size=15))
def test_rw_cdbs_decode_to_sane_ranges(command_set, op, rest):
    _, lu = command_set
    rw = decode_rw(bytes((op,)) + rest)
    assert 0 <= rw.lba < 1 << 64 and 0 <= rw.blocks < 1 << 32 and 0 <= rw.flags < 256
    try:
        lu.check_range(rw.lba, rw.blocks)
    except CheckCondition as cc:
        assert (cc.asc, cc.ascq) == LBA_OUT_OF_RANGE
    else:
        assert rw.lba + rw.blocks <= IMAGE_BLOCKS


# ---------------------------------------------------------------- a live target


@pytest.fixture(scope="module")
def live_target(image_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    t = start_target(tmp_path_factory.mktemp("fuzz-target"), "--lun", str(image_dir / "disk.img"))
    yield t
    rc = t.stop()
    log = t.log()
    assert rc == 0, log
    assert "Traceback" not in log and "internal error" not in log, log


INITIATOR_OPS = (P.OP_NOP_OUT, P.OP_SCSI_CMD, P.OP_TMF_REQ, P.OP_LOGIN_REQ, P.OP_TEXT_REQ,
                 P.OP_DATA_OUT, P.OP_LOGOUT_REQ, P.OP_SNACK)  # fmt: skip
PING_ITT = 0x7EA57EA5
# What the log says when the target closes a connection on purpose.
CLOSE_REASONS = ("closing", "protocol error", "logout", "rejected", "before login",
                 "closed by initiator", "bad PDU")  # fmt: skip


@st.composite
def malformed_pdus(draw: st.DrawFn) -> bytes:
    """One PDU with consistent framing and a random header: an initiator opcode (sometimes
    any), random flags, fields and CDB, a small AHS and data segment."""
    bhs = bytearray(draw(st.binary(min_size=P.BHS_LEN, max_size=P.BHS_LEN)))
    op = draw(st.sampled_from([*INITIATOR_OPS, draw(st.integers(0, 63))]))
    bhs[0] = op | draw(st.sampled_from([0, 0x40]))
    if draw(st.booleans()):
        bhs[8:16] = draw(st.sampled_from([LUN0, P.encode_lun(1), bytes(8)]))
    if op == P.OP_SCSI_CMD and draw(st.booleans()):  # a READ/WRITE/VERIFY CDB inside the LUN
        code = draw(st.sampled_from(RW_OPS))
        rest = struct.pack(">QI", draw(st.integers(0, IMAGE_BLOCKS)), draw(st.integers(0, 4)))
        bhs[32:48] = bytes((code, 0)) + rest + bytes(2)
        struct.pack_into(">I", bhs, 20, draw(st.sampled_from([0, 512, 1024, 4096])))
    ahs = draw(st.sampled_from([b"", b"", bytes((0, 5, 1, 0)) + bytes(4), bytes(300)]))
    data = draw(st.binary(max_size=64))
    bhs[4] = len(ahs) // 4
    bhs[5:8] = len(data).to_bytes(3, "big")
    return bytes(bhs) + ahs + data + P.pad_for(len(data))


def _ping(ini: MiniInitiator) -> None:
    bhs = bytearray(P.BHS_LEN)
    bhs[0], bhs[1] = 0x40 | P.OP_NOP_OUT, P.F_FINAL
    struct.pack_into(">IIII", bhs, 16, PING_ITT, P.NO_TAG, ini.cmdsn, ini.expstatsn)
    ini.send(bhs)


def _answered_or_closed(t: RunningTarget, ini: MiniInitiator, logged_in: bool) -> str:
    """Read until the ping's answer ("answered") or the end of the connection ("closed")."""
    peer = f"127.0.0.1:{ini.sock.getsockname()[1]}"
    try:
        while True:
            bhs, _ = ini.recv()
            assert bhs[0] & 0x3F in (0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x31, 0x32, 0x3F)
            if not logged_in:
                assert bhs[0] & 0x3F in (P.OP_LOGIN_RSP, P.OP_REJECT), bhs.hex()
            if bhs[0] & 0x3F == P.OP_NOP_IN and struct.unpack_from(">I", bhs, 16)[0] == PING_ITT:
                return "answered"
    except (ConnectionError, OSError):
        pass
    lines = [li for li in t.log().splitlines() if peer in li]
    assert any(r in li for li in lines for r in CLOSE_REASONS), lines
    assert not [li for li in lines if "internal error" in li], lines
    return "closed"


@examples(40)
@given(pdu=malformed_pdus(), login_first=st.sampled_from([True, True, True, False]))
@example(pdu=bytes((0x06 | 0x40, 0x80)) + bytes(46), login_first=True)  # a logout
def test_live_target_answers_malformed_pdus(live_target, pdu, login_first):
    t = live_target
    ini = MiniInitiator(t.port, timeout=30)
    try:
        if login_first:
            ini.login(IQN)
        ini.sock.sendall(pdu)
        _ping(ini)
        event(_answered_or_closed(t, ini, login_first))
    finally:
        ini.close()
    # Everyone else is still served.
    check = MiniInitiator(t.port, timeout=30)
    try:
        check.login(IQN)
        check.nop()
    finally:
        check.close()
    assert t.proc.poll() is None, t.log()


def _write10_pdu(flags: int, edtl: int, data: bytes) -> bytes:
    bhs = bytearray(P.BHS_LEN)
    bhs[0], bhs[1] = P.OP_SCSI_CMD, flags
    struct.pack_into(">II", bhs, 16, 7, edtl)
    bhs[32:42] = struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0)
    bhs[5:8] = len(data).to_bytes(3, "big")
    return bytes(bhs) + data


# Crashes found (the first minimized by `make fuzz` from the live test above, the others its
# neighbours): immediate data past EDTL, or a WRITE PDU without the W bit, ended the connection
# with an internal error. Kept as regression tests.
KNOWN_CRASHES = [
    pytest.param(
        bytes((0x41, 0, 0, 0, 0, 0, 0, 1)) + bytes(24) + b"*" + bytes(15) + bytes(4),
        id="immediate-write10-one-data-byte-no-W-bit-edtl-0",
    ),
    pytest.param(_write10_pdu(P.F_FINAL | 1, 512, bytes(512)), id="write-without-W-bit"),
    pytest.param(
        _write10_pdu(P.F_FINAL | P.CMD_WRITE | 1, 512, bytes(1024)), id="immediate-data-past-edtl"
    ),
]


@pytest.mark.parametrize("pdu", KNOWN_CRASHES)
def test_known_malformed_writes_are_answered(image_dir, tmp_path, pdu):
    t = start_target(tmp_path, "--lun", str(image_dir / "disk.img"))
    try:
        ini = MiniInitiator(t.port, timeout=30)
        try:
            ini.login(IQN)
            ini.sock.sendall(pdu[:24] + ini.cmdsn.to_bytes(4, "big") + pdu[28:])
            _ping(ini)
            _answered_or_closed(t, ini, True)
        finally:
            ini.close()
    finally:
        assert t.stop() == 0, t.log()
