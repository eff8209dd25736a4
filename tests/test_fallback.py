"""Install anywhere: with ``zerosend._native`` hidden, ``import zerosend`` falls back to the
pure-Python copy backend, which keeps the same API and the same contract.

The scenarios live in tests/fallback_contract.py and run in child processes against real
sockets, with the extension and without it; both must pass the same assertions.
"""

from __future__ import annotations

import ast
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import zerosend
from tests.helpers import require_probed

ROOT = Path(__file__).resolve().parent.parent
HIDE = "import tests.hide_native; "
RUN = "from tests.fallback_contract import main; sys.exit(main(*sys.argv[1:]))"
CONTRACT = [
    "ordered_many_in_flight",
    "cancelled_send_still_goes_whole",
    "stream_errors",
    "bad_arguments",
    "udp_datagrams",
    "buffer_pool",
    "fork_leaves_the_parent_alone",
]


def run_scenario(name: str, *, hide_native: bool, loop: str = "asyncio") -> dict[str, Any]:
    prelude = HIDE if hide_native else ""
    code = f"import sys; {prelude}{RUN}"
    done = subprocess.run(
        [sys.executable, "-c", code, name, loop],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard, not a timing assertion
        check=False,
    )
    assert done.returncode == 0, done.stderr
    facts: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return facts


@pytest.mark.parametrize("hide_native", [True, False], ids=["fallback", "native"])
@pytest.mark.parametrize("scenario", CONTRACT)
def test_contract_holds_with_and_without_the_extension(scenario: str, hide_native: bool) -> None:
    run_scenario(scenario, hide_native=hide_native)


def test_fallback_on_uvloop() -> None:
    facts = run_scenario("ordered_many_in_flight", hide_native=True, loop="uvloop")
    assert facts["backend"] == "copy"


def test_fallback_reports_why_and_keeps_the_api() -> None:
    facts = run_scenario("reports_why", hide_native=True)
    assert facts["native_module"] == "zerosend._fallback"
    assert facts["version"] == zerosend.__version__


def test_fallback_stats_have_the_native_keys() -> None:
    native = run_scenario("ordered_many_in_flight", hide_native=False)
    fallback = run_scenario("ordered_many_in_flight", hide_native=True)
    assert fallback["stats_keys"] == native["stats_keys"]
    assert fallback["backend"] == native["backend"] == "copy"


def test_fallback_implements_what_the_python_layer_uses_from_the_extension() -> None:
    # Every name of the extension's stub, except the native send path's own types (the
    # fallback's sends return asyncio futures, and Socket binds its send methods with
    # functools.partial where the driver has no `sender`), so the Python layer never meets a
    # missing attribute (the stub lists nothing of the iSCSI target: zerosend.iscsi._accel).
    from zerosend import _fallback

    stub = ast.parse((ROOT / "python" / "zerosend" / "_native.pyi").read_text())
    (wanted,) = (
        ast.literal_eval(node.value)
        for node in stub.body
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "__all__"
    )
    native_only = {"InFlightSend", "Sender", "FileSender"}
    assert set(wanted) - native_only == set(_fallback.__all__)


def test_iscsi_target_serves_qemu_img_on_the_fallback(tmp_path: Path) -> None:
    """The reference consumer on the copy backend, with the fallback's pure-Python CRC32C."""
    require_probed("iscsi_clients")
    qemu = shutil.which("qemu-img")
    assert qemu is not None
    image, source = tmp_path / "disk.img", tmp_path / "source.raw"
    data = random.Random(1).randbytes(1 << 20)
    image.write_bytes(data)
    fresh = random.Random(2).randbytes(1 << 20)
    source.write_bytes(fresh)
    iqn = "iqn.2024-01.org.zerosend:fallback"
    serve = HIDE + "import runpy; runpy.run_module('zerosend.iscsi', run_name='__main__')"
    log = tmp_path / "target.log"
    args = ["--listen", "127.0.0.1:0", "--iqn", iqn, "--lun", str(image)]
    with log.open("wb") as out:
        target = subprocess.Popen(
            [sys.executable, "-c", serve, *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        port = None
        for _ in range(600):  # the target starts within a few seconds; poll its log meanwhile
            found = re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text())
            if found or target.poll() is not None:
                port = found and int(found.group(1))
                break
            time.sleep(0.05)
        assert port, log.read_text()
        url = f"iscsi://127.0.0.1:{port}/{iqn}/0"
        copy = tmp_path / "copy.raw"
        for argv in (
            [qemu, "convert", "-f", "raw", "-O", "raw", url, str(copy)],
            [qemu, "convert", "-n", "-f", "raw", "-O", "raw", str(source), url],
        ):
            done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
            assert done.returncode == 0, done.stderr + log.read_text()
        assert copy.read_bytes() == data
        assert image.read_bytes() == fresh
    finally:
        target.send_signal(signal.SIGTERM)
        assert target.wait(60) == 0, log.read_text()
    assert "Traceback" not in log.read_text()
