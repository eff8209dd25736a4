"""A few-second run of the benchmark harness, so that it cannot rot. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import zerosend
from tests.helpers import RIG_UNAVAILABLE, require

ROOT = Path(__file__).resolve().parent.parent
CAPS = zerosend.capabilities()
# Contenders that may be skipped, and only for this reason: a backend this kernel lacks.
MAY_SKIP: dict[str, str] = {}
if not CAPS.io_uring_send_zc:
    MAY_SKIP.update(dict.fromkeys(("zerosend-io_uring", "zerosend-io_uring-pool"), "io_uring"))
    # The anchors drive io_uring themselves (the C copying sender too: IORING_OP_SEND).
    for anchor in ("rust-io_uring", "rust-io_uring-pool", "c-send_zc", "c-send_zc_fixed", "c-send"):
        MAY_SKIP[anchor] = "io_uring"
if not CAPS.msg_zerocopy:
    MAY_SKIP["zerosend-msg_zerocopy"] = "MSG_ZEROCOPY"


def run_quick(tmp_path: Path, *options: str) -> dict[str, Any]:
    """``python -m bench --quick`` into ``tmp_path``; returns its core.json, failure-free."""
    argv = [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path), *options]
    argv += ["--markdown", str(tmp_path / "BENCHMARKS.md")]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    report: dict[str, Any] = json.loads((tmp_path / "core.json").read_text())
    assert report["failures"] == []
    return report


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_quick_run_drives_every_contender(tmp_path: Path) -> None:
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Benchmarks\n\nkept above\n\n<!-- core-bench:begin -->\nstale section\n"
                        "<!-- core-bench:end -->\n\nkept below\n")  # fmt: skip
    report = run_quick(tmp_path)
    config = report["config"]
    cells = {(s, i) for s in config["sizes"] for i in config["inflight"]}
    for contender in config["contenders"]:
        if contender in report["skipped"]:
            hint = MAY_SKIP.get(contender)
            assert hint is not None, f"{contender} was skipped: {report['skipped'][contender]}"
            assert hint in report["skipped"][contender]
            continue
        runs = [r for r in report["runs"] if r["contender"] == contender]
        assert {(r["size"], r["inflight"]) for r in runs} == cells, contender
        for run in runs:
            assert run["bytes"] > 0 and run["sends"] > 0 and run["elapsed"] > 0, run
            counters = run["stats"]
            assert set(counters) == set(zerosend.STATS_KEYS), run
            assert counters["bytes_zerocopy"] + counters["bytes_copied"] == run["bytes"], run

    text = markdown.read_text()
    assert text.startswith("# Benchmarks\n\nkept above\n")
    assert text.rstrip().endswith("kept below")
    assert "stale section" not in text
    assert "sends/s" in text and "CPU seconds per GB" in text
    # The targets and the backend crossover are read from the same run, with a verdict each.
    assert any(t["size"] == 4096 and t["inflight"] == 1 for t in report["targets"])
    assert "### Targets" in text and "| topology | size | in flight |" in text
    assert report["auto"] and all(c["pick"] == "copy" for c in report["auto"])  # loopback
    assert "what `auto` picks" in text


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_quick_run_on_the_true_zero_copy_topology(tmp_path: Path) -> None:
    # The ifb topology measures real zero-copy: every byte of a zero-copy backend's datagrams
    # went uncopied, and the copy backend is the copying reference next to it.
    require("rig", RIG_UNAVAILABLE)
    report = run_quick(tmp_path, "--topologies", "ifb")
    ran = {r["contender"] for r in report["runs"]}
    expected = {"zerosend-copy", "zerosend-auto"}
    if CAPS.io_uring_send_zc:
        expected |= {"zerosend-io_uring", "zerosend-io_uring-pool"}
    if CAPS.msg_zerocopy:
        expected.add("zerosend-msg_zerocopy")
    assert ran == expected
    for run in report["runs"]:
        assert run["size"] <= 65507 and run["bytes"] > 0, run
        # auto copies datagrams at the default threshold (the copy backend); the others never.
        uncopied = 0 if run["backend"] == "copy" else run["bytes"]
        assert run["backend"] == "copy" or run["contender"] != "zerosend-auto", run
        assert run["stats"]["bytes_zerocopy"] == uncopied, run
    assert "### ifb" in (tmp_path / "BENCHMARKS.md").read_text()
