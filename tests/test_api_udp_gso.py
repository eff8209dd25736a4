"""UDP GSO: ``wrap(udp_sock, udp_segment=N)`` makes each send one batch the kernel cuts into
datagrams of N bytes. On loopback the receiver sees the datagrams (every backend, every loop);
out of an ifb device a GSO batch goes without a copy (true zero-copy, root)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

import zerosend
from bench.harness.rig import IfbSink
from tests.helpers import require_backend

pytestmark = pytest.mark.anyio


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
        pytest.param(("trio", {}), id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    if request.param[1].get("use_uvloop"):
        pytest.importorskip("uvloop")
    return request.param


@pytest.fixture(params=["io_uring", "msg_zerocopy", "copy"])
def any_backend(request: pytest.FixtureRequest) -> str:
    require_backend(request.param)
    return str(request.param)


@pytest.fixture
def udp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(60)  # a hang guard
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.connect(receiver.getsockname())
    sender.setblocking(False)
    yield sender, receiver
    sender.close()
    receiver.close()


async def test_a_send_becomes_datagrams_of_the_segment_size(
    udp_pair: tuple[socket.socket, socket.socket], any_backend: str
) -> None:
    sender, receiver = udp_pair
    zs = zerosend.wrap(sender, backend=any_backend, zerocopy_threshold=0, udp_segment=1000)  # type: ignore[arg-type]
    batch = bytes(n % 251 for n in range(10 * 1000 + 500))
    nbytes, _zerocopy = await zs.send_zc(batch)
    assert nbytes == len(batch)
    vectored = [b"a" * 1500, b"b" * 1500]  # one batch from two buffers: 3 datagrams
    await zs.send_zc(vectored)
    await zs.aclose()
    datagrams = [receiver.recv(65535) for _ in range(14)]
    assert [len(d) for d in datagrams] == [1000] * 10 + [500] + [1000] * 3
    assert b"".join(datagrams[:11]) == batch
    assert b"".join(datagrams[11:]) == b"".join(vectored)


async def test_without_udp_segment_a_send_is_one_datagram(
    udp_pair: tuple[socket.socket, socket.socket],
) -> None:
    sender, receiver = udp_pair
    zs = zerosend.wrap(sender, backend="copy")
    await zs.send_zc(bytes(10_500))
    await zs.aclose()
    assert len(receiver.recv(65535)) == 10_500


@pytest.mark.parametrize(
    ("bad", "error"),
    [(0, ValueError), (65508, ValueError), (-1, ValueError), (True, TypeError), ("9", TypeError)],
)
async def test_bad_segment_sizes_are_refused_naming_the_option(
    udp_pair: tuple[socket.socket, socket.socket], bad: object, error: type[Exception]
) -> None:
    sender, _ = udp_pair
    with pytest.raises(error, match="udp_segment"):
        zerosend.wrap(sender, udp_segment=bad)  # type: ignore[arg-type]
    # Nothing was registered by the refused calls: the socket can be wrapped now.
    await zerosend.wrap(sender).aclose()


async def test_udp_segment_on_tcp_is_refused() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        client.setblocking(False)
        with client, pytest.raises(ValueError, match="udp_segment is for UDP"):
            zerosend.wrap(client, udp_segment=1400)


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
async def test_a_gso_batch_out_of_an_ifb_device_is_not_copied(
    ifb: IfbSink, anyio_backend: Any
) -> None:
    require_backend("msg_zerocopy")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((ifb.sink_addr, 5322))
    sock.setblocking(False)
    zs = zerosend.wrap(sock, backend="msg_zerocopy", zerocopy_threshold=0, udp_segment=1400)
    before = ifb.dropped()
    results = [await zs.send_zc(bytearray(64 * 1000)) for _ in range(8)]
    stats = zs.stats
    await zs.aclose()
    assert all(r.zerocopy for r in results), results
    assert stats["bytes_copied"] == 0
    # The ifb takes a GSO batch whole (it is cut into datagrams only where a device needs it;
    # the loopback test sees the datagrams): one packet per send left the device.
    assert ifb.dropped() - before >= len(results)
