"""The systemd unit in contrib/systemd: systemd's own checker accepts it without a warning, and
its sandbox stays tight (systemd-analyze security, offline)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from iscsi_helpers import run

UNIT = Path(__file__).resolve().parents[2] / "contrib" / "systemd" / "zerosend-iscsi.service"
INSTALLED_AT = "/usr/local/bin/zerosend-iscsi"
# systemd-analyze security's exposure score: 0 (tight) .. 10 (unsandboxed). The unit scores
# 1.9 with systemd 252; a change that loosens the sandbox noticeably fails here.
MAX_EXPOSURE = 2.5


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:  # installed by scripts/install-system-deps.sh: missing means a broken setup
        pytest.fail("systemd-analyze is missing: run scripts/install-system-deps.sh (systemd)")
    return path


@pytest.fixture
def unit_here(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this environment's zerosend-iscsi (verify checks
    that the program exists)."""
    program = Path(sys.executable).parent / "zerosend-iscsi"
    assert program.exists(), f"{program} missing: the package is not installed in this venv"
    text = UNIT.read_text()
    assert INSTALLED_AT in text
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(INSTALLED_AT, str(program)))
    return unit


def test_unit_verifies_without_warnings(unit_here: Path):
    res = run([_systemd_analyze(), "verify", str(unit_here)])
    said = [li for li in (res.stdout + res.stderr).splitlines()
            # systemd before 253 lacks Type=notify-reload (contrib has a drop-in for it)
            if "Failed to parse service type, ignoring: notify-reload" not in li]  # fmt: skip
    assert said == [], res.stdout + res.stderr


def test_verify_catches_a_broken_unit(unit_here: Path):
    """The check above can fail: a misspelt setting makes systemd-analyze speak."""
    unit_here.write_text(unit_here.read_text().replace("NoNewPrivileges=", "NoNewPrivilege="))
    res = run([_systemd_analyze(), "verify", str(unit_here)], check=False)
    assert "NoNewPrivilege" in res.stdout + res.stderr


def test_sandbox_exposure_and_the_settings_the_pool_needs(unit_here: Path):
    res = run(
        [_systemd_analyze(), "security", "--offline=yes", f"--threshold={MAX_EXPOSURE * 10:.0f}",
         "--no-pager", str(unit_here)],
        check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    text = UNIT.read_text()
    for line in (
        "LimitMEMLOCK=infinity",
        "AmbientCapabilities=CAP_IPC_LOCK",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "ReadWritePaths=/var/lib/zerosend-iscsi",
        "Type=notify-reload",  # a reload reports its outcome (kill -HUP could not)
    ):
        assert f"\n{line}\n" in text, line
    syscalls = next(li for li in text.splitlines() if li.startswith("SystemCallFilter="))
    assert "@system-service" in syscalls
    for call in ("io_uring_setup", "io_uring_enter", "io_uring_register"):
        assert call in syscalls
