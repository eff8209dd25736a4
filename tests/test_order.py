"""Many sends in flight on one socket keep their byte order, whatever the kernel does meanwhile.

The stream is numbered: every 8-byte word carries its own index in the stream, so a send that
overtook another, or a part of one resent, shows as the first word out of place. A tiny send
buffer, a small receive buffer and a slow reader keep the socket full, so sends wait for room
and the kernel takes them in many pieces: the situations in which unlinked io_uring requests on
one socket overtake each other.
"""

from __future__ import annotations

import array
import asyncio
import socket

import pytest

import zerosend
from tests.helpers import tcp_pair

pytestmark = pytest.mark.asyncio

KiB = 1 << 10
#: Small, but not below loopback's 64 KiB segments: a receive buffer smaller than one segment
#: makes TCP itself stall on retransmission timeouts.
RECEIVE_BUFFER = 64 * KiB


def numbered(first_word: int, words: int) -> bytes:
    return array.array("Q", range(first_word, first_word + words)).tobytes()


def first_misplaced_word(data: bytes | bytearray) -> int | None:
    words = array.array("Q")
    words.frombytes(bytes(data[: len(data) // 8 * 8]))
    for index, value in enumerate(words):
        if value != index:
            return index
    return None


async def read_slowly(sock: socket.socket, into: bytearray) -> None:
    """Reads in small pieces, yielding to the loop between them, until EOF."""
    loop = asyncio.get_running_loop()
    while chunk := await loop.sock_recv(sock, 3000):
        into += chunk
        await asyncio.sleep(0)


def sizes() -> list[int]:
    """300 sends from 8 B to 200 KiB, in a fixed irregular order."""
    return [8 * (1 + (i * 7919) % (25 * KiB)) for i in range(300)]


async def test_numbered_stream_with_hundreds_in_flight_through_tiny_buffers(backend: str) -> None:
    client, server = await tcp_pair()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * KiB)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    zs = zerosend.wrap(client, backend=backend, zerocopy_threshold=0)
    expected = bytearray()
    futures = []
    word = 0
    for i, size in enumerate(sizes()):
        payload = numbered(word, size // 8)
        word += size // 8
        expected += payload
        if i % 3 == 0:
            # A vectored send (SENDMSG_ZC on io_uring) in three unequal parts.
            third = len(payload) // 3 // 8 * 8
            futures.append(zs.send_zc([payload[:third], payload[third:-8], payload[-8:]]))
        elif i % 5 == 4:
            futures.append(zs.send(payload))  # a copying send, in the same ordered stream
        else:
            futures.append(zs.send_zc(payload))
    received = bytearray()
    reader = asyncio.ensure_future(read_slowly(server, received))
    results = await asyncio.gather(*futures)
    stats = zs.stats
    await zs.aclose()
    await reader
    server.close()
    assert [r.nbytes for r in results] == sizes()
    assert len(received) == len(expected)
    assert first_misplaced_word(received) is None
    assert stats["sends"] == len(sizes())
    assert stats["errors"] == 0


async def test_new_sends_while_a_chain_is_in_flight_stay_behind_it(backend: str) -> None:
    """Sends submitted from completion callbacks, while earlier ones are still in the kernel."""
    client, server = await tcp_pair()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * KiB)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    zs = zerosend.wrap(client, backend=backend, zerocopy_threshold=0)
    size_words = 8 * KiB
    rounds = 40
    received = bytearray()
    reader = asyncio.ensure_future(read_slowly(server, received))
    word = 0
    window: list[asyncio.Future[zerosend.SendResult]] = []
    for _ in range(rounds):
        # Eight in flight; each time the oldest resolves, two more go, in order, behind the rest.
        while len(window) < 8:
            window.append(zs.send_zc(numbered(word, size_words)))
            word += size_words
        await window.pop(0)
    await asyncio.gather(*window)
    await zs.aclose()
    await reader
    server.close()
    assert len(received) == word * 8
    assert first_misplaced_word(received) is None


async def test_datagrams_in_flight_arrive_in_call_order(backend: str) -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    receiver.bind(("127.0.0.1", 0))
    receiver.setblocking(False)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.setblocking(False)
    sender.connect(receiver.getsockname())
    zs = zerosend.wrap(sender, backend=backend, zerocopy_threshold=0)
    count = 200
    datagrams = [numbered(i * 2048, 2048) for i in range(count)]  # 16 KiB each
    await asyncio.gather(*(zs.send_zc(d) for d in datagrams))
    await zs.aclose()
    firsts = []
    while True:
        try:
            data = receiver.recv(65536)
        except BlockingIOError:
            break
        assert data in datagrams, "a datagram arrived altered"
        firsts.append(datagrams.index(data))
    receiver.close()
    # Loopback may drop datagrams when the receiver is full, but never reorders them.
    assert firsts, "no datagram arrived"
    assert firsts == sorted(firsts)
