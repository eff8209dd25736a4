"""UDP errors on the zero-copy path: dropped datagrams and ICMP errors are neither lost nor
allowed to misnumber MSG_ZEROCOPY completions.

With ``IP_RECVERR`` a datagram that the kernel built, numbered and then dropped (a full qdisc)
fails with ``ENOBUFS``, while the same errno from a refusal to pin memory comes before
numbering. Counting the first kind as unnumbered shifts every later completion onto the wrong
send, whose buffer is then reused while the kernel still reads it. The peer checks every
datagram it gets, and the sender overwrites each buffer the moment its send resolves.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable

import pytest

import zerosend
from bench.harness.rig import Rig
from tests.helpers import RIG_UNAVAILABLE, require, require_probed

pytestmark = pytest.mark.asyncio

IP_RECVERR = 11  # <linux/in.h>; the socket module does not export it
HEADER = struct.Struct("<QI")  # sequence number, CRC-32 of the payload
DATAGRAM = 1400  # below the veth MTU: one datagram, one skb
DATAGRAMS = 4000
IN_FLIGHT = 32
#: Guards against a hang only; not a performance bound.
HANG_GUARD_S = 120

CHECKER = """
import json, socket, struct, sys, zlib
header = struct.Struct("<QI")
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
sock.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
good = bad = 0
while True:
    data = sock.recv(65536)
    if data == b"end":
        break
    seq, crc = header.unpack_from(data)
    if zlib.crc32(data[header.size:]) == crc:
        good += 1
    else:
        bad += 1
print(json.dumps({"good": good, "bad": bad}), flush=True)
"""


def fill(buf: bytearray, seq: int) -> None:
    payload = (seq.to_bytes(8, "little") * (DATAGRAM // 8 + 1))[: DATAGRAM - HEADER.size]
    buf[HEADER.size :] = payload
    HEADER.pack_into(buf, 0, seq, zlib.crc32(payload))


@pytest.mark.timeout(HANG_GUARD_S + 60)  # the hang guard names a stranded send, not pytest
async def test_datagrams_dropped_by_a_full_qdisc_keep_completions_matched(
    zc_backend: str,
) -> None:
    require("rig", RIG_UNAVAILABLE)
    require_probed("tc")
    with Rig() as rig:
        # A slow shaper in front of a two-packet queue: a burst of datagrams overflows it.
        tc = ["tc", "qdisc", "replace", "dev", rig.host_if, "root", "handle", "1:", "tbf"]
        subprocess.run([*tc, "rate", "200mbit", "burst", "16k", "latency", "10ms"], check=True)
        subprocess.run(
            ["tc", "qdisc", "add", "dev", rig.host_if, "parent", "1:1", "pfifo", "limit", "2"],
            check=True,
        )
        port = 9000 + os.getpid() % 1000
        checker = subprocess.Popen(
            rig.command([sys.executable, "-c", CHECKER, rig.peer_addr, str(port)]),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert checker.stdout is not None
        try:
            assert checker.stdout.readline().strip() == "ready"
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_IP, IP_RECVERR, 1)
            sock.setblocking(False)
            sock.connect((rig.peer_addr, port))
            zs = zerosend.wrap(sock, backend=zc_backend, zerocopy_threshold=0)  # type: ignore[arg-type]

            # MSG_ZEROCOPY fails a dropped (numbered) datagram; io_uring cannot tell a drop from
            # a refusal to pin memory (both ENOBUFS) and sends it again after a release.
            def exercised(failed: int) -> bool:
                if zc_backend == "msg_zerocopy":
                    return failed > 0
                return zs.stats["enobufs_waits"] > 0

            sent, _ = await asyncio.wait_for(send_and_overwrite(zs, exercised), HANG_GUARD_S)
            stats = zs.stats
            await zs.aclose()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as plain:
                while checker.poll() is None:
                    try:
                        plain.sendto(b"end", (rig.peer_addr, port))
                    except OSError:
                        pass
                    await asyncio.sleep(0.01)
            summary = json.loads(checker.stdout.read().strip().splitlines()[-1])
        finally:
            checker.kill()
            checker.wait()
    assert summary["good"] > 0
    assert summary["bad"] == 0, f"{summary['bad']} datagrams arrived with reused buffers"
    assert stats["sends"] == sent


async def send_and_overwrite(
    zs: zerosend.Socket, exercised: Callable[[int], bool]
) -> tuple[int, int]:
    """Keeps IN_FLIGHT datagrams going; each buffer is overwritten as soon as its send resolves.
    Sends DATAGRAMS, and on until ``exercised(<sends failed so far>)`` says the qdisc dropped
    some: a sender descheduled on a loaded machine may not outrun the queue at first, but
    will in the end. Returns how many it sent and how many failed with ENOBUFS."""
    free = [bytearray(DATAGRAM) for _ in range(IN_FLIGHT)]
    pending: dict[asyncio.Future[zerosend.SendResult], bytearray] = {}
    dropped = 0
    seq = 0
    while seq < DATAGRAMS or not exercised(dropped):
        assert seq < 100 * DATAGRAMS, "the qdisc dropped nothing: the test exercised no drops"
        if not free:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                buf = pending.pop(future)
                buf[:] = b"\xee" * DATAGRAM  # reuse at once: the kernel released it
                free.append(buf)
                error = future.exception()
                if error is not None:
                    assert isinstance(error, OSError) and error.errno == 105, error
                    dropped += 1
        buf = free.pop()
        fill(buf, seq)
        pending[zs.send_zc(buf)] = buf
        seq += 1
    for future in asyncio.as_completed(list(pending)):
        try:
            await future
        except OSError as error:
            assert error.errno == 105, error
            dropped += 1
    return seq, dropped


async def test_icmp_port_unreachable_fails_the_next_send(backend: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as closed:
        closed.bind(("127.0.0.1", 0))
        target = closed.getsockname()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_IP, IP_RECVERR, 1)
    sock.setblocking(False)
    sock.connect(target)
    zs = zerosend.wrap(sock, backend=backend, zerocopy_threshold=0)  # type: ignore[arg-type]
    # Loopback answers with port unreachable before the first send returns; the driver reads
    # the error queue (for this send's release) and finds the error there too.
    await zs.send_zc(b"a" * 2048)
    with pytest.raises(ConnectionRefusedError):
        await zs.send_zc(b"b" * 2048)
    stats = zs.stats
    await zs.aclose()
    assert stats["truncated_control_messages"] == 0
    if backend == "msg_zerocopy":
        assert stats["queued_errors"] == 1
