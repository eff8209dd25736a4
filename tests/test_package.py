"""What the installed package is: no developer tooling, a command that only probes, exceptions
that belong to the module they come from."""

from __future__ import annotations

import ast
import errno
import pickle
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import zerosend
from tests.helpers import CAPS, require_probed, tcp_pair
from zerosend._socket import BackendName

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
    # Then auto's thresholds and their source (calibrated / default), and the cache's path.
    assert len(lines) == 1 + len(probed) + 2, done.stdout
    assert lines[-2].startswith("auto, TCP zero-copy threshold: "), done.stdout
    for line, (name, (available, reason)) in zip(lines[1:-2], probed.items(), strict=True):
        label, _, answer = line.partition(" : ")
        assert label.strip() == name
        assert answer == ("yes" if available else f"no ({reason})")


def test_the_vocabulary_comes_from_the_extension_and_the_fallback_matches_it() -> None:
    from zerosend import _fallback

    native = zerosend._native
    assert native.BACKENDS == ("io_uring", "msg_zerocopy", "copy")
    assert zerosend.BACKENDS == ("auto", *native.BACKENDS)
    assert typing.get_args(BackendName) == zerosend.BACKENDS
    assert zerosend.STATS_KEYS == native.STATS_KEYS
    assert (_fallback.BACKENDS, _fallback.STATS_KEYS) == (native.BACKENDS, native.STATS_KEYS)


@pytest.mark.asyncio
async def test_stats_report_every_key_and_only_those() -> None:
    client, server = await tcp_pair()
    with server:
        zs = zerosend.wrap(client)
        await zs.send_zc(b"x")
        assert tuple(zs.stats) == zerosend.STATS_KEYS
        assert zs.stats["sends"] == 1
        await zs.aclose()


def test_the_readme_lists_every_counter() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `zs.inflight`"))
    named = set(re.findall(r"`(\w+)`", row))
    assert named == set(zerosend.STATS_KEYS)


def test_backend_unavailable_error_belongs_to_zerosend_native() -> None:
    require_probed("native")
    error_type = zerosend.BackendUnavailableError
    assert error_type.__module__ == "zerosend._native"
    assert issubclass(error_type, OSError)
    error = error_type(errno.EOPNOTSUPP, 'backend "io_uring" is unavailable: disabled')
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is error_type
    assert (copy.errno, copy.strerror) == (error.errno, error.strerror)
