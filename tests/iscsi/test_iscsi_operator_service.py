"""The target as a systemd service reports: sd_notify READY, RELOADING (with MONOTONIC_USEC),
READY again or ERRNO for a refused reload, STOPPING, over a plain AF_UNIX datagram to
$NOTIFY_SOCKET (here a socket the test binds); journald's log format; the unit's
Type=notify-reload checked by systemd-analyze."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from iscsi_helpers import IQN, need, run

UNIT = Path(__file__).resolve().parents[2] / "contrib" / "systemd" / "zerosend-iscsi.service"
OLD_SYSTEMD = UNIT.parent / "zerosend-iscsi-systemd252.conf"
INSTALLED_AT = "/usr/local/bin/zerosend-iscsi"
HANG_GUARD = 60.0


class Manager:
    """A stand-in for systemd's notification socket: an abstract AF_UNIX datagram socket."""

    def __init__(self) -> None:
        self.name = f"@zerosend-test-notify-{os.getpid()}-{time.monotonic_ns()}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + self.name[1:].encode())
        self.sock.settimeout(HANG_GUARD)

    def next(self) -> dict[str, str]:
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.split("\n") if line)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def manager():
    m = Manager()
    yield m
    m.close()


def start(
    tmp_path: Path, config: Path, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / f"target-{time.monotonic_ns()}.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "zerosend.iscsi", "--config", str(config), "--iqn", IQN],
            stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env},
        )  # fmt: skip
    return proc, log


def test_ready_reloading_refused_reload_and_stopping(tmp_path: Path, manager: Manager):
    config = tmp_path / "target.toml"
    config.write_text('listen = "127.0.0.1:0"\nluns = ["mem:1M"]\n')
    proc, log = start(tmp_path, config, {"NOTIFY_SOCKET": manager.name})
    try:
        ready = manager.next()
        assert ready["READY"] == "1" and "serving 1 LUNs on 127.0.0.1:" in ready["STATUS"], ready
        port = int(re.search(r"127\.0\.0\.1:(\d+)", ready["STATUS"]).group(1))
        socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD).close()  # it is ready

        config.write_text('listen = "127.0.0.1:0"\nluns = ["mem:1M", "mem:2M"]\n')
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        proc.send_signal(signal.SIGHUP)
        reloading = manager.next()
        assert reloading["RELOADING"] == "1"
        assert before <= int(reloading["MONOTONIC_USEC"])  # the time of the request
        done = manager.next()
        assert done["READY"] == "1" and "serving 2 LUNs" in done["STATUS"] and "ERRNO" not in done

        config.write_text('listen = "127.0.0.1:0"\nluns = ["mem:1M"]\nbufers = 3\n')
        proc.send_signal(signal.SIGHUP)
        assert manager.next()["RELOADING"] == "1"
        refused = manager.next()
        assert refused["READY"] == "1" and refused["ERRNO"] == "22", refused
        assert (
            refused["STATUS"].startswith("reload refused") and "serving 2 LUNs" in refused["STATUS"]
        )

        proc.send_signal(signal.SIGTERM)
        assert manager.next()["STOPPING"] == "1"
        assert proc.wait(HANG_GUARD) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_failed_start_reports_its_reason(tmp_path: Path, manager: Manager):
    config = tmp_path / "target.toml"
    config.write_text('listen = "127.0.0.1:0"\nluns = ["/nonexistent/disk.img"]\n')
    proc, _ = start(tmp_path, config, {"NOTIFY_SOCKET": manager.name})
    assert proc.wait(HANG_GUARD) == 2
    failed = manager.next()
    assert "cannot open LUN image /nonexistent/disk.img" in failed["STATUS"] and failed["ERRNO"]


def test_without_notify_socket_nothing_is_sent(tmp_path: Path):
    """No $NOTIFY_SOCKET (not under systemd): the target runs as before."""
    inq = need("iscsi-inq")
    config = tmp_path / "target.toml"
    config.write_text('listen = "127.0.0.1:0"\nluns = ["mem:1M"]\n')
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    proc, log = start(tmp_path, config, env)
    try:
        deadline = time.monotonic() + HANG_GUARD
        while not (m := re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        out = run([inq, f"iscsi://127.0.0.1:{m.group(1)}/{IQN}/0"]).stdout
        assert "Vendor:ZEROSEND" in out
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(HANG_GUARD) == 0


def test_journald_log_format(tmp_path: Path, manager: Manager):
    """Under journald: no timestamp, a <N> priority prefix per line."""
    config = tmp_path / "target.toml"
    config.write_text('listen = "127.0.0.1:0"\nluns = ["mem:1M"]\n')
    proc, log = start(tmp_path, config, {"NOTIFY_SOCKET": manager.name, "JOURNAL_STREAM": "8:9"})
    try:
        assert manager.next()["READY"] == "1"
        config.write_text('luns = ["mem:1M"]\nbufers = 3\n')
        proc.send_signal(signal.SIGHUP)
        manager.next(), manager.next()  # RELOADING, READY with ERRNO: the error was logged
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(HANG_GUARD) == 0
    lines = log.read_text().splitlines()
    assert any(re.fullmatch(r"<6>listening on 127\.0\.0\.1:\d+ .*", li) for li in lines), lines
    assert any(li.startswith("<3>reload refused") for li in lines), lines
    assert not [li for li in lines if re.match(r"\d{4}-\d\d-\d\d", li)]


def _analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed")
    return path


def _systemd_version() -> int:
    out = subprocess.run(["systemd-analyze", "--version"], capture_output=True, text=True).stdout
    return int(re.search(r"systemd (\d+)", out).group(1))


def _unit(tmp_path: Path, text: str) -> Path:
    program = Path(sys.executable).parent / "zerosend-iscsi"
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(INSTALLED_AT, str(program)))
    return unit


def test_unit_is_notify_reload_and_verifies(tmp_path: Path):
    analyze = _analyze()
    text = UNIT.read_text()
    assert "\nType=notify-reload\n" in text and "ExecReload=" not in text.replace("#", "\n#")
    out = run([analyze, "verify", str(_unit(tmp_path, text))], check=False)
    said = (out.stdout + out.stderr).strip().splitlines()
    if _systemd_version() < 253:  # (notify-reload came with systemd 253)
        assert all("Failed to parse service type, ignoring: notify-reload" in li for li in said), (
            said
        )
    else:
        assert said == []


def test_the_drop_in_for_older_systemd_verifies(tmp_path: Path):
    """The unit as systemd 252 reads it with the drop-in: Type=notify and a SIGHUP reload."""
    analyze = _analyze()
    drop_in = OLD_SYSTEMD.read_text()
    assert "Type=notify\n" in drop_in and "ExecReload=/bin/kill -HUP $MAINPID" in drop_in
    text = UNIT.read_text().replace("Type=notify-reload\n", "")
    text = text.replace("[Install]", drop_in.split("[Service]\n", 1)[1] + "\n[Install]")
    out = run([analyze, "verify", str(_unit(tmp_path, text))], check=False)
    assert (out.stdout + out.stderr).strip() == ""
