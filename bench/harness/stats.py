"""Figures from the sender runs: per-run figures, medians per cell, ratios paired by round,
and the targets those ratios are held to."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.harness.config import (
    AUTO,
    BACKENDS,
    BASELINE,
    BASELINE_N,
    C_SEND_ZC,
    C_SEND_ZC_FIXED,
    MSG_ZEROCOPY,
    POOL,
    RUST,
    RUST_POOL,
    ZEROSEND,
    KiB,
    MiB,
)


def figures(row: dict[str, Any]) -> dict[str, float]:
    gb = row["bytes"] / 1e9
    counters = row["stats"]
    cpu = row["cpu_user"] + row["cpu_sys"]
    return {
        "mb_per_s": row["bytes"] / 1e6 / row["elapsed"],
        "sends_per_s": row["sends"] / row["elapsed"],
        "cpu_s_per_gb": cpu / gb if gb else float("nan"),
        "cpu_user_s_per_gb": row["cpu_user"] / gb if gb else float("nan"),
        "cpu_sys_s_per_gb": row["cpu_sys"] / gb if gb else float("nan"),
        # Every CPU over the span (/proc/stat), receiver and deferred copies included; the
        # Rust sender does not report it.
        "system_cpu_s_per_gb": (
            row["system_cpu"] / gb if gb and "system_cpu" in row else float("nan")
        ),
        "peak_rss_mib": row["maxrss_kib"] / 1024,
        "zerocopy_fraction": counters["bytes_zerocopy"] / row["bytes"] if row["bytes"] else 0.0,
        "kernel_copied_fraction": (
            counters["bytes_copied_by_kernel"] / row["bytes"] if row["bytes"] else 0.0
        ),
    }


Key = tuple[str, int, int, str]  # topology, size, inflight, contender


def summarize(rows: list[dict[str, Any]]) -> dict[Key, dict[str, float]]:
    grouped: dict[Key, list[dict[str, float]]] = {}
    for row in rows:
        key = (row["topology"], row["size"], row["inflight"], row["contender"])
        grouped.setdefault(key, []).append(figures(row))
    summary: dict[Key, dict[str, float]] = {}
    for key, runs in grouped.items():
        summary[key] = {name: statistics.median(r[name] for r in runs) for name in runs[0]}
        summary[key]["runs"] = len(runs)
    return summary


def paired_ratio(
    rows: list[dict[str, Any]],
    topology: str,
    size: int,
    inflight: int,
    numerator: str,
    denominator: str,
    metric: str,
) -> float | None:
    """Median over rounds of numerator/denominator measured in the same round."""
    by_round: dict[tuple[int, str], float] = {}
    for row in rows:
        if (row["topology"], row["size"], row["inflight"]) != (topology, size, inflight):
            continue
        if row["contender"] in (numerator, denominator):
            by_round[(row["round"], row["contender"])] = figures(row)[metric]
    ratios = [
        by_round[(r, numerator)] / by_round[(r, denominator)]
        for r in {r for r, _ in by_round}
        if (r, numerator) in by_round
        and (r, denominator) in by_round
        and by_round[(r, denominator)] > 0
    ]
    return statistics.median(ratios) if ratios else None


@dataclass
class Target:
    name: str
    topology: str
    sizes: Sequence[int]
    inflight: Sequence[int]
    numerator: str
    denominator: str
    metric: str
    bound: float
    at_most: bool


def targets(inflight: Sequence[int]) -> list[Target]:
    """Issue 9's targets (rig, one connection, 1 MiB, 8 in flight; 4 KiB sends on loopback),
    issue 8's (io_uring at most MSG_ZEROCOPY's CPU/GB from 64 KiB up on the rig) and the
    earlier ones read against N connections."""
    rig_1m = ("rig", [MiB], [8])
    cpu, mbps = "cpu_s_per_gb", "mb_per_s"
    return [
        Target("plain bytearray CPU/GB <= 1.15x pure Rust (plain)",
               *rig_1m, ZEROSEND, RUST, cpu, 1.15, True),
        Target("plain bytearray CPU/GB <= 0.7x sock_sendall (1 connection)",
               *rig_1m, ZEROSEND, BASELINE, cpu, 0.7, True),
        Target("BufferPool CPU/GB <= 1.15x pure Rust (registered)",
               *rig_1m, POOL, RUST_POOL, cpu, 1.15, True),
        Target("BufferPool CPU/GB <= 0.55x sock_sendall (1 connection)",
               *rig_1m, POOL, BASELINE, cpu, 0.55, True),
        Target("pure Rust (plain) CPU/GB <= 1.1x C SEND_ZC",
               *rig_1m, RUST, C_SEND_ZC, cpu, 1.1, True),
        Target("pure Rust (registered) CPU/GB <= 1.1x C SEND_ZC (registered)",
               *rig_1m, RUST_POOL, C_SEND_ZC_FIXED, cpu, 1.1, True),
        Target("plain bytearray MB/s >= 0.9x pure Rust (plain)",
               *rig_1m, ZEROSEND, RUST, mbps, 0.9, False),
        Target("BufferPool MB/s >= 0.9x pure Rust (registered)",
               *rig_1m, POOL, RUST_POOL, mbps, 0.9, False),
        Target("small sends: auto MB/s >= 1.0x sock_sendall (1 connection)",
               "loopback", [4 * KiB], [1], AUTO, BASELINE, mbps, 1.0, False),
        Target("io_uring CPU/GB <= 1.0x MSG_ZEROCOPY's",
               "rig", [64 * KiB, 256 * KiB, MiB, 8 * MiB], inflight, ZEROSEND, MSG_ZEROCOPY,
               cpu, 1.0, True),
        Target("zerosend (auto) MB/s >= 1.0x sock_sendall (N connections)",
               "loopback", [64 * KiB], inflight, AUTO, BASELINE_N, mbps, 1.0, False),
        Target("4 KiB: zerosend (auto) sends/s >= 1.0x sock_sendall (N connections)",
               "loopback", [4 * KiB], [32], AUTO, BASELINE_N, "sends_per_s", 1.0, False),
    ]  # fmt: skip


def evaluate(rows: list[dict[str, Any]], inflight: Sequence[int]) -> list[dict[str, Any]]:
    out = []
    for target in targets(inflight):
        for size in target.sizes:
            for depth in target.inflight:
                ratio = paired_ratio(
                    rows,
                    target.topology,
                    size,
                    depth,
                    target.numerator,
                    target.denominator,
                    target.metric,
                )
                if ratio is None:
                    continue
                met = ratio <= target.bound if target.at_most else ratio >= target.bound
                out.append(
                    {
                        "target": target.name,
                        "topology": target.topology,
                        "size": size,
                        "inflight": depth,
                        "metric": target.metric,
                        "ratio": ratio,
                        "bound": target.bound,
                        "met": met,
                    }
                )
    return out


#: A backend beats auto's pick on a metric only by more than this (the cells are noisy).
MARGIN = 1.05


def auto_pick(row: dict[str, Any]) -> str:
    """What ``auto`` did in a run: its socket's backend, or copy when every send went by copy
    because it was below the zero-copy threshold."""
    below = row["stats"].get("bytes_copied_below_threshold", 0)
    return "copy" if row["bytes"] and below >= row["bytes"] else str(row["backend"])


def auto_choices(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For every cell where ``auto`` and all three backends ran: what auto picked, the medians of
    each backend, the winner on CPU/GB and on MB/s, and the backends that beat the pick on both
    (by more than ``MARGIN``): auto must never pick a backend that loses on both."""
    summary = summarize(rows)
    picks: dict[tuple[str, int, int], list[str]] = {}
    for row in rows:
        if row["contender"] == AUTO:
            key = (row["topology"], row["size"], row["inflight"])
            picks.setdefault(key, []).append(auto_pick(row))
    out = []
    for (topology, size, depth), picked in sorted(picks.items()):
        cells = {b: summary.get((topology, size, depth, c)) for b, c in BACKENDS.items()}
        figs = {b: f for b, f in cells.items() if f is not None}
        pick = statistics.mode(picked)
        if pick not in figs or len(figs) < 2:
            continue
        cpu = {b: f["cpu_s_per_gb"] for b, f in figs.items()}
        mbps = {b: f["mb_per_s"] for b, f in figs.items()}
        beaten_by = [
            b for b in figs if cpu[b] * MARGIN < cpu[pick] and mbps[b] > mbps[pick] * MARGIN
        ]
        out.append(
            {
                "topology": topology,
                "size": size,
                "inflight": depth,
                "pick": pick,
                "cpu_s_per_gb": cpu,
                "mb_per_s": mbps,
                "cheapest": min(cpu, key=cpu.__getitem__),
                "fastest": max(mbps, key=mbps.__getitem__),
                "beaten_on_both_by": beaten_by,
            }
        )
    return out
