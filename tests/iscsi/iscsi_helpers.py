"""Helpers for the iSCSI tests: start the real target (``python -m zerosend.iscsi``) on a free
port (loopback unless told otherwise), run client binaries, make images."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import require

IQN = "iqn.2024-01.org.zerosend:test"


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        hint = "Debian: libiscsi-bin / qemu-utils / tgt"
        require("iscsi_clients", f"{binary} is not installed ({hint})")
    assert path is not None
    return path


@dataclass
class RunningTarget:
    proc: subprocess.Popen[bytes]
    port: int
    iqn: str
    log_path: Path
    host: str = "127.0.0.1"

    def url(self, lun: int | None = 0, auth: str = "", query: str = "") -> str:
        who = f"{auth}@" if auth else ""
        tail = "" if lun is None else f"/{self.iqn}/{lun}"
        return f"iscsi://{who}{self.host}:{self.port}{tail}{query}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                pytest.fail("target did not exit within 30s of SIGTERM")
        return self.proc.returncode


def start_target(
    tmp_path: Path, *args: str, iqn: str = IQN, host: str = "127.0.0.1"
) -> RunningTarget:
    """The target listening on a free port of ``host``."""
    log_path = tmp_path / f"target-{time.monotonic_ns()}.log"
    cmd = [sys.executable, "-m", "zerosend.iscsi", "--listen", f"{host}:0", "--iqn", iqn, *args]
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=os.environ.copy())
    deadline = time.monotonic() + 30
    listening = re.compile(rf"listening on {re.escape(host)}:(\d+)")
    while time.monotonic() < deadline:
        m = listening.search(log_path.read_text(errors="replace"))
        if m:
            return RunningTarget(proc, int(m.group(1)), iqn, log_path, host)
        if proc.poll() is not None:
            pytest.fail(f"target exited with {proc.returncode}:\n{log_path.read_text()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"target did not start:\n{log_path.read_text()}")


def make_image(path: Path, size: int, seed: int = 1) -> bytes:
    """A file of ``size`` deterministic pseudo-random bytes (distinct per 512-byte block)."""
    import random

    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def write10(lba: int, blocks: int, fua: bool = False) -> bytes:
    """A WRITE(10) CDB."""
    return struct.pack(">BBIBHB", 0x2A, 0x08 if fua else 0, lba, 0, blocks, 0)


def read10(lba: int, blocks: int) -> bytes:
    """A READ(10) CDB."""
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def wait_for(condition: Callable[[], object], what: str, timeout: float = 20) -> None:
    """Poll ``condition`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


def send_task_management(
    ini: MiniInitiator, function: int, ref: int = 0xFFFFFFFF, refcmdsn: int = 0, lun: int = 0
) -> None:
    """An immediate Task Management Function Request (its response is the caller's to read)."""
    bhs = bytearray(48)
    bhs[0] = 0x42
    bhs[1] = 0x80 | function
    bhs[9] = lun
    bhs[16:20] = ini.next_itt().to_bytes(4, "big")
    bhs[20:24] = ref.to_bytes(4, "big")  # Referenced Task Tag
    bhs[24:28] = ini.cmdsn.to_bytes(4, "big")
    bhs[28:32] = ini.expstatsn.to_bytes(4, "big")
    bhs[32:36] = refcmdsn.to_bytes(4, "big")
    ini.send(bhs)


def task_management(
    ini: MiniInitiator, function: int, ref: int = 0xFFFFFFFF, refcmdsn: int = 0, lun: int = 0
) -> int:
    """An immediate Task Management Function Request; the response code."""
    send_task_management(ini, function, ref, refcmdsn, lun)
    rsp, _ = ini.recv()
    assert rsp[0] & 0x3F == 0x22, rsp.hex()
    return rsp[2]


def run(
    cmd: list[str], timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd[0]} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


class MiniInitiator:
    """A deliberately small blocking initiator that speaks raw PDUs, for protocol tests that real
    clients cannot express (digests on data, malformed input, CmdSN games)."""

    def __init__(self, port: int, timeout: float = 10.0, sock: socket.socket | None = None) -> None:
        """Connects to ``port`` on loopback, or speaks over ``sock`` (already connected)."""
        self.sock = sock or socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.cmdsn = 1
        self.expstatsn = 0
        self.itt = 0x100
        self.hd = False
        self.dd = False
        self.mrdsl = 8192
        self.isid = b"\x80\x00\x00\x01\x02\x03"  # with the initiator name: the I_T nexus

    def close(self) -> None:
        self.sock.close()

    @staticmethod
    def crc(data: bytes) -> int:
        from zerosend.iscsi._accel import crc32c

        return crc32c(data)

    def send(self, bhs: bytes | bytearray, data: bytes = b"") -> None:
        bhs = bytearray(bhs)
        bhs[5:8] = len(data).to_bytes(3, "big")
        out = bytes(bhs)
        if self.hd:
            out += self.crc(bytes(bhs)).to_bytes(4, "little")
        if data:
            body = data + b"\0" * (-len(data) % 4)
            out += body
            if self.dd:
                out += self.crc(body).to_bytes(4, "little")
        self.sock.sendall(out)

    def recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("target closed the connection")
            buf += chunk
        return buf

    def recv(self) -> tuple[bytes, bytes]:
        bhs = self.recv_exact(48)
        if self.hd:
            digest = int.from_bytes(self.recv_exact(4), "little")
            assert digest == self.crc(bhs), "bad header digest from target"
        dsl = int.from_bytes(bhs[5:8], "big")
        data = b""
        if dsl:
            body = self.recv_exact(dsl + (-dsl % 4))
            if self.dd:
                digest = int.from_bytes(self.recv_exact(4), "little")
                assert digest == self.crc(body), "bad data digest from target"
            data = body[:dsl]
        if bhs[0] & 0x3F in (0x21, 0x22, 0x23, 0x24, 0x26, 0x3F) or (
            bhs[0] & 0x3F == 0x25 and bhs[1] & 0x01
        ):
            self.expstatsn = (int.from_bytes(bhs[24:28], "big") + 1) & 0xFFFFFFFF
        return bhs, data

    def next_itt(self) -> int:
        self.itt += 1
        return self.itt

    def login(self, iqn: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        keys = {
            "InitiatorName": "iqn.2024-01.org.zerosend:mini",
            "TargetName": iqn,
            "SessionType": "Normal",
            "AuthMethod": "None",
            "HeaderDigest": "None",
            "DataDigest": "None",
            "MaxRecvDataSegmentLength": str(self.mrdsl),
            "InitialR2T": "Yes",
            "ImmediateData": "Yes",
        }
        keys.update(extra or {})
        bhs = bytearray(48)
        bhs[0] = 0x43
        bhs[1] = 0x80 | (0 << 2) | 3  # T, CSG security, NSG full feature
        bhs[8:14] = self.isid
        bhs[16:20] = self.next_itt().to_bytes(4, "big")
        bhs[24:28] = self.cmdsn.to_bytes(4, "big")
        text = b"".join(f"{k}={v}".encode() + b"\0" for k, v in keys.items())
        self.send(bhs, text)
        rsp, data = self.recv()
        assert rsp[0] & 0x3F == 0x23, rsp.hex()
        assert rsp[36] == 0, f"login failed with status {rsp[36]:#x}/{rsp[37]:#x}"
        assert rsp[1] & 0x80, "target did not move to full feature phase"
        answers = dict(kv.split("=", 1) for kv in data.decode().split("\0") if kv)
        self.hd = answers.get("HeaderDigest") == "CRC32C"
        self.dd = answers.get("DataDigest") == "CRC32C"
        return answers

    def scsi(self, cdb: bytes, edtl: int, read: bool = False, write: bool = False,
             data: bytes = b"", lun: int = 0, cmdsn: int | None = None) -> int:  # fmt: skip
        bhs = bytearray(48)
        bhs[0] = 0x01
        bhs[1] = 0x80 | (0x40 if read else 0) | (0x20 if write else 0) | 0x01
        bhs[9] = lun
        itt = self.next_itt()
        bhs[16:20] = itt.to_bytes(4, "big")
        bhs[20:24] = edtl.to_bytes(4, "big")
        bhs[24:28] = (self.cmdsn if cmdsn is None else cmdsn).to_bytes(4, "big")
        bhs[28:32] = self.expstatsn.to_bytes(4, "big")
        bhs[32 : 32 + len(cdb)] = cdb
        if cmdsn is None:
            self.cmdsn += 1
        self.send(bhs, data)
        return itt

    def data_out(
        self, itt: int, ttt: int, datasn: int, offset: int, data: bytes, final: bool
    ) -> None:
        bhs = bytearray(48)
        bhs[0] = 0x05
        bhs[1] = 0x80 if final else 0
        bhs[16:20] = itt.to_bytes(4, "big")
        bhs[20:24] = ttt.to_bytes(4, "big")
        bhs[28:32] = self.expstatsn.to_bytes(4, "big")
        bhs[36:40] = datasn.to_bytes(4, "big")
        bhs[40:44] = offset.to_bytes(4, "big")
        self.send(bhs, data)

    def read_response(self) -> tuple[int, bytes, bytes]:
        """Collect Data-In until status: (SCSI status, data, sense)."""
        data = bytearray()
        while True:
            bhs, seg = self.recv()
            op = bhs[0] & 0x3F
            if op == 0x25:
                offset = int.from_bytes(bhs[40:44], "big")
                data[offset : offset + len(seg)] = seg
                if bhs[1] & 0x01:
                    return bhs[3], bytes(data), b""
            elif op == 0x21:
                sense = seg[2:] if seg else b""
                return bhs[3], bytes(data), sense
            else:
                raise AssertionError(f"unexpected PDU opcode {op:#x}")

    def nop(self) -> bytes:
        bhs = bytearray(48)
        bhs[0] = 0x40  # immediate NOP-Out
        bhs[1] = 0x80
        bhs[16:20] = self.next_itt().to_bytes(4, "big")
        bhs[20:24] = b"\xff\xff\xff\xff"
        bhs[24:28] = self.cmdsn.to_bytes(4, "big")
        self.send(bhs, b"ping")
        rsp, data = self.recv()
        assert rsp[0] & 0x3F == 0x20 and data == b"ping"
        return rsp
