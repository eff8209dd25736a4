"""Types that match what is returned: buffers typed with the buffer protocol (a type checker
catches a ``str``), the send awaitable's type exported, ``SendResult`` unpackable, an error base
class, fallback reasons with a code. Under asyncio, uvloop, trio and anyio on both backends."""

from __future__ import annotations

import errno
import pickle
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import zerosend
from tests.helpers import require_backend, require_probed

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
TYPED = ROOT / "tests" / "typed"


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
        pytest.param(("trio", {}), id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    if request.param[1].get("use_uvloop"):
        pytest.importorskip("uvloop")
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    client.setblocking(False)
    yield client, server
    client.close()
    server.close()


def mypy(program: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(program)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard on a loaded machine
        check=False,
    )


def test_mypy_strict_accepts_a_typed_user_program_that_really_runs() -> None:
    checked = mypy(TYPED / "good_program.py")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    ran = subprocess.run(
        [sys.executable, str(TYPED / "good_program.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    assert int(ran.stdout.split()[-1]) > 0


def test_mypy_strict_rejects_a_str_where_a_buffer_goes() -> None:
    program = TYPED / "bad_program.py"
    marked = {
        number
        for number, line in enumerate(program.read_text().splitlines(), 1)
        if line.endswith("# rejected")
    }
    checked = mypy(program)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    reported = {
        int(line.split(":")[1]) for line in checked.stdout.splitlines() if ": error:" in line
    }
    assert reported == marked, checked.stdout


def test_send_result_unpacks_like_a_pair() -> None:
    result = zerosend.SendResult(4096, True)
    nbytes, zerocopy = result
    assert (nbytes, zerocopy) == (4096, True)
    assert zerocopy is True
    assert (result[0], result[1], result[-1], len(result)) == (4096, True, True, 2)
    assert tuple(result) == (4096, True)
    with pytest.raises(IndexError):
        result[2]
    match result:
        case zerosend.SendResult(n, True):
            assert n == 4096
        case _:
            pytest.fail("SendResult did not match by position")


def test_errors_have_a_base_class_and_stay_os_errors() -> None:
    assert issubclass(zerosend.BackendUnavailableError, zerosend.ZerosendError)
    assert issubclass(zerosend.BackendUnavailableError, OSError)
    error = zerosend.BackendUnavailableError(errno.EOPNOTSUPP, "io_uring: disabled")
    assert (error.errno, error.strerror) == (errno.EOPNOTSUPP, "io_uring: disabled")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is zerosend.BackendUnavailableError
    assert copy.errno == errno.EOPNOTSUPP


async def test_backend_refusal_is_a_zerosend_error(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A real refusal from the extension: SO_ZEROCOPY set by someone else."""
    require_probed("native")
    require_backend("msg_zerocopy")
    client, _ = pair
    client.setsockopt(socket.SOL_SOCKET, 60, 1)  # SO_ZEROCOPY, by "other code"
    with pytest.raises(zerosend.ZerosendError) as raised:
        zerosend.wrap(client, backend="msg_zerocopy")
    assert isinstance(raised.value, OSError) and raised.value.errno is not None


async def test_sends_return_the_exported_awaitable_type(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Both kinds of send object: one done inside the call (a copy), one the kernel still holds
    when the call returns (zero-copy, released after delivery)."""
    client, server = pair
    zs = zerosend.wrap(client, backend="copy")
    try:
        copied = zs.send(b"x" * 100)
        assert copied.done()
        assert isinstance(copied, zerosend.SendFuture)
        result = await copied
        assert isinstance(result, zerosend.SendResult)
        assert tuple(result) == (100, False)
    finally:
        await zs.aclose()
    assert server.recv(200) == b"x" * 100


@pytest.mark.parametrize("zc", ["io_uring", "msg_zerocopy"])
async def test_a_send_in_flight_is_a_send_future(
    pair: tuple[socket.socket, socket.socket], zc: str
) -> None:
    require_backend(zc)
    client, server = pair
    zs = zerosend.wrap(client, backend=zc, zerocopy_threshold=0)  # type: ignore[arg-type]
    try:
        sent = zs.send_zc(bytes(64 << 10))
        assert isinstance(sent, zerosend.SendFuture)
        nbytes, zerocopy = await sent
        assert nbytes == 64 << 10
        assert sent.done() and sent.result() == zerosend.SendResult(nbytes, zerocopy)
    finally:
        await zs.aclose()
    del server


async def test_fallback_code_for_a_peer_on_this_host(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    require_probed("native")
    client, _ = pair
    zs = zerosend.wrap(client)
    try:
        assert zs.fallback_code is zerosend.FallbackCode.PEER_ON_THIS_HOST
        assert zs.fallback_code == "peer_on_this_host"
        assert zs.fallback_reason is not None
    finally:
        await zs.aclose()


async def test_no_fallback_code_when_the_backend_was_asked_for(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, _ = pair
    zs = zerosend.wrap(client, backend="copy")
    try:
        assert zs.fallback_code is None
    finally:
        await zs.aclose()


def test_fallback_codes_of_the_core_s_reasons() -> None:
    from zerosend._types import fallback_code

    code = zerosend.FallbackCode
    assert fallback_code(None, True) is None
    assert fallback_code("io_uring: disabled by sysctl", True) is code.KERNEL_REFUSED
    assert fallback_code("anything", False) is code.NO_EXTENSION
