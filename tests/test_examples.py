"""Every program in examples/ runs to its end on loopback and says so (each checks its own
bytes and exits non-zero if they differ)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import require_probed

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

RUNS = [
    ("asyncio_streams.py",),
    ("asyncio_streams.py", "--uvloop"),
    ("pool_send_zc.py",),
    ("trio_send_stream.py",),
    ("anyio_send_stream.py", "asyncio"),
    ("anyio_send_stream.py", "trio"),
]


def test_every_example_is_run_here() -> None:
    assert {run[0] for run in RUNS} == {p.name for p in EXAMPLES.glob("*.py")}


@pytest.mark.parametrize("run", RUNS, ids=[" ".join(r) for r in RUNS])
def test_example_runs(run: tuple[str, ...]) -> None:
    if "--uvloop" in run:
        require_probed("uvloop")
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / run[0]), *run[1:]],
        cwd=EXAMPLES.parent,
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard on a loaded machine
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "done" in done.stdout.splitlines()[-1]
