"""The pure-Python fallback imports wherever the pure wheel installs: without the extension's
file (as an install without a build for its platform is) and without POSIX-only modules (as on
Windows), with a ``fallback_reason`` that says so (not Python's "most likely due to a circular
import"), and it still sends."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROGRAM = """
import sys
if sys.argv[1] == "hide_posix":
    import tests.hide_posix
import asyncio, json, socket
import zerosend

async def main():
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    peer, _ = listener.accept()
    client.setblocking(False)
    zs = zerosend.wrap(client)
    nbytes, zerocopy = await zs.send_zc(b"x" * 100000)
    facts = {
        "native": zerosend._native.__name__,
        "reason": zs.fallback_reason,
        "code": zs.fallback_code,
        "capability": zerosend.capabilities().io_uring_send_zc_reason,
        "nbytes": nbytes,
        "zerocopy": zerocopy,
        "fcntl": "fcntl" in sys.modules and sys.modules["fcntl"] is not None,
    }
    await zs.aclose()
    got = b""
    peer.settimeout(60)
    while len(got) < nbytes:
        got += peer.recv(1 << 20)
    facts["received"] = len(got)
    print(json.dumps(facts))

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def package_without_extension(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package's Python files alone, as the pure wheel installs them."""
    root = tmp_path_factory.mktemp("pure")
    shutil.copytree(
        ROOT / "python" / "zerosend",
        root / "zerosend",
        ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"),
    )
    return root


@pytest.mark.parametrize("hide", ["hide_posix", "posix"])
def test_the_fallback_imports_and_says_why(package_without_extension: Path, hide: str) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(package_without_extension), str(ROOT)])
    env.pop("ZEROSEND_BACKEND", None)
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, hide],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard
        check=False,
    )
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout.splitlines()[-1])
    assert facts["native"] == "zerosend._fallback"
    assert facts["fcntl"] is (hide == "posix")
    for reason in (facts["reason"], facts["capability"]):
        assert "circular" not in reason
        assert "zerosend._native is not installed" in reason, reason
        assert sys.platform in reason
    assert facts["code"] == "no_extension"
    assert (facts["nbytes"], facts["zerocopy"], facts["received"]) == (100000, False, 100000)
