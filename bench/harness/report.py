"""The benchmark's outputs: ``core.json``, the results section of ``BENCHMARKS.md`` (between
its markers, the rest of the file kept) and the PNG plots."""

from __future__ import annotations

import datetime
import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.harness.config import (
    BACKENDS,
    LABELS,
    ROOT,
    Config,
    State,
    size_label,
    topology_contenders,
    topology_sizes,
)
from bench.harness.stats import MARGIN, Key, auto_choices, evaluate, summarize

#: Hand-written findings (causes of missed targets), included in the Markdown after the targets.
NOTES = ROOT / "bench" / "results" / "core-notes.md"
BEGIN = "<!-- core-bench:begin -->"
END = "<!-- core-bench:end -->"


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) // 1024
    except OSError:
        pass
    versions = {}
    for name in ("uvloop", "zerosend"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:
            versions[name] = "not installed"
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "memory_mib": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        **versions,
    }


def write_json(
    path: Path, config: Config, state: State, info: dict[str, Any], elapsed: float
) -> None:
    summary = summarize(state.rows)
    document = {
        "machine": info,
        "elapsed_s": round(elapsed, 1),
        "config": {
            "sizes": list(config.sizes),
            "ifb_sizes": list(config.ifb_sizes),
            "inflight": list(config.inflight),
            "topologies": list(config.topologies),
            "contenders": list(config.contenders),
            "rounds": config.rounds,
            "seconds": config.seconds,
            "max_bytes": config.max_bytes,
            "quick": config.quick,
        },
        "skipped": state.skipped,
        "failures": state.failures,
        "retries": state.retries,
        "syscalls": state.syscalls,
        "targets": evaluate(state.rows, config.inflight),
        "auto": auto_choices(state.rows),
        "summary": [
            {"topology": t, "size": s, "inflight": i, "contender": c, **figs}
            for (t, s, i, c), figs in sorted(summary.items())
        ],
        "runs": state.rows,
    }
    path.write_text(json.dumps(document, indent=1) + "\n")


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None or value != value:
        return "-"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def table(
    summary: dict[Key, dict[str, float]],
    topology: str,
    config: Config,
    contenders: Sequence[str],
    metric: str,
    digits: int,
) -> list[str]:
    head = "| size | in flight | " + " | ".join(LABELS[c] for c in contenders) + " |"
    lines = [head, "|" + "---|" * (len(contenders) + 2)]
    for size in topology_sizes(config, topology):
        for depth in config.inflight:
            cells = []
            for contender in contenders:
                figs = summary.get((topology, size, depth, contender))
                cells.append(fmt(figs[metric] if figs else None, digits))
            lines.append(f"| {size_label(size)} | {depth} | " + " | ".join(cells) + " |")
    return lines


METHOD = """\
**How it is measured.** Every sender is its own process, pinned to CPU 0; one receiver
(`bench/harness/receiver.py`, the same for every sender, pinned to CPU 1) reads each connection
to its end into a reused buffer and answers with the byte count. A run sends for {seconds} s,
then waits for every release, shuts its write side and waits for that answer: *MB/s* and *sends/s*
count from the first send to the answer, and *CPU s/GB* is the sender's own `getrusage(RUSAGE_SELF)`
user + system time over the same span (all its threads, io_uring's included), divided by the
gigabytes sent. *Peak RSS* is the sender's `ru_maxrss` (interpreter included). Each contender runs
once per cell per round, in an order that rotates from cell to cell and round to round, over
{rounds} rounds; tables show medians, ratios are medians over rounds of the two runs of the same
round.

**Topologies.** *loopback*: 127.0.0.1. *rig*: the receiver in its own network namespace behind a
veth pair, RPS steering its receive work to CPU 1 (`bench/harness/rig.py`), so the kernel's
deferred copy of a zero-copy send happens on the other CPU, as a NIC would release the pages
later. Both copy every
zero-copy send in the end (local delivery). *ifb*: true zero-copy, the kernel never copies: UDP
datagrams on one connected socket out of an `ifb` device (MTU 65535, so never fragmented) that
frees them, as a NIC would after DMA; no receiver, so only zerosend's backends run there (its
copy backend is the copying reference), and a run ends at the last release.

**What "in flight" means for each sender** (every sender keeps N buffers of the size, so memory
is alike):
- *zerosend* (`send_zc` on each backend, with `zerocopy_threshold=0` so that it sends zero-copy
  at every size; *auto* is `wrap()`'s defaults, threshold included; "+ pool" takes
  `zerosend.BufferPool` buffers): one connection, N sends submitted and not yet released by
  the kernel; one task awaits the oldest and submits the next from the buffer that came back.
  The pure-Rust sender (the core `Driver` with no Python,
  `rust/zerosend/examples/bench_sender.rs`) does the same, from heap `Vec`s or
  ("registered") from one locked region registered as io_uring fixed buffers, as `BufferPool` is.
- *C* (`bench/senders/c_sender.c`, built by the harness with `cc` over liburing): one connection, N
  requests in flight, each buffer reused at its release (SEND_ZC: the notification CQE; plain
  send: its CQE), every batch submitted in the `io_uring_enter` that waits for the next
  completion; plain or registered buffers. Its requests are not linked (it only counts bytes, as
  liburing's send-zerocopy example does); zerosend keeps byte order.
- *`loop.sock_sendall`, 1 connection*: one `await loop.sock_sendall(sock, buf)` after the other,
  the program a user writes for one stream (in flight does not apply): **the baseline the
  targets are read against**.
- *`loop.sock_sendall`, N connections*: N connections, each with one `sock_sendall` pending (one
  socket cannot have two: their bytes would interleave), N tasks.
- *streams* (`asyncio.open_connection`): one connection, N `writer.write()` calls then one
  `await writer.drain()`.
- *uvloop*: the same two programs on `uvloop.run`.
"""


def markdown(config: Config, state: State, info: dict[str, Any], elapsed: float) -> str:
    summary = summarize(state.rows)
    ran = [c for c in config.contenders if any(k[3] == c for k in summary)]
    out = [
        "## Core: zerosend next to the senders users would pick instead",
        "",
        f"Run `make bench` (`python -m bench`) on {info['date']}, {elapsed / 60:.0f} min: "
        f"{info['cpu']}, {info['cpus']} CPUs, {info['memory_mib'] // 1024} GiB, "
        f"Linux {info['kernel']}, Python {info['python']}, uvloop {info['uvloop']}. "
        f"Raw data: `{rel(config.out / 'core.json')}`. The machine is shared and noisy: compare "
        "ratios within the run, not absolute numbers across runs.",
        "",
        METHOD.format(seconds=config.seconds, rounds=config.rounds),
    ]
    if state.skipped:
        out.append("**Skipped.** " + "; ".join(f"{LABELS.get(k, k)}: {v}" for k, v in
                                              state.skipped.items()) + ".")  # fmt: skip
        out.append("")
    if state.retries:
        out.append("**Retried once** (then ran): " + " / ".join(state.retries))
        out.append("")
    if state.failures:
        out.append(
            "**Failures.** "
            + " / ".join(f"{f.splitlines()[0]} {f.splitlines()[-1]}" for f in state.failures)
        )
        out.append("")
    results = evaluate(state.rows, config.inflight)
    if results:
        out += [
            "### Targets (ratios measured in this run)",
            "",
            "| target | topology | size | in flight | ratio | met |",
            "|---|---|---|---|---|---|",
        ]
        for r in results:
            out.append(
                f"| {r['target']} | {r['topology']} | {size_label(r['size'])} | "
                f"{r['inflight']} | {r['ratio']:.2f}x | {'met' if r['met'] else '**not met**'} |"
            )
        out.append("")
    out += auto_table(state.rows)
    if NOTES.exists() and not config.quick:
        out += [NOTES.read_text().rstrip(), ""]
    for topology in config.topologies:
        if not any(k[0] == topology for k in summary):
            continue
        out += [f"### {topology}", ""]
        here = topology_contenders(ran, topology)
        if config.plots:
            for metric in ("mbps", "cpu"):
                png = config.out / f"core-{topology}-{metric}.png"
                if png.exists():
                    out.append(f"![{topology} {metric}]({rel(png)})")
            out.append("")
        for title, metric, digits in (
            ("MB/s", "mb_per_s", 0),
            ("sends/s", "sends_per_s", 0),
            ("sender CPU seconds per GB", "cpu_s_per_gb", 3),
            (
                "system-wide CPU seconds per GB (every CPU over the sending span, from "
                "/proc/stat: the receiver, the kernel's deferred copies and anything else "
                "running on the machine included)",
                "system_cpu_s_per_gb",
                3,
            ),
            ("peak RSS of the sender, MiB", "peak_rss_mib", 0),
        ):
            out += [f"**{title}** ({topology})", ""]
            out += table(summary, topology, config, here, metric, digits)
            out.append("")
        zc = [c for c in here if c.startswith(("zerosend", "rust", "c-"))]
        out += [
            f"**Bytes the kernel sent without copying / copied, %** ({topology}; "
            "asyncio and uvloop copy everything)",
            "",
        ]
        head = "| size | in flight | " + " | ".join(LABELS[c] for c in zc) + " |"
        out += [head, "|" + "---|" * (len(zc) + 2)]
        for size in topology_sizes(config, topology):
            for depth in config.inflight:
                cells = []
                for contender in zc:
                    figs = summary.get((topology, size, depth, contender))
                    if figs is None:
                        cells.append("-")
                        continue
                    zero = 100 * figs["zerocopy_fraction"]
                    cells.append(f"{zero:.0f} / {100 - zero:.0f}")
                out.append(f"| {size_label(size)} | {depth} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def auto_table(rows: list[dict[str, Any]]) -> list[str]:
    """The crossover of zerosend's backends, cell by cell, and what ``auto`` picked there."""
    choices = auto_choices(rows)
    if not choices:
        return []
    names = list(BACKENDS)
    lost = [c for c in choices if c["beaten_on_both_by"]]
    out = [
        "### Which backend wins, and what `auto` picks",
        "",
        "Per cell, CPU s/GB and MB/s of each backend (plain buffers, medians), the cheapest and "
        "the fastest, and what `auto` did there (its backend, or copy below the zero-copy "
        f"threshold). *Lost on both*: a backend beat auto's pick by more than "
        f"{100 * (MARGIN - 1):.0f} % on CPU/GB and on MB/s. "
        f"**auto's pick lost on both in {len(lost)} of {len(choices)} cells.**",
        "",
        "| topology | size | in flight | "
        + " | ".join(f"{n} CPU/GB, MB/s" for n in names)
        + " | cheapest | fastest | auto | lost on both to |",
        "|" + "---|" * (len(names) + 7),
    ]
    for c in choices:
        cells = [
            f"{fmt(c['cpu_s_per_gb'].get(n), 3)}, {fmt(c['mb_per_s'].get(n))}"
            if n in c["cpu_s_per_gb"]
            else "-"
            for n in names
        ]
        beaten = ", ".join(c["beaten_on_both_by"]) or "-"
        out.append(
            f"| {c['topology']} | {size_label(c['size'])} | {c['inflight']} | "
            + " | ".join(cells)
            + f" | {c['cheapest']} | {c['fastest']} | {c['pick']} | {beaten} |"
        )
    out.append("")
    return out


def rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return path.name


def write_markdown(path: Path, section: str, begin: str = BEGIN, end: str = END) -> None:
    """Replaces the part of ``path`` between the markers ``begin`` and ``end`` (the core
    benchmark's unless told), keeping everything else; appends them if missing."""
    block = f"{begin}\n{section}{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        path.write_text(head + block + tail)
    else:
        path.write_text(text.rstrip("\n") + "\n\n" + block + "\n")


def plot(config: Config, state: State) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        print(f"no plots: matplotlib is not installed ({exc})", flush=True)
        return
    summary = summarize(state.rows)
    for topology in config.topologies:
        if not any(k[0] == topology for k in summary):
            continue
        for metric, ylabel, name in (
            ("mb_per_s", "MB/s", "mbps"),
            ("cpu_s_per_gb", "sender CPU s per GB", "cpu"),
        ):
            fig, axes = plt.subplots(
                1, len(config.inflight), figsize=(5 * len(config.inflight), 4.2), squeeze=False
            )
            for ax, depth in zip(axes[0], config.inflight, strict=True):
                for contender in config.contenders:
                    points = [
                        (size, summary[(topology, size, depth, contender)][metric])
                        for size in topology_sizes(config, topology)
                        if (topology, size, depth, contender) in summary
                    ]
                    if not points:
                        continue
                    style = "-" if contender.startswith(("zerosend", "rust")) else "--"
                    ax.plot(
                        [p[0] for p in points],
                        [p[1] for p in points],
                        style,
                        marker="o",
                        markersize=3,
                        label=LABELS[contender],
                    )
                ax.set_xscale("log", base=2)
                sizes = topology_sizes(config, topology)
                ax.set_xticks(sizes, [size_label(s) for s in sizes])
                ax.tick_params(axis="x", labelrotation=45, labelsize=7)
                ax.set_title(f"{topology}, {depth} in flight", fontsize=9)
                ax.set_xlabel("send size")
                ax.set_ylabel(ylabel)
                ax.grid(True, alpha=0.3)
            axes[0][0].legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(config.out / f"core-{topology}-{name}.png", dpi=90)
            plt.close(fig)
