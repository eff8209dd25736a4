"""The wheel users get: built as manylinux abi3 with `make wheel`, installed into a fresh venv."""

from __future__ import annotations

import json
import subprocess
import venv
from pathlib import Path

import pytest

from tests.helpers import CAPS, require_probed

ROOT = Path(__file__).resolve().parent.parent

SMOKE = """
import asyncio, json, socket, zerosend

async def send(backend):
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    client.setblocking(False)
    zs = zerosend.wrap(client, backend=backend)
    result = await zs.send_zc(bytearray(b"z" * 65536))
    chosen = zs.backend
    await zs.aclose()
    got = b""
    while len(got) < 65536:
        got += peer.recv(65536)
    assert got == b"z" * 65536, len(got)
    return [chosen, result.nbytes]

async def main():
    caps = zerosend.capabilities()
    offered = {"io_uring": caps.io_uring_send_zc, "msg_zerocopy": caps.msg_zerocopy}
    asked = ["auto", "copy", *(name for name, ok in offered.items() if ok)]
    backends = {name: await send(name) for name in asked}
    print(json.dumps({"file": zerosend.__file__, "offered": offered, "backends": backends}))

asyncio.run(main())
"""


@pytest.mark.slow
@pytest.mark.timeout(900)  # a release build from scratch, with zig, on a fresh machine
def test_manylinux_wheel_installs_and_works(tmp_path: Path) -> None:
    require_probed("make")
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
    result = json.loads(done.stdout)
    assert result["file"].startswith(str(env_dir)), result["file"]
    # The wheel probes the kernel as the development build does, and every backend it offers
    # really sends; "auto" copies to a peer on this host.
    assert result["offered"] == {
        "io_uring": CAPS.io_uring_send_zc,
        "msg_zerocopy": CAPS.msg_zerocopy,
    }
    expected = {"auto": ["copy", 65536], "copy": ["copy", 65536]}
    expected.update({name: [name, 65536] for name, ok in result["offered"].items() if ok})
    assert result["backends"] == expected
