"""Without CAP_IPC_LOCK and with a small RLIMIT_MEMLOCK, the kernel refuses to pin the pages of a
large zero-copy send (io_uring: ENOMEM, MSG_ZEROCOPY: ENOBUFS). The stream must not get a hole:
the send goes by copy and everything arrives."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import pytest

from tests.helpers import require_backend, require_probed

SCRIPT = r"""
import asyncio, json, socket, sys, zerosend

async def main(backend):
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    client = socket.socket()
    client.setblocking(False)
    await loop.sock_connect(client, listener.getsockname())
    server, _ = await loop.sock_accept(listener)
    server.setblocking(False)
    received = bytearray()

    async def read():
        while chunk := await loop.sock_recv(server, 1 << 20):
            received.extend(chunk)

    reader = asyncio.create_task(read())
    zs = zerosend.wrap(client, backend=backend)
    parts = [b"A" * 100, b"B" * (4 << 20), b"C" * 100]
    results = await asyncio.wait_for(asyncio.gather(*(zs.send_zc(p) for p in parts)), 30)
    stats = zs.stats
    await zs.aclose()
    await reader
    print(json.dumps({
        "nbytes": [r.nbytes for r in results],
        "intact": bytes(received) == b"".join(parts),
        "refusals": stats["zerocopy_refusals"],
    }))

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.parametrize("backend", ["io_uring", "msg_zerocopy"])
def test_no_pinnable_memory_falls_back_to_copy(backend: str) -> None:
    require_probed("setpriv")
    require_backend(backend)

    def low_memlock() -> None:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (256 * 1024, 256 * 1024))

    done = subprocess.run(
        ["setpriv", "--bounding-set", "-ipc_lock", "--", sys.executable, "-c", SCRIPT, backend],
        preexec_fn=low_memlock,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["nbytes"] == [100, 4 << 20, 100]
    assert result["intact"], "the peer must receive every byte, in order"
    assert result["refusals"] >= 1, "the 4 MiB send cannot have been pinned under 256 KiB"
