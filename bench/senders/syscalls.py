"""System calls per send, counted with ``strace`` over the sending span of one sender run.

Every sender (Python, Rust, C) calls ``getrusage(RUSAGE_SELF)`` exactly when its clock starts
and when it stops, so the calls between the first two ``getrusage`` lines of its trace are the
sending span's: interpreter start-up and imports are not counted. ``strace -f`` follows every
thread. Tracing slows the sender (each call stops it twice), which tends to batch more
completions per wake-up; read the figure as calls per send of the traced run, beside the C
anchor traced the same way in the same round.

    python -m bench.senders.syscalls [--size 1M] [--inflight 8] [--seconds 1] [--topology rig]
                             [--contenders zerosend-io_uring,c-send_zc_fixed,...]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

#: The issue's target: at most this many system calls per 1 MiB send at 8 in flight.
TARGET = 0.6
#: The cell the target speaks of.
TARGET_CELL = ("rig", 1 << 20, 8)
#: The contenders traced by default: zerosend's io_uring paths and the C anchors.
DEFAULT_CONTENDERS = ("zerosend-io_uring", "zerosend-io_uring-pool", "c-send_zc", "c-send_zc_fixed")

_CALL = re.compile(r"^(?:\[pid\s+\d+\]\s+|\d+\s+)?(?:<\.\.\.\s+)?([a-z_0-9]+)[( ]")


def strace_reason() -> str | None:
    """Why system calls cannot be counted here, or None if they can."""
    if shutil.which("strace") is None:
        return "strace is not installed"
    return None


def span_calls(trace: str) -> collections.Counter[str]:
    """The system calls of ``trace`` (``strace -f`` output) between its first two
    ``getrusage`` calls, by name. A call interrupted by another thread's line
    (``<unfinished ...>`` / ``<... resumed>``) counts once."""
    calls: collections.Counter[str] = collections.Counter()
    marks = 0
    for line in trace.splitlines():
        if "resumed>" in line:
            continue
        match = _CALL.match(line)
        if match is None:
            continue
        name = match.group(1)
        if name == "getrusage":
            marks += 1
            if marks == 2:
                return calls
            continue
        if marks == 1:
            calls[name] += 1
    raise ValueError(f"the trace has {marks} getrusage call(s); a sending span needs two")


def traced(argv: list[str]) -> tuple[dict[str, Any], collections.Counter[str]]:
    """Runs the sender ``argv`` under ``strace -f``; returns its JSON line and its span's calls."""
    with tempfile.TemporaryDirectory(prefix="zerosend-strace-") as tmp:
        out = Path(tmp) / "trace"
        done = subprocess.run(
            ["strace", "-f", "-qq", "-o", str(out), *argv],
            capture_output=True,
            text=True,
            timeout=300,
        )
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"traced sender exited with {done.returncode}: {done.stderr[-500:]}")
        result: dict[str, Any] = json.loads(lines[-1])
        return result, span_calls(out.read_text())


def per_send(result: dict[str, Any], calls: collections.Counter[str]) -> float:
    return sum(calls.values()) / max(1, int(result["sends"]))


def measure_cell(
    topology: str, size: int, inflight: int, seconds: float, contenders: list[str]
) -> list[dict[str, Any]]:
    """Traces one run of each contender in one cell; returns a row per contender (calls per
    send, sends, the calls by name) and prints it, with met / not met in the target's cell."""
    from bench.harness.config import Config
    from bench.harness.run import native_senders, pinning, receiver, sender_argv

    config = Config(
        sizes=[size],
        inflight=[inflight],
        topologies=[topology],
        contenders=contenders,
        rounds=1,
        seconds=seconds,
        max_bytes=1 << 62,
        out=Path(tempfile.gettempdir()),
        markdown=Path(tempfile.gettempdir()) / "unused.md",
        plots=False,
        quick=False,
    )
    sender_cpu, receiver_cpu = pinning()
    skipped: dict[str, str] = {}
    native = native_senders(contenders, skipped)
    rows = []
    with receiver(topology, receiver_cpu) as address:
        for contender in contenders:
            if contender in skipped:
                continue
            argv = sender_argv(contender, address, size, inflight, config, sender_cpu, native)
            result, calls = traced(argv)
            figure = per_send(result, calls)
            row = {
                "topology": topology,
                "size": size,
                "inflight": inflight,
                "contender": contender,
                "calls_per_send": figure,
                "sends": result["sends"],
                "calls": dict(calls.most_common()),
            }
            if (topology, size, inflight) == TARGET_CELL:
                row["met"] = figure <= TARGET
            rows.append(row)
            verdict = ""
            if "met" in row:
                verdict = " met" if row["met"] else " NOT MET"
                verdict += f" (target <= {TARGET})"
            top = ", ".join(f"{name} {n}" for name, n in calls.most_common(5))
            print(
                f"  system calls per send, {contender} [{topology}, {size} B, {inflight} in "
                f"flight]: {figure:.2f}{verdict}; {result['sends']} sends under strace [{top}]",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    from bench.harness.config import CONTENDERS, parse_size

    parser = argparse.ArgumentParser(prog="python -m bench.senders.syscalls", description=__doc__)
    parser.add_argument("--size", type=parse_size, default=1 << 20)
    parser.add_argument("--inflight", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--topology", default="rig", choices=("loopback", "rig"))
    parser.add_argument("--contenders", default=",".join(DEFAULT_CONTENDERS))
    args = parser.parse_args(argv)
    why = strace_reason()
    if why:
        print(f"cannot count system calls: {why}", file=sys.stderr)
        return 1
    contenders = args.contenders.split(",")
    for contender in contenders:
        if contender not in CONTENDERS:
            parser.error(f"unknown contender {contender!r}")
    measure_cell(args.topology, args.size, args.inflight, args.seconds, contenders)
    return 0


if __name__ == "__main__":
    sys.exit(main())
