"""Integrity under buffer reuse on the rig: a receiver in a network namespace behind veth, its
receive work steered to the other CPU, so the kernel releases pages late, as with a real NIC."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

import zerosend
from zerosend._rig import Rig, fill_chunk, rig_unavailable_reason

REASON = rig_unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"rig unavailable: {REASON}")

CHUNK = 1 << 20
CHUNKS = 192
PORT = 5301


async def _send_reusing_one_buffer(host: str, backend: str, *, wait_for_release: bool) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, (host, PORT))
    zs = zerosend.wrap(sock, backend=backend)  # type: ignore[arg-type]
    buf = bytearray(CHUNK)
    pending = []
    for index in range(CHUNKS):
        if wait_for_release:
            fill_chunk(buf, index)
            await zs.send_zc(buf)  # the contract: reuse only after this resolves
        else:
            # The mistake the contract exists to prevent: overwrite the memory while the kernel
            # may still hold it (through a second view, since the export blocks resizing only).
            fill_chunk(memoryview(buf), index)
            pending.append(zs.send_zc(buf))
            await asyncio.sleep(0)
    await asyncio.gather(*pending)
    await zs.aclose()


def _run(backend: str, *, wait_for_release: bool) -> dict[str, object]:
    with Rig() as rig:
        receiver = rig.start_receiver(PORT, "verify", CHUNK)
        try:
            asyncio.run(
                _send_reusing_one_buffer(rig.peer_addr, backend, wait_for_release=wait_for_release)
            )
        finally:
            out, err = receiver.communicate(timeout=120)
        assert receiver.returncode == 0, err
        return json.loads(out.strip().splitlines()[-1])


def test_reusing_the_buffer_after_each_await_never_corrupts(backend: str) -> None:
    result = _run(backend, wait_for_release=True)
    assert result["bytes"] == CHUNK * CHUNKS
    assert result["chunks"] == CHUNKS
    assert result["corrupt"] == [], f"chunks corrupted on the wire: {result['corrupt']}"


@pytest.mark.parametrize("backend", ["io_uring", "msg_zerocopy"])
def test_the_rig_detects_reuse_before_release(backend: str) -> None:
    # Control: the check above can fail. Overwriting the buffer before the kernel released it
    # corrupts chunks on the wire, and the receiver sees it.
    if backend == "io_uring" and not zerosend.capabilities().io_uring_send_zc:
        pytest.skip("io_uring SEND_ZC unavailable")
    if backend == "msg_zerocopy" and not zerosend.capabilities().msg_zerocopy:
        pytest.skip("MSG_ZEROCOPY unavailable")
    result = _run(backend, wait_for_release=False)
    assert result["bytes"] == CHUNK * CHUNKS
    assert result["corrupt"], "reusing a buffer before its release went unnoticed"


def test_pool_buffers_come_back_only_after_release(backend: str) -> None:
    # Buffers go back to the pool as soon as they were handed to send_zc, without awaiting
    # the send: the pool must hold each one until the kernel released it, or the next
    # acquire() would overwrite bytes still on their way.
    async def send(host: str) -> dict[str, int]:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, PORT))
        zs = zerosend.wrap(sock, backend=backend)  # type: ignore[arg-type]
        pool = zerosend.BufferPool(2, CHUNK)
        sends = []
        for index in range(CHUNKS):
            async with pool.acquire() as buf:
                fill_chunk(memoryview(buf), index)
                sends.append(zs.send_zc(buf))
        await asyncio.gather(*sends)
        stats = zs.stats
        await zs.aclose()
        assert pool.available == 2
        return stats

    with Rig() as rig:
        receiver = rig.start_receiver(PORT, "verify", CHUNK)
        try:
            stats = asyncio.run(send(rig.peer_addr))
        finally:
            out, err = receiver.communicate(timeout=120)
        assert receiver.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["chunks"] == CHUNKS
    assert result["corrupt"] == [], f"chunks corrupted on the wire: {result['corrupt']}"
    if backend == "io_uring":
        assert stats["fixed_buffer_sends"] == CHUNKS
