"""The public API's contract at its edges: capabilities, wrap() arguments, errors."""

from __future__ import annotations

import asyncio
import errno
import gc
import socket

import pytest

import zerosend
from bench.harness.rig import Rig
from tests.helpers import UNAVAILABLE, read_all, tcp_pair


def test_capabilities_report_each_backend_with_reason() -> None:
    caps = zerosend.capabilities()
    assert isinstance(caps.kernel, str) and caps.kernel
    for name in ("io_uring_send_zc", "msg_zerocopy"):
        available = getattr(caps, name)
        reason = getattr(caps, f"{name}_reason")
        assert isinstance(available, bool)
        # A reason exactly when the answer is no.
        assert (reason is None) == available, (name, reason)
    assert "kernel=" in repr(caps)


def test_send_result_is_a_value() -> None:
    a = zerosend.SendResult(10, True)
    assert (a.nbytes, a.zerocopy) == (10, True)
    assert a == zerosend.SendResult(10, True)
    assert a != zerosend.SendResult(10, False)
    assert repr(a) == "SendResult(nbytes=10, zerocopy=True)"
    with pytest.raises(AttributeError):
        a.nbytes = 3  # type: ignore[misc]


@pytest.mark.asyncio
async def test_wrap_rejects_what_it_cannot_send_on() -> None:
    with pytest.raises(TypeError, match=r"socket\.socket"):
        zerosend.wrap(3)  # type: ignore[arg-type]

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        listening.setblocking(False)
        with pytest.raises(ValueError, match="listening"):
            zerosend.wrap(listening)

    with socket.socket() as unconnected:
        unconnected.setblocking(False)
        with pytest.raises(ValueError, match="not connected"):
            zerosend.wrap(unconnected)

    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        with pytest.raises(ValueError, match="AF_INET"):
            zerosend.wrap(a)

    client, server = await tcp_pair()
    with server:
        client.close()
        with pytest.raises(ValueError, match="closed"):
            zerosend.wrap(client)

    client, server = await tcp_pair()
    with client, server:
        client.setblocking(True)
        with pytest.raises(ValueError, match="non-blocking"):
            zerosend.wrap(client)
        client.setblocking(False)
        with pytest.raises(ValueError, match="unknown backend"):
            zerosend.wrap(client, backend="fast")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="zerocopy_threshold"):
            zerosend.wrap(client, zerocopy_threshold=-1)


def test_wrap_needs_a_running_loop() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        with socket.create_connection(server.getsockname()) as client:
            client.setblocking(False)
            with pytest.raises(RuntimeError, match="event loop"):
                zerosend.wrap(client)


@pytest.mark.asyncio
async def test_bad_send_arguments_raise_clear_errors() -> None:
    client, server = await tcp_pair()
    with server:
        zs = zerosend.wrap(client)
        with pytest.raises(TypeError, match="bytes-like"):
            zs.send_zc(12345)
        with pytest.raises(TypeError, match="bytes-like"):
            zs.send_zc("text is not bytes")
        with pytest.raises(TypeError, match="bytes-like"):
            zs.send_zc([b"ok", object()])
        strided = memoryview(bytearray(100))[::2]
        with pytest.raises(ValueError, match="contiguous"):
            zs.send_zc(strided)
        assert zs.inflight == 0
        await zs.aclose()
        assert client.fileno() == -1
        with pytest.raises(OSError) as raised:
            zs.send_zc(b"after close")
        assert raised.value.errno == errno.EBADF
        assert "closed" in str(raised.value)


@pytest.mark.asyncio
async def test_environment_forces_the_auto_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    forced = "msg_zerocopy" if UNAVAILABLE["msg_zerocopy"] is None else "copy"
    client, server = await tcp_pair()
    with client, server:
        # On loopback "auto" would copy; the variable overrides that choice.
        monkeypatch.setenv("ZEROSEND_BACKEND", forced)
        zs = zerosend.wrap(client)
        assert zs.backend == forced
        received = bytearray()
        reader = asyncio.create_task(read_all(server, received))
        result = await asyncio.wait_for(zs.send_zc(bytearray(1 << 20)), 30)
        assert result == zerosend.SendResult(1 << 20, False)
        del zs  # one wrapper per socket at a time
        gc.collect()
        monkeypatch.setenv("ZEROSEND_BACKEND", "turbo")
        with pytest.raises(ValueError, match="ZEROSEND_BACKEND"):
            zerosend.wrap(client)
        # An explicit backend is not overridden.
        monkeypatch.setenv("ZEROSEND_BACKEND", forced)
        assert zerosend.wrap(client, backend="copy").backend == "copy"
        client.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(reader, 30)
        assert len(received) == 1 << 20


@pytest.mark.asyncio
async def test_auto_copies_to_a_peer_on_this_host() -> None:
    # Loopback copies every zero-copy send on delivery, so "auto" copies up front and says why;
    # the rig test checks that a peer behind veth gets the best zero-copy backend.
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            client, server = await tcp_pair(family)
        except OSError:
            continue
        with client, server:
            zs = zerosend.wrap(client)
            assert zs.backend == "copy"
            assert zs.fallback_reason and "this host" in zs.fallback_reason
            del zs
            gc.collect()
            if UNAVAILABLE["io_uring"] is None:
                assert zerosend.wrap(client, backend="io_uring").backend == "io_uring"


@pytest.mark.asyncio
async def test_auto_copies_to_this_hosts_own_non_loopback_address(rig: Rig) -> None:
    # The rig's host-side veth address belongs to this host: the kernel delivers to it locally
    # (and copies) although it is not a loopback address. (test_rig checks that the peer
    # behind the veth pair gets zero-copy.)
    loop = asyncio.get_running_loop()
    with socket.create_server((rig.host_addr, 0)) as listener:
        client = socket.socket()
        client.setblocking(False)
        await loop.sock_connect(client, listener.getsockname())
        zs = zerosend.wrap(client)
        assert zs.backend == "copy"
        assert zs.fallback_reason and "this host" in zs.fallback_reason
        await zs.aclose()
