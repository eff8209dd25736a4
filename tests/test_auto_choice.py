"""What ``backend="auto"`` and the default zero-copy threshold pick, as the README's "Backends"
section states it (figures in BENCHMARKS.md): copy to a peer on this host; copy for UDP,
whose datagrams never reach the default threshold, unless the threshold is lowered (then
MSG_ZEROCOPY first); io_uring first for TCP; per send, zero-copy from the threshold up."""

from __future__ import annotations

import asyncio
import inspect
import socket

import pytest

import zerosend
from bench.harness.receiver import start_receiver
from bench.harness.rig import IfbSink, Rig
from tests.helpers import CAPS, require_backend, tcp_pair

pytestmark = pytest.mark.asyncio

#: The default threshold: a send of this many bytes or more goes zero-copy.
THRESHOLD = inspect.signature(zerosend.wrap).parameters["zerocopy_threshold"].default
PORT = 5323


def best(*order: str) -> str:
    """The first of ``order`` this kernel offers, else copy."""
    offered = {"io_uring": CAPS.io_uring_send_zc, "msg_zerocopy": CAPS.msg_zerocopy}
    return next((name for name in order if offered[name]), "copy")


async def test_the_default_threshold_is_above_every_datagram() -> None:
    # The rule for UDP below rests on this: at the default, no datagram goes zero-copy.
    assert THRESHOLD > 65_527
    for api in (zerosend.open_connection, zerosend.start_server):
        assert inspect.signature(api).parameters["zerocopy_threshold"].default == THRESHOLD


async def test_sends_below_the_default_threshold_copy_and_from_it_go_zero_copy() -> None:
    require_backend("msg_zerocopy")
    client, server = await tcp_pair()
    with client, server:
        received = bytearray()

        async def read() -> None:
            loop = asyncio.get_running_loop()
            while len(received) < 2 * THRESHOLD - 1:
                received.extend(await loop.sock_recv(server, 1 << 20))

        reader = asyncio.ensure_future(read())
        zs = zerosend.wrap(client, backend="msg_zerocopy")
        await zs.send_zc(bytearray(THRESHOLD - 1))
        stats = zs.stats
        assert stats["bytes_copied_below_threshold"] == THRESHOLD - 1
        assert stats["bytes_zerocopy"] + stats["bytes_copied_by_kernel"] == 0
        await zs.send_zc(bytearray(THRESHOLD))
        stats = zs.stats
        assert stats["bytes_copied_below_threshold"] == THRESHOLD - 1
        # Loopback: the kernel copies it on delivery, but it was sent as a zero-copy send.
        assert stats["bytes_zerocopy"] + stats["bytes_copied_by_kernel"] == THRESHOLD
        await zs.aclose()
        await asyncio.wait_for(reader, 30)


async def test_auto_sends_tcp_to_a_remote_peer_on_io_uring_first(rig: Rig) -> None:
    with start_receiver(rig.peer_addr, PORT, namespace=rig.ns, once=True) as rx:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, (rig.peer_addr, PORT))
        zs = zerosend.wrap(sock)
        assert zs.backend == best("io_uring", "msg_zerocopy"), zs.fallback_reason
        await zs.send_zc(bytearray(THRESHOLD - 1))
        await zs.send_zc(bytearray(THRESHOLD))
        stats = zs.stats
        await zs.aclose()
        report = await asyncio.to_thread(rx.report)
    assert report["bytes"] == 2 * THRESHOLD - 1
    assert stats["bytes_copied_below_threshold"] == THRESHOLD - 1
    if zs.backend != "copy":  # veth copies on delivery: sent zero-copy, copied by the kernel
        assert stats["bytes_zerocopy"] + stats["bytes_copied_by_kernel"] == THRESHOLD


async def udp_socket(ifb: IfbSink) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((ifb.sink_addr, PORT))
    sock.setblocking(False)
    return sock


async def test_auto_copies_datagrams_at_the_default_threshold(ifb: IfbSink) -> None:
    with await udp_socket(ifb) as sock:
        zs = zerosend.wrap(sock)
        assert zs.backend == "copy"
        assert zs.fallback_reason and "datagram" in zs.fallback_reason
        result = await zs.send_zc(bytearray(60000))
        assert (result.nbytes, result.zerocopy) == (60000, False)
        assert zs.stats["bytes_copied_backend"] == 60000
        await zs.aclose()


async def test_auto_sends_datagrams_zero_copy_with_a_lower_threshold(ifb: IfbSink) -> None:
    # The ifb device never copies: a zero-copy datagram comes back zerocopy=True.
    with await udp_socket(ifb) as sock:
        zs = zerosend.wrap(sock, zerocopy_threshold=16384)
        expected = best("msg_zerocopy", "io_uring")
        assert zs.backend == expected, zs.fallback_reason
        small = await zs.send_zc(bytearray(16383))
        large = await zs.send_zc(bytearray(60000))
        stats = zs.stats
        await zs.aclose()
    assert not small.zerocopy and stats["bytes_copied_below_threshold"] == 16383
    assert large.zerocopy == (expected != "copy")
