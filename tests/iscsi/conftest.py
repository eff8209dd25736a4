"""Start the real target (``python -m zerosend.iscsi``) on a free loopback port for each test."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

IQN = "iqn.2024-01.org.zerosend:test"


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (Debian: libiscsi-bin / qemu-utils / tgt)")
    return path


@dataclass
class RunningTarget:
    proc: subprocess.Popen[bytes]
    port: int
    iqn: str
    log_path: Path

    def url(self, lun: int | None = 0, auth: str = "", query: str = "") -> str:
        who = f"{auth}@" if auth else ""
        tail = "" if lun is None else f"/{self.iqn}/{lun}"
        return f"iscsi://{who}127.0.0.1:{self.port}{tail}{query}"

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


def start_target(tmp_path: Path, *args: str, iqn: str = IQN) -> RunningTarget:
    log_path = tmp_path / f"target-{time.monotonic_ns()}.log"
    cmd = [sys.executable, "-m", "zerosend.iscsi", "--listen", "127.0.0.1:0", "--iqn", iqn, *args]
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=os.environ.copy())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", log_path.read_text(errors="replace"))
        if m:
            return RunningTarget(proc, int(m.group(1)), iqn, log_path)
        if proc.poll() is not None:
            pytest.fail(f"target exited with {proc.returncode}:\n{log_path.read_text()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"target did not start:\n{log_path.read_text()}")


@pytest.fixture
def target_factory(tmp_path: Path) -> Iterator[Callable[..., RunningTarget]]:
    started: list[RunningTarget] = []

    def factory(*args: str, iqn: str = IQN) -> RunningTarget:
        t = start_target(tmp_path, *args, iqn=iqn)
        started.append(t)
        return t

    yield factory
    for t in started:
        rc = t.stop()
        assert rc == 0, f"target exit status {rc}:\n{t.log()}"
        assert "Traceback" not in t.log(), t.log()


def make_image(path: Path, size: int, seed: int = 1) -> bytes:
    """A file of ``size`` deterministic pseudo-random bytes (distinct per 512-byte block)."""
    import random

    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def run(cmd: list[str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd[0]} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res
