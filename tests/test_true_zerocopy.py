"""True zero-copy: topologies where the kernel never copies a zero-copy send, so the result must
say ``zerocopy=True`` and the counters must count the bytes as sent without a copy. (Loopback
and a veth peer that receives the data always copy; there ``zerocopy=False`` is the truth.)"""

from __future__ import annotations

import socket

import pytest

import zerosend
from bench.harness.rig import UDP_SEGMENT, IfbSink, Rig

pytestmark = pytest.mark.asyncio

#: Datagram sizes up to the largest UDP/IPv4 allows (sent with a zero-copy threshold of 0).
SIZES = [16384, 60000, 65507] * 4
PORT = 5321


async def send_datagrams(
    host: str, backend: str, sizes: list[int], segment: int = 0
) -> tuple[list[zerosend.SendResult], dict[str, int]]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((host, PORT))
    sock.setblocking(False)
    if segment:
        sock.setsockopt(socket.IPPROTO_UDP, UDP_SEGMENT, segment)
    # Threshold 0: every datagram (all are below the default threshold) goes zero-copy.
    zs = zerosend.wrap(sock, backend=backend, zerocopy_threshold=0)  # type: ignore[arg-type]
    assert zs.backend == backend
    buffers = [bytearray(size) for size in sizes]
    results = [await zs.send_zc(buf) for buf in buffers]
    stats = zs.stats
    await zs.aclose()
    return results, stats


def assert_sent_as_their_backend_says(
    backend: str, sizes: list[int], results: list[zerosend.SendResult], stats: dict[str, int]
) -> None:
    assert [r.nbytes for r in results] == sizes
    total = sum(sizes)
    if backend == "copy":
        assert not any(r.zerocopy for r in results)
        assert stats["bytes_copied_backend"] == total
        return
    assert all(r.zerocopy for r in results), [r.zerocopy for r in results]
    assert stats["bytes_zerocopy"] == total
    assert stats["bytes_copied"] == 0
    assert stats["notifications"] >= 1


async def test_udp_out_of_an_ifb_device_is_never_copied(ifb: IfbSink, backend: str) -> None:
    before = ifb.dropped()
    results, stats = await send_datagrams(ifb.sink_addr, backend, SIZES)
    assert_sent_as_their_backend_says(backend, SIZES, results, stats)
    # Every datagram really left through the device (MTU 65535: one packet each).
    assert ifb.dropped() - before >= len(SIZES)


async def test_segmented_udp_into_the_ingress_drop_is_never_copied(rig: Rig, backend: str) -> None:
    # UDP_SEGMENT: each send leaves as MTU-sized datagrams (a datagram above the MTU would be
    # fragmented, and fragments are copied); the peer's ingress drop frees them uncopied.
    sizes = [60000] * 8
    with rig.ingress_drop() as drop:
        results, stats = await send_datagrams(rig.peer_addr, backend, sizes, segment=1400)
    assert_sent_as_their_backend_says(backend, sizes, results, stats)
    # veth hands the peer each send as one GSO packet; the rule dropped every one.
    assert drop.dropped >= len(sizes)
