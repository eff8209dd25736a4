"""Figures from the sender runs: per-run figures, medians per cell, ratios paired by round,
and the targets those ratios are held to."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.config import AUTO, BASELINE, POOL, RUST, ZEROSEND, KiB, MiB


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
    size: int
    inflight: Sequence[int]
    numerator: str
    denominator: str
    metric: str
    bound: float
    at_most: bool


def targets(inflight: Sequence[int]) -> list[Target]:
    return [
        Target(
            "rig, 1 MiB: zerosend sender CPU/GB <= 0.6x asyncio sock_sendall's",
            "rig", MiB, inflight, ZEROSEND, BASELINE, "cpu_s_per_gb", 0.6, True,
        ),
        Target(
            "rig, 1 MiB: zerosend + BufferPool sender CPU/GB <= 0.6x asyncio sock_sendall's",
            "rig", MiB, inflight, POOL, BASELINE, "cpu_s_per_gb", 0.6, True,
        ),
        Target(
            "loopback, 64 KiB: zerosend MB/s >= 1.0x asyncio sock_sendall's",
            "loopback", 64 * KiB, inflight, ZEROSEND, BASELINE, "mb_per_s", 1.0, False,
        ),
        Target(
            "loopback, 64 KiB: zerosend (auto) MB/s >= 1.0x asyncio sock_sendall's",
            "loopback", 64 * KiB, inflight, AUTO, BASELINE, "mb_per_s", 1.0, False,
        ),
        Target(
            "4 KiB, 32 in flight: zerosend (auto) sends/s >= 1.0x sock_sendall's (loopback)",
            "loopback", 4 * KiB, [32], AUTO, BASELINE, "sends_per_s", 1.0, False,
        ),
        Target(
            "4 KiB, 32 in flight: zerosend sends/s >= 1.0x asyncio sock_sendall's (loopback)",
            "loopback", 4 * KiB, [32], ZEROSEND, BASELINE, "sends_per_s", 1.0, False,
        ),
        Target(
            "4 KiB, 32 in flight: zerosend sends/s >= 1.0x asyncio sock_sendall's (rig)",
            "rig", 4 * KiB, [32], ZEROSEND, BASELINE, "sends_per_s", 1.0, False,
        ),
        Target(
            "loopback, 1 MiB: Python send_zc MB/s >= 0.9x the pure-Rust sender's",
            "loopback", MiB, inflight, ZEROSEND, RUST, "mb_per_s", 0.9, False,
        ),
        Target(
            "rig, 1 MiB: Python send_zc MB/s >= 0.9x the pure-Rust sender's",
            "rig", MiB, inflight, ZEROSEND, RUST, "mb_per_s", 0.9, False,
        ),
    ]  # fmt: skip


def evaluate(rows: list[dict[str, Any]], inflight: Sequence[int]) -> list[dict[str, Any]]:
    out = []
    for target in targets(inflight):
        for depth in target.inflight:
            ratio = paired_ratio(
                rows,
                target.topology,
                target.size,
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
                    "size": target.size,
                    "inflight": depth,
                    "metric": target.metric,
                    "ratio": ratio,
                    "bound": target.bound,
                    "met": met,
                }
            )
    return out
