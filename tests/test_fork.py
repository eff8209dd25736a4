"""fork(): the child never touches what it inherited, the parent never notices.

A child shares its parent's epoll set, io_uring and sockets. Real forks, on both zero-copy
backends: the child drops and garbage-collects its copy of a wrapper (which must not remove the
parent's socket from the shared epoll set or reap the parent's completions), finds that using an
inherited wrapper raises an error naming fork, and sends on a socket of its own on a fresh loop;
meanwhile and afterwards the parent's sends, including one in flight across the fork, resolve.
"""

from __future__ import annotations

import asyncio
import gc
import os
import traceback

import pytest

import zerosend
from tests.conftest import read_all, tcp_pair
from tests.zerocopy_backends import ZEROCOPY_BACKENDS

pytestmark = pytest.mark.asyncio

MiB = 1 << 20
#: Guards against a hang only (a stranded send never resolves); not a performance bound.
HANG_GUARD_S = 60


async def child_sends_on_its_own_socket(backend: str) -> None:
    client, server = await tcp_pair()
    received = bytearray()
    reader = asyncio.ensure_future(read_all(server, received))
    zs = zerosend.wrap(client, backend=backend)  # type: ignore[arg-type]
    payload = os.urandom(MiB)
    result = await zs.send_zc(payload)
    assert result.nbytes == MiB
    await zs.aclose()
    await reader
    server.close()
    assert received == payload


def run_child(inherited: zerosend.Socket, backend: str, report: int) -> None:
    """The child's life: never returns (os._exit), writes what went wrong to ``report``."""
    status = 1
    try:
        with pytest.raises(RuntimeError, match="fork"):
            inherited.send_zc(b"x" * 65536)
        with pytest.raises(RuntimeError, match="fork"):
            asyncio.run(inherited.drain())
        del inherited
        gc.collect()  # the wrapper and its buffers go; the parent's epoll set must not change
        asyncio.run(child_sends_on_its_own_socket(backend))
        status = 0
    except BaseException:
        os.write(report, traceback.format_exc().encode())
    finally:
        os._exit(status)


async def wait_child(pid: int, report: int) -> str:
    loop = asyncio.get_running_loop()
    _, status = await loop.run_in_executor(None, os.waitpid, pid, 0)
    chunks = []
    while chunk := os.read(report, 65536):
        chunks.append(chunk)
    os.close(report)
    message = b"".join(chunks).decode()
    assert os.waitstatus_to_exitcode(status) == 0, f"the child failed:\n{message}"
    return message


@pytest.mark.parametrize("zerocopy_backend", ZEROCOPY_BACKENDS)
async def test_child_drops_and_cannot_use_inherited_wrapper_parent_keeps_sending(
    zerocopy_backend: str,
) -> None:
    client, server = await tcp_pair()
    received = bytearray()
    reader = asyncio.ensure_future(read_all(server, received))
    zs = zerosend.wrap(client, backend=zerocopy_backend)  # type: ignore[arg-type]
    sent = bytearray()
    first = os.urandom(MiB)
    await zs.send_zc(first)
    sent += first
    # One send in flight across the fork: the child must leave its completion to the parent.
    across = os.urandom(8 * MiB)
    in_flight = zs.send_zc(across)
    sent += across

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        run_child(zs, zerocopy_backend, write_end)
    os.close(write_end)
    await asyncio.wait_for(wait_child(pid, read_end), HANG_GUARD_S)

    assert (await asyncio.wait_for(in_flight, HANG_GUARD_S)).nbytes == len(across)
    for _ in range(4):
        more = os.urandom(MiB)
        result = await asyncio.wait_for(zs.send_zc(more), HANG_GUARD_S)
        assert result.nbytes == MiB
        sent += more
    await asyncio.wait_for(zs.aclose(), HANG_GUARD_S)
    await asyncio.wait_for(reader, HANG_GUARD_S)
    server.close()
    assert received == sent
