"""The copy path twice: the native extension's copy backend and the pure-Python stand-in
(``zerosend._fallback``) run the same histories on real sockets and must agree on every outcome:
what each call returns or raises (exception class and errno), the bytes the peer receives, and
the counters. The histories include the failures: the peer resets the connection, a file is
truncated while ``send_file`` sends it, a socket is closed.

Each history runs in a child process, once as is and once with the extension hidden
(``tests.hide_native``), and prints its outcomes as one JSON line.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import select
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
HIDE = "import tests.hide_native; "
RUN = "from tests.test_copy_path_differential import child; sys.exit(child(sys.argv[1]))"
#: A hang guard for a whole history (a loaded 2-CPU machine), not a timing assertion.
HANG_GUARD_S = 120.0

Outcome = list[Any]


def _error(exc: BaseException) -> Outcome:
    """An exception as the differential compares it: class, errno, and whether its message is
    well formed (no run of blanks: a message split over source lines once carried 22)."""
    code = getattr(exc, "errno", None)
    return [
        type(exc).__name__,
        None if code is None else __import__("errno").errorcode.get(code, code),
        re.search(r"\s{3,}", str(exc)) is None,
    ]


async def _outcome(call: Any) -> Outcome:
    """``call()``'s outcome: raised at the call, or its future's result or exception."""
    try:
        fut = call()
    except Exception as e:
        return ["raised at call", *_error(e)]
    try:
        result = await asyncio.wait_for(fut, HANG_GUARD_S)
    except Exception as e:
        return ["failed", *_error(e)]
    return ["sent", result.nbytes, result.zerocopy]


async def _pair() -> tuple[socket.socket, socket.socket]:
    from tests.helpers import tcp_pair

    return await tcp_pair()


async def _read_all(sock: socket.socket) -> bytes:
    from tests.helpers import read_all

    into = bytearray()
    await asyncio.wait_for(read_all(sock, into), HANG_GUARD_S)
    return bytes(into)


def _digest(data: bytes) -> list[Any]:
    return [len(data), hashlib.sha256(data).hexdigest()]


def _counters(zs: Any) -> dict[str, int]:
    stats = zs.stats
    return {key: stats[key] for key in ("sends", "errors", "bytes_copied", "bytes_zerocopy")}


async def every_kind_of_send() -> dict[str, Any]:
    """Buffers, vectors, empty sends and a file, in order, then a clean close."""
    import zerosend

    client, server = await _pair()
    zs = zerosend.wrap(client, backend="copy")
    reading = asyncio.ensure_future(_read_all(server))
    with tempfile.TemporaryFile() as f:
        f.write(bytes(range(256)) * 1024)
        f.flush()
        outcomes = [
            await _outcome(lambda: zs.send(b"header")),
            await _outcome(lambda: zs.send_zc(bytearray(b"\x01" * 70000))),
            await _outcome(lambda: zs.send_zc([b"a" * 10, memoryview(b"b" * 20000), b""])),
            await _outcome(lambda: zs.send(b"")),
            await _outcome(lambda: zs.send_file(f, 1000, 100000)),
            await _outcome(lambda: zs.send_file(f.fileno(), 0, 0)),
            await _outcome(lambda: zs.send_file(f, 256 * 1024 - 10, 20)),  # past the end
            await _outcome(lambda: zs.send_zc(12345)),
        ]
    counters = _counters(zs)
    await zs.aclose()
    received = await reading
    server.close()
    return {"outcomes": outcomes, "received": _digest(received), "counters": counters}


async def peer_reset() -> dict[str, Any]:
    """The peer resets the connection; the sends after it all fail, the same way."""
    import zerosend

    client, server = await _pair()
    zs = zerosend.wrap(client, backend="copy")
    first = await _outcome(lambda: zs.send(b"before the reset"))
    server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    server.close()
    # The reset has arrived once the socket turns readable (nothing read: the error stays).
    readable, _, _ = select.select([client], [], [], HANG_GUARD_S)
    assert readable, "the reset never arrived"
    outcomes = [first]
    for _ in range(3):
        outcomes.append(await _outcome(lambda: zs.send_zc(bytearray(1 << 16))))
    counters = _counters(zs)
    await zs.aclose()
    return {"outcomes": outcomes, "counters": counters}


async def truncated_file() -> dict[str, Any]:
    """A file is truncated while ``send_file`` sends it: the peer gets the bytes up to the new
    end, the send fails as a stream failure, and so does every send after it."""
    import zerosend

    size, cut = 32 << 20, 16 << 20
    content = bytes(range(251)) * (size // 251 + 1)
    client, server = await _pair()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
    zs = zerosend.wrap(client, backend="copy")
    with tempfile.NamedTemporaryFile() as f:
        f.write(content[:size])
        f.flush()
        # The peer reads nothing yet: the send stalls far before ``cut`` (at most the two
        # socket buffers went), so the truncation comes while it is under way.
        sending = zs.send_file(f, 0, size)
        await asyncio.sleep(0)
        assert zs.inflight == 1
        os.truncate(f.name, cut)
        reading = asyncio.ensure_future(_read_all(server))
        outcomes = [await _outcome(lambda: sending)]
        outcomes.append(await _outcome(lambda: zs.send(b"after the failure")))
        counters = _counters(zs)
        await zs.aclose()
        received = await reading
    server.close()
    assert received == content[: len(received)], "the peer got bytes not from the file"
    return {"outcomes": outcomes, "received": _digest(received), "counters": counters}


async def closed_socket() -> dict[str, Any]:
    """Sends on a socket closed through zerosend, and wrapping it again."""
    import zerosend

    client, server = await _pair()
    zs = zerosend.wrap(client, backend="copy")
    await zs.aclose()
    with tempfile.TemporaryFile() as f:
        f.write(b"x" * 100)
        f.flush()
        outcomes = [
            await _outcome(lambda: zs.send(b"after close")),
            await _outcome(lambda: zs.send_zc([b"a", b"b"])),
            await _outcome(lambda: zs.send_file(f, 0, 10)),
            await _outcome(lambda: zerosend.wrap(client, backend="copy").send(b"x")),
        ]
    received = await _read_all(server)
    server.close()
    return {"outcomes": outcomes, "received": _digest(received), "fileno": client.fileno()}


HISTORIES = {
    "every_kind_of_send": every_kind_of_send,
    "peer_reset": peer_reset,
    "truncated_file": truncated_file,
    "closed_socket": closed_socket,
}


def child(name: str) -> int:
    """Runs one history in this process and prints its outcomes (the parent compares)."""
    import zerosend

    facts = asyncio.run(HISTORIES[name]())
    facts["native_module"] = zerosend._native.__name__
    print(json.dumps(facts))
    return 0


def run(name: str, *, hide_native: bool) -> dict[str, Any]:
    code = f"import sys; {HIDE if hide_native else ''}{RUN}"
    done = subprocess.run(
        [sys.executable, "-c", code, name],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S * 3,  # a hang guard
        check=False,
    )
    assert done.returncode == 0, done.stderr
    facts: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return facts


@pytest.mark.parametrize("history", sorted(HISTORIES))
def test_native_copy_and_fallback_agree(history: str) -> None:
    native = run(history, hide_native=False)
    fallback = run(history, hide_native=True)
    assert (native.pop("native_module"), fallback.pop("native_module")) == (
        "zerosend._native",
        "zerosend._fallback",
    )
    assert native == fallback


def test_a_truncated_file_is_a_stream_failure() -> None:
    """What both must say (the differential alone would accept the same wrong answer)."""
    for hide_native in (False, True):
        facts = run("truncated_file", hide_native=hide_native)
        failed, after = facts["outcomes"]
        assert failed == ["failed", "OSError", "EIO", True], (hide_native, facts)
        assert after == ["raised at call", "OSError", "EIO", True] or after == failed
        assert facts["received"][0] == 16 << 20
