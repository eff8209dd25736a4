"""The wheel users get: built as manylinux abi3 with `make wheel`, installed into a fresh venv."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SMOKE = """
import asyncio, socket, zerosend
async def main():
    loop = asyncio.get_running_loop()
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    client.setblocking(False)
    zs = zerosend.wrap(client)
    result = await zs.send_zc(bytearray(b"z" * 65536))
    await zs.aclose()
    got = b""
    while len(got) < 65536:
        got += peer.recv(65536)
    assert got == b"z" * 65536, len(got)
    print(zerosend.__file__, zs.backend, result.nbytes)
asyncio.run(main())
"""


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_manylinux_wheel_installs_and_works(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        ["make", "-s", "wheel", f"DIST={dist}"], cwd=ROOT, check=True, capture_output=True
    )
    wheels = list(dist.glob("zerosend-*-cp311-abi3-*manylinux*.whl"))
    assert len(wheels) == 1, list(dist.iterdir())
    assert "manylinux2014_x86_64" in wheels[0].name or "manylinux_2_17" in wheels[0].name

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", wheels[0]], check=True
    )
    done = subprocess.run(
        [python, "-c", SMOKE], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    installed_at, backend, nbytes = done.stdout.split()
    assert installed_at.startswith(str(env_dir)), installed_at
    assert backend in {"io_uring", "msg_zerocopy", "copy"}
    assert nbytes == "65536"
    assert sys.version_info >= (3, 11)
