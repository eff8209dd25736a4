"""What the installed package is: no developer tooling, a command that only probes, exceptions
that belong to the module they come from."""

from __future__ import annotations

import ast
import errno
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import zerosend
from tests.helpers import CAPS

PACKAGE = Path(zerosend.__file__).resolve().parent


def test_the_package_runs_no_system_commands() -> None:
    # The rig (ip netns, nft, writes to /sys) and the demo that builds namespaces live in
    # bench/; nothing a user installs starts processes.
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            if any(name.split(".")[0] == "subprocess" for name in names):
                offenders.append(str(path.relative_to(PACKAGE)))
    assert offenders == []


def test_python_m_zerosend_prints_the_probe() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "zerosend"], capture_output=True, text=True, check=True
    )
    lines = done.stdout.splitlines()
    assert lines[0] == f"kernel {CAPS.kernel}"
    probed = {
        "io_uring SEND_ZC": (CAPS.io_uring_send_zc, CAPS.io_uring_send_zc_reason),
        "MSG_ZEROCOPY": (CAPS.msg_zerocopy, CAPS.msg_zerocopy_reason),
    }
    assert len(lines) == 1 + len(probed), done.stdout
    for line, (name, (available, reason)) in zip(lines[1:], probed.items(), strict=True):
        label, _, answer = line.partition(" : ")
        assert label.strip() == name
        assert answer == ("yes" if available else f"no ({reason})")


def test_backend_unavailable_error_belongs_to_zerosend_native() -> None:
    if zerosend._native.__name__ != "zerosend._native":
        pytest.skip("the native extension is not loaded")
    error_type = zerosend.BackendUnavailableError
    assert error_type.__module__ == "zerosend._native"
    assert issubclass(error_type, OSError)
    error = error_type(errno.EOPNOTSUPP, 'backend "io_uring" is unavailable: disabled')
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is error_type
    assert (copy.errno, copy.strerror) == (error.errno, error.strerror)
