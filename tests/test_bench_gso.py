"""The UDP GSO measurement (``python -m bench.senders.gso``) in a few-second run, so that it
cannot rot: every backend this kernel has runs with and without GSO out of the ifb device, the
zero-copy ones send every byte uncopied, and the section lands between its markers with the
rest of the file kept. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import zerosend
from bench.senders.gso import BEGIN, END, batch_size
from tests.helpers import RIG_UNAVAILABLE, require

ROOT = Path(__file__).resolve().parent.parent


def test_a_gso_batch_is_whole_segments_within_one_datagram() -> None:
    assert batch_size(1472) == 1472 * 44
    assert batch_size(1000) == 1000 * 64  # the kernel's limit of 64 segments
    assert batch_size(65_507) == 65_507


def test_bad_options_are_refused_naming_them() -> None:
    for option, value in (("--segments", "0"), ("--backends", "sendfile")):
        done = subprocess.run(
            [sys.executable, "-m", "bench.senders.gso", option, value],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,  # a hang guard
        )
        assert done.returncode == 2
        assert option in done.stderr


@pytest.mark.slow
def test_quick_run_measures_each_backend_with_and_without_gso(tmp_path: Path) -> None:
    require("rig", RIG_UNAVAILABLE)
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text(f"# Before\n\n{BEGIN}\nSTALE-SECTION\n{END}\n\n# After\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.senders.gso",
            "--quick",
            "--out",
            str(tmp_path),
            "--markdown",
            str(markdown),
            "--segments",
            "1472",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard on a loaded machine
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    report = json.loads((tmp_path / "gso.json").read_text())
    caps = zerosend.capabilities()
    have = {"copy", *(["io_uring"] if caps.io_uring_send_zc else [])}
    have |= {"msg_zerocopy"} if caps.msg_zerocopy else set()
    cells = {(r["backend"], r["mode"]): r for r in report["summary"]}
    assert set(cells) == {(b, m) for b in have for m in ("single", "gso")}
    for (backend, _mode), figs in cells.items():
        # The ifb device never copies: a zero-copy backend's bytes all went uncopied.
        assert figs["zerocopy_fraction"] == (0.0 if backend == "copy" else 1.0), (backend, figs)
    for run in report["runs"]:
        per_send = batch_size(1472) if run["mode"] == "gso" else 1472
        assert run["bytes"] == run["sends"] * per_send
        assert run["backend"] == run["requested"]
    text = markdown.read_text()
    assert text.startswith("# Before\n") and text.endswith("# After\n")
    assert "STALE-SECTION" not in text and "GSO batch per send" in text
