"""``python -m bench``, the core benchmark: zerosend next to the senders users would pick instead.

    python -m bench [--quick] [--out DIR] [--markdown FILE] [--rounds N] [--seconds S] ...

Every sender is its own process (pinned to CPU 0 when there are two CPUs) talking to one
receiver (``bench.harness.receiver``, pinned to CPU 1) that is the same for all. Three
topologies: loopback; the rig of ``bench/harness/rig.py`` (the receiver in a network namespace
behind a veth pair, RPS steering its receive work to CPU 1); and ``ifb``, where nothing is
copied: UDP datagrams out of an ifb device (MTU 65535) that frees them, zerosend's backends only
(copy among them). Within a round every contender runs once per cell (size, sends in flight), the
order rotating from cell to cell and round to round; figures are medians over the rounds and every
comparison is a ratio of runs from the same round (median over the rounds).

Writes ``core.json`` and PNG plots into ``--out`` and the results section of ``BENCHMARKS.md``
(between ``<!-- core-bench:begin -->`` and ``<!-- core-bench:end -->``; the rest is kept).
``--quick`` is a smoke run of a few seconds: loopback only, every contender, tiny volumes, JSON
and Markdown into a temporary directory; it fails if any contender fails, and asserts no timing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bench.harness.config import (
    CONTENDERS,
    DEFAULT_CONTENDERS,
    FULL_INFLIGHT,
    FULL_SIZES,
    IFB,
    IFB_SIZES,
    MAX_DATAGRAM,
    ROOT,
    Config,
    KiB,
    MiB,
    State,
    parse_size,
    size_label,
)
from bench.harness.report import machine, markdown, plot, write_json, write_markdown
from bench.harness.run import measure, rig_reason
from bench.harness.stats import auto_choices, evaluate
from bench.senders.syscalls import DEFAULT_CONTENDERS as SYSCALL_CONTENDERS
from bench.senders.syscalls import TARGET_CELL as SYSCALL_CELL
from bench.senders.syscalls import measure_cell, strace_reason


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--out", type=Path, help="directory for core.json and the plots")
    parser.add_argument("--markdown", type=Path, help="the Markdown file to update")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--seconds", type=float, help="sending time of one run")
    parser.add_argument("--max-bytes", type=parse_size, help="stop a run after this many bytes")
    parser.add_argument("--sizes", help="comma-separated, e.g. 4K,64K,1M")
    parser.add_argument("--inflight", help="comma-separated, e.g. 1,8,32")
    parser.add_argument("--topologies", help="comma-separated: loopback,rig,ifb")
    parser.add_argument(
        "--contenders",
        help="comma-separated; default: "
        + ",".join(DEFAULT_CONTENDERS)
        + "; also: "
        + ",".join(c for c in CONTENDERS if c not in DEFAULT_CONTENDERS),
    )
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument(
        "--no-syscalls",
        action="store_true",
        help="skip counting system calls per send with strace (rig, 1 MiB, 8 in flight)",
    )
    parser.add_argument(
        "--from-json", type=Path, help="rewrite Markdown and plots from an earlier core.json"
    )
    args = parser.parse_args(argv)
    quick = args.quick
    out = args.out or (
        Path(tempfile.mkdtemp(prefix="zerosend-bench-")) if quick else ROOT / "bench" / "results"
    )
    contenders = args.contenders.split(",") if args.contenders else list(DEFAULT_CONTENDERS)
    for contender in contenders:
        if contender not in CONTENDERS:
            parser.error(f"unknown contender {contender!r}; known: {', '.join(CONTENDERS)}")
    topologies = args.topologies.split(",") if args.topologies else (
        ["loopback"] if quick else ["loopback", "rig", IFB]
    )  # fmt: skip
    for topology in topologies:
        if topology not in ("loopback", "rig", IFB):
            parser.error(f"unknown topology {topology!r}")
    default_sizes = (4 * KiB, MiB) if quick else FULL_SIZES
    default_inflight = (1, 8) if quick else FULL_INFLIGHT
    sizes = [parse_size(s) for s in args.sizes.split(",")] if args.sizes else default_sizes
    if args.sizes:
        ifb_sizes = [size for size in sizes if size <= MAX_DATAGRAM]
    else:  # above the zero-copy threshold: the point of the topology is zero-copy
        ifb_sizes = [16 * KiB, 60_000] if quick else list(IFB_SIZES)
    return Config(
        sizes=sizes,
        ifb_sizes=ifb_sizes,
        inflight=[int(i) for i in args.inflight.split(",")] if args.inflight else default_inflight,
        topologies=topologies,
        contenders=contenders,
        rounds=args.rounds or (1 if quick else 3),
        seconds=args.seconds or (0.05 if quick else 0.3),
        max_bytes=args.max_bytes or (4 * MiB if quick else 1 << 62),
        out=out,
        markdown=args.markdown or (out / "BENCHMARKS.md" if quick else ROOT / "BENCHMARKS.md"),
        plots=not (args.no_plots or quick),
        quick=quick,
        from_json=args.from_json,
        syscalls=not (args.no_syscalls or quick),
    )


def syscalls_per_send(config: Config, state: State) -> None:
    """The system-call target: traced runs (strace) of zerosend's io_uring sender and the C
    anchor in the target's cell, when the run measured that cell."""
    topology, size, inflight = SYSCALL_CELL
    if topology not in config.topologies or size not in config.sizes:
        return
    if inflight not in config.inflight or rig_reason() or strace_reason():
        why = rig_reason() or strace_reason() or "the cell was not measured"
        print(f"  system calls per send not counted: {why}")
        return
    wanted = [c for c in SYSCALL_CONTENDERS if c in config.contenders and c not in state.skipped]
    state.syscalls = measure_cell(topology, size, inflight, 1.0, wanted)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    config.out.mkdir(parents=True, exist_ok=True)
    state = State()
    if config.from_json:
        document = json.loads(config.from_json.read_text())
        info, elapsed = document["machine"], float(document.get("elapsed_s", 0))
        for name in ("sizes", "inflight", "topologies", "contenders", "rounds", "seconds"):
            setattr(config, name, document["config"][name])
        config.ifb_sizes = document["config"].get("ifb_sizes", IFB_SIZES)
        state.rows, state.skipped = document["runs"], document["skipped"]
        state.failures, state.retries = document["failures"], document.get("retries", [])
        state.syscalls = document.get("syscalls", [])
    else:
        info = machine()
        started = time.monotonic()
        measure(config, state)
        elapsed = time.monotonic() - started
        if config.syscalls:
            print("system calls per send (strace):", flush=True)
            syscalls_per_send(config, state)
    if config.plots:
        plot(config, state)
    write_json(config.out / "core.json", config, state, info, elapsed)
    write_markdown(config.markdown, markdown(config, state, info, elapsed))
    print(f"wrote {config.out / 'core.json'} and {config.markdown}", flush=True)
    print("targets:")
    for r in evaluate(state.rows, config.inflight):
        verdict = "met" if r["met"] else "NOT MET"
        where = f"{r['topology']}, {size_label(r['size'])}, {r['inflight']} in flight"
        print(f"  {r['target']} [{where}]: {r['ratio']:.2f}x {verdict}")
    choices = auto_choices(state.rows)
    for c in choices:
        if c["beaten_on_both_by"]:
            print(
                f"  auto picked {c['pick']} on {c['topology']}, {size_label(c['size'])}, "
                f"{c['inflight']} in flight: beaten on CPU/GB and MB/s by "
                + ", ".join(c["beaten_on_both_by"])
            )
    if choices:
        lost = sum(1 for c in choices if c["beaten_on_both_by"])
        print(f"  auto's pick lost on both CPU/GB and MB/s in {lost} of {len(choices)} cells")
    if state.failures:
        print(f"{len(state.failures)} sender run(s) failed", file=sys.stderr)
        return 1
    return 0
