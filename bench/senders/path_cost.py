"""The per-send cost of the Python path, build against build, side by side in one run.

    python -m bench.senders.path_cost --build before=DIR --build after=DIR [--rounds N]
                                      [--seconds S] [--cell TOPOLOGY:SIZE:INFLIGHT:CONTENDER ...]
                                      [--syscalls]

A *build* is a directory holding a ``zerosend`` package with its compiled extension (a copy of
``python/zerosend`` after ``maturin develop``); its sender runs get that directory first on
``PYTHONPATH``. Every zerosend contender of a cell runs once per build per round, the other
contenders (the baselines: one-connection ``asyncio-sock_sendall-1conn``) once per round, in
an order that rotates from round to round. Figures are medians over rounds, and each zerosend
run is also given as a ratio to the cell's baseline run of the same round and to the first
build's run of the same cell and round (medians of ratios): the step's own effect.

With ``--syscalls`` every zerosend run is repeated once under ``strace -f`` (slow, so not
timed) and the system calls per send of its sending span are listed by name: what a step
saved, independent of the machine's load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness.config import BASELINE, Config, parse_size, size_label
from bench.harness.run import pinning, receiver, rotate, run_sender
from bench.senders.syscalls import traced

# The baseline of a cell is the one-connection sock_sendall run of its topology and size
# (``BASELINE``; the report pairs cells with it by that name).
DEFAULT_CELLS = (
    "rig:1M:8:zerosend-io_uring",
    "rig:1M:8:zerosend-io_uring-pool",
    f"rig:1M:1:{BASELINE}",
    "loopback:4K:1:zerosend-auto",
    f"loopback:4K:1:{BASELINE}",
)


@dataclass(frozen=True)
class Cell:
    topology: str
    size: int
    inflight: int
    contender: str

    @property
    def zerosend(self) -> bool:
        return self.contender.startswith("zerosend-")

    def label(self) -> str:
        return f"{self.topology} {size_label(self.size)} x{self.inflight} {self.contender}"


def parse_cell(text: str) -> Cell:
    topology, size, inflight, contender = text.split(":")
    return Cell(topology, parse_size(size), int(inflight), contender)


def sender_env(build: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if build is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            [str(build), *filter(None, [env.get("PYTHONPATH", "")])]
        )
    return env


def syscalls_per_send(
    cell: Cell, address: tuple[str, int], build: Path | None, cpu: int | None
) -> dict[str, float]:
    """One run of ``cell`` under ``strace -f``: system calls per send, by name, counted over
    the sending span only (between the sender's two ``getrusage`` calls; start-up and imports
    are not sends' calls)."""
    argv = [sys.executable, "-m", "bench.senders.sender", cell.contender]
    argv += ["--connect", f"{address[0]}:{address[1]}"]
    argv += ["--size", str(cell.size), "--inflight", str(cell.inflight)]
    argv += ["--max-bytes", str(max(cell.size * 2000, 256 << 20))]
    argv += ["--seconds", "30"]
    if cpu is not None:
        argv += ["--cpu", str(cpu)]
    old = os.environ.get("PYTHONPATH")
    os.environ.update(sender_env(build))
    try:
        result, calls = traced(argv)
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
    sends = max(1, int(result["sends"]))
    return {name: count / sends for name, count in calls.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.senders.path_cost", description=__doc__)
    parser.add_argument("--build", action="append", default=[], help="NAME=DIR (repeatable)")
    parser.add_argument("--cell", action="append", help="TOPOLOGY:SIZE:INFLIGHT:CONTENDER")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--syscalls", action="store_true", help="count system calls per send")
    args = parser.parse_args(argv)
    builds: dict[str, Path | None] = {}
    for spec in args.build:
        name, _, directory = spec.partition("=")
        path = Path(directory).resolve()
        if not (path / "zerosend" / "__init__.py").exists():
            parser.error(f"{path} holds no zerosend package")
        builds[name] = path
    if not builds:
        builds["installed"] = None
    cells = [parse_cell(c) for c in (args.cell or DEFAULT_CELLS)]
    config = Config(
        sizes=(),
        inflight=(),
        topologies=(),
        contenders=(),
        rounds=args.rounds,
        seconds=args.seconds,
        max_bytes=1 << 62,
        out=Path("."),
        markdown=Path("."),
        plots=False,
        quick=False,
    )
    sender_cpu, receiver_cpu = pinning()
    results: dict[tuple[Cell, str], list[dict[str, Any]]] = {}
    syscalls: dict[tuple[Cell, str], dict[str, float]] = {}
    for topology in dict.fromkeys(c.topology for c in cells):
        here = [c for c in cells if c.topology == topology]
        runs = [(c, b) for c in here for b in (builds if c.zerosend else [None])]
        with receiver(topology, receiver_cpu) as address:
            for round_index in range(args.rounds):
                order = rotate([f"{i}" for i in range(len(runs))], round_index)
                for i in map(int, order):
                    cell, build = runs[i]
                    path = builds[build] if build is not None else next(iter(builds.values()))
                    old = os.environ.get("PYTHONPATH")
                    os.environ.update(sender_env(path))
                    try:
                        row = run_sender(
                            cell.contender,
                            address,
                            cell.size,
                            cell.inflight,
                            config,
                            sender_cpu,
                            None,
                        )
                    finally:
                        if old is None:
                            os.environ.pop("PYTHONPATH", None)
                        else:
                            os.environ["PYTHONPATH"] = old
                    row["round"] = round_index
                    results.setdefault((cell, build or "-"), []).append(row)
                print(f"   {topology}: round {round_index + 1}/{args.rounds}", flush=True)
            if args.syscalls:
                for cell in here:
                    for name in builds if cell.zerosend else ["-"]:
                        path = builds.get(name) if name != "-" else next(iter(builds.values()))
                        syscalls[(cell, name)] = syscalls_per_send(cell, address, path, sender_cpu)
    print(report(cells, builds, results, syscalls))
    return 0


def figures(row: dict[str, Any]) -> tuple[float, float]:
    cpu = row["cpu_user"] + row["cpu_sys"]
    return cpu / (row["bytes"] / 1e9), row["bytes"] / 1e6 / row["elapsed"]


def report(
    cells: list[Cell],
    builds: dict[str, Path | None],
    results: dict[tuple[Cell, str], list[dict[str, Any]]],
    syscalls: dict[tuple[Cell, str], dict[str, float]],
) -> str:
    first = next(iter(builds), "-")
    lines = [
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, medians of rounds",
        "",
        "| cell | build | CPU s/GB | MB/s | CPU vs baseline | MB/s vs baseline "
        f"| CPU vs {first} | MB/s vs {first} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cell in cells:
        baseline = next(
            (
                c
                for c in cells
                if c.topology == cell.topology and c.size == cell.size and c.contender == BASELINE
            ),
            None,
        )
        base_rows = {r["round"]: figures(r) for r in results.get((baseline, "-"), [])}
        for name in builds if cell.zerosend else ["-"]:
            rows = results.get((cell, name), [])
            if not rows:
                continue
            cpu = statistics.median(figures(r)[0] for r in rows)
            rate = statistics.median(figures(r)[1] for r in rows)
            paired = [(figures(r), base_rows[r["round"]]) for r in rows if r["round"] in base_rows]
            cpu_ratio = rate_ratio = "-"
            if paired and baseline is not None and baseline != cell:
                cpu_ratio = f"{statistics.median(f[0] / b[0] for f, b in paired):.2f}x"
                rate_ratio = f"{statistics.median(f[1] / b[1] for f, b in paired):.2f}x"
            first_rows = {r["round"]: figures(r) for r in results.get((cell, first), [])}
            by_build = [
                (figures(r), first_rows[r["round"]]) for r in rows if r["round"] in first_rows
            ]
            cpu_step = rate_step = "-"
            if by_build and name != first and cell.zerosend:
                cpu_step = f"{statistics.median(f[0] / b[0] for f, b in by_build):.2f}x"
                rate_step = f"{statistics.median(f[1] / b[1] for f, b in by_build):.2f}x"
            figures_row = (
                f"{cpu:.3f} | {rate:,.0f} | {cpu_ratio} | {rate_ratio} | {cpu_step} | {rate_step}"
            )
            lines.append(f"| {cell.label()} | {name} | {figures_row} |")
    if syscalls:
        lines += ["", "system calls per send over the sending span (strace -f):", ""]
        for (cell, name), counts in syscalls.items():
            top = sorted(counts.items(), key=lambda kv: -kv[1])
            shown = ", ".join(f"{k} {v:.2f}" for k, v in top if v >= 0.01)
            lines.append(f"- {cell.label()} [{name}]: total {sum(counts.values()):.2f}: {shown}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
