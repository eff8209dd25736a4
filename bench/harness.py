"""The core benchmark: zerosend next to the senders users would pick instead.

    python -m bench [--quick] [--out DIR] [--markdown FILE] [--rounds N] [--seconds S] ...

Every sender is its own process (pinned to CPU 0 when there are two CPUs) talking to one
receiver (``bench.receiver``, pinned to CPU 1) that is the same for all. Three topologies:
loopback; the rig of DESIGN.md (the receiver in a network namespace behind a veth pair, RPS
steering its receive work to CPU 1); and ``ifb``, where nothing is copied: UDP datagrams out of
an ifb device (MTU 65535) that frees them, zerosend's backends only (copy among them). Within a
round every contender runs once per cell (size, sends in flight), the order rotating from cell to
cell and round to round; figures are medians over the rounds and every comparison is a ratio of
runs from the same round (median over the rounds).

Writes ``core.json`` and PNG plots into ``--out`` and the results section of ``BENCHMARKS.md``
(between ``<!-- core-bench:begin -->`` and ``<!-- core-bench:end -->``; the rest is kept).
``--quick`` is a smoke run of a few seconds: loopback only, every contender, tiny volumes, JSON
and Markdown into a temporary directory; it fails if any contender fails, and asserts no timing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.sender import CONTENDERS as PYTHON_CONTENDERS

ROOT = Path(__file__).resolve().parent.parent
RUST = "rust-io_uring"
CONTENDERS = (*PYTHON_CONTENDERS, RUST)
ZEROSEND = "zerosend-io_uring"  # the contender the targets speak of: zerosend's default backend
POOL = "zerosend-io_uring-pool"
AUTO = "zerosend-auto"  # what wrap() picks by default: copy for a peer on this host
BASELINE = "asyncio-sock_sendall"
KiB = 1 << 10
MiB = 1 << 20
FULL_SIZES = (4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 8 * MiB)
FULL_INFLIGHT = (1, 8, 32)
IFB = "ifb"
#: Datagram sizes on the ifb topology (a datagram holds at most 65,507 bytes).
IFB_SIZES = (16 * KiB, 32 * KiB, 60_000)
MAX_DATAGRAM = 65_507
#: The senders that can send datagrams: zerosend's backends, the copying one included.
IFB_CONTENDERS = (ZEROSEND, POOL, "zerosend-msg_zerocopy", "zerosend-copy")
#: Hand-written findings (causes of missed targets), included in the Markdown after the targets.
NOTES = ROOT / "bench" / "core-notes.md"
BEGIN = "<!-- core-bench:begin -->"
END = "<!-- core-bench:end -->"

LABELS = {
    "zerosend-auto": "zerosend auto",
    "zerosend-io_uring": "zerosend io_uring",
    "zerosend-io_uring-pool": "zerosend io_uring + pool",
    "zerosend-msg_zerocopy": "zerosend MSG_ZEROCOPY",
    "zerosend-copy": "zerosend copy",
    "asyncio-sock_sendall": "asyncio sock_sendall",
    "asyncio-streams": "asyncio streams",
    "uvloop-sock_sendall": "uvloop sock_sendall",
    "uvloop-streams": "uvloop streams",
    RUST: "pure Rust (io_uring)",
}


@dataclass
class Config:
    sizes: Sequence[int]
    inflight: Sequence[int]
    topologies: Sequence[str]
    contenders: Sequence[str]
    rounds: int
    seconds: float
    max_bytes: int
    out: Path
    markdown: Path
    plots: bool
    quick: bool
    from_json: Path | None = None
    ifb_sizes: Sequence[int] = ()


@dataclass
class State:
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    retries: list[str] = field(default_factory=list)


def topology_sizes(config: Config, topology: str) -> list[int]:
    """The send sizes measured on ``topology`` (datagrams are bounded on ifb)."""
    return list(config.ifb_sizes if topology == IFB else config.sizes)


def topology_contenders(contenders: Sequence[str], topology: str) -> list[str]:
    return [c for c in contenders if topology != IFB or c in IFB_CONTENDERS]


def size_label(size: int) -> str:
    if size >= MiB and size % MiB == 0:
        return f"{size // MiB} MiB"
    if size >= KiB and size % KiB == 0:
        return f"{size // KiB} KiB"
    return f"{size} B"


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    for suffix, factor in (("K", KiB), ("M", MiB), ("G", 1 << 30)):
        if text.endswith(suffix):
            return int(float(text[:-1]) * factor)
    return int(text)


def pinning() -> tuple[int | None, int | None]:
    """(sender CPU, receiver CPU): 0 and 1 when there are two CPUs to spread over."""
    if len(os.sched_getaffinity(0)) >= 2 and (os.cpu_count() or 1) >= 2:
        return 0, 1
    return None, None


def build_rust_sender() -> tuple[Path | None, str | None]:
    """Builds the cargo example; returns (binary, None) or (None, why not)."""
    cargo = shutil.which("cargo") or str(Path.home() / ".cargo" / "bin" / "cargo")
    if not Path(cargo).exists():
        return None, "cargo is not installed"
    done = subprocess.run(
        [cargo, "build", "--release", "--quiet", "-p", "zerosend", "--example", "bench_sender"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"building the Rust sender failed:\n{done.stderr}")
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    if not target.is_absolute():
        target = ROOT / target
    binary = target / "release" / "examples" / "bench_sender"
    if not binary.exists():
        raise RuntimeError(f"cargo built the Rust sender but {binary.name} is missing")
    return binary, None


@contextmanager
def receiver(topology: str, cpu: int | None) -> Iterator[tuple[str, int]]:
    """Starts the receiver for ``topology``; yields the address senders connect to."""
    if topology == IFB:
        from zerosend._rig import IfbSink

        with IfbSink() as ifb:
            yield ifb.sink_addr, 9  # the discard port; the device drops everything anyway
        return
    argv = [sys.executable, "-m", "bench.receiver"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), *sys.path[1:]])))
    with rig_if(topology) as rig:
        if rig is None:
            host = "127.0.0.1"
            argv += ["--listen", f"{host}:0"]
        else:
            host = rig.peer_addr
            argv = rig.command([*argv, "--listen", f"{host}:0"])
        if cpu is not None:
            argv += ["--cpu", str(cpu)]
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().split()
            if len(line) != 2 or line[0] != "ready":
                _, err = proc.communicate(timeout=5)
                raise RuntimeError(f"the receiver did not start: {err.strip()}")
            yield host, int(line[1])
        finally:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def rig_if(topology: str) -> Iterator[Any]:
    if topology == "loopback":
        yield None
        return
    from zerosend._rig import Rig

    with Rig(rps_cpu=1) as rig:
        yield rig


def rig_reason() -> str | None:
    from zerosend._rig import rig_unavailable_reason

    if (os.cpu_count() or 1) < 2:
        return "the rig needs two CPUs (sender on one, receive work on the other)"
    return rig_unavailable_reason()


def run_sender(
    contender: str,
    address: tuple[str, int],
    size: int,
    inflight: int,
    config: Config,
    cpu: int | None,
    rust: Path | None,
    udp: bool = False,
) -> dict[str, Any]:
    """One sender process; returns its JSON (or {"skipped": why}); raises if it failed."""
    common = [
        "--connect",
        f"{address[0]}:{address[1]}",
        "--size",
        str(size),
        "--inflight",
        str(inflight),
        "--seconds",
        str(config.seconds),
        "--max-bytes",
        str(config.max_bytes),
    ]
    if cpu is not None:
        common += ["--cpu", str(cpu)]
    if udp:
        common.append("--udp")
    if contender == RUST:
        assert rust is not None
        argv = [str(rust), *common]
    else:
        argv = [sys.executable, "-m", "bench.sender", contender, *common]
    timeout = 60 + config.seconds * 4
    try:
        done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{contender} did not finish within {timeout:.0f} s") from None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"{contender} (size {size}, {inflight} in flight) exited with {done.returncode}:\n"
            f"{last_line(done.stderr)}"
        )
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def last_line(text: str) -> str:
    """The last non-empty line of a sender's stderr: the error itself, without the traceback."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def rotate(items: Sequence[str], by: int) -> list[str]:
    if not items:
        return []
    by %= len(items)
    return [*items[by:], *items[:by]]


def kernel_skips() -> dict[str, str]:
    """Contenders whose backend this kernel does not offer, with the kernel's reason."""
    import zerosend

    caps = zerosend.capabilities()
    skips = {}
    if not caps.io_uring_send_zc:
        why = f"io_uring SEND_ZC unavailable: {caps.io_uring_send_zc_reason}"
        skips.update(dict.fromkeys(("zerosend-io_uring", POOL, RUST), why))
    if not caps.msg_zerocopy:
        skips["zerosend-msg_zerocopy"] = f"MSG_ZEROCOPY unavailable: {caps.msg_zerocopy_reason}"
    return skips


def measure(config: Config, state: State) -> None:
    sender_cpu, receiver_cpu = pinning()
    for contender, why in kernel_skips().items():
        if contender in config.contenders:
            state.skipped[contender] = why
            print(f"skipping {LABELS[contender]}: {why}", flush=True)
    rust: Path | None = None
    if RUST in config.contenders and RUST not in state.skipped:
        rust, no_rust = build_rust_sender()
        if no_rust:
            state.skipped[RUST] = no_rust
            print(f"skipping {LABELS[RUST]}: {no_rust}", flush=True)
    for topology in config.topologies:
        cells = [(s, i) for s in topology_sizes(config, topology) for i in config.inflight]
        contenders = topology_contenders(config.contenders, topology)
        if topology in ("rig", IFB):
            no_rig = rig_reason()
            if no_rig:
                print(f"skipping the {topology} topology: {no_rig}", flush=True)
                state.skipped[f"topology {topology}"] = no_rig
                continue
        print(f"== {topology}: {len(cells)} cells x {config.rounds} rounds", flush=True)
        udp = topology == IFB
        with receiver(topology, receiver_cpu) as address:
            for round_index in range(config.rounds):
                started = time.monotonic()
                for cell_index, (size, inflight) in enumerate(cells):
                    order = rotate(contenders, round_index + cell_index)
                    for contender in order:
                        if contender in state.skipped:
                            continue
                        args = (contender, address, size, inflight, config, sender_cpu)
                        try:
                            result = run_sender(*args, rust, udp)
                        except RuntimeError as first:
                            # Once more, in case the machine changed under us (a sysctl toggled
                            # by another test, say); a contender that fails twice has failed.
                            print(f"retrying after: {first}", flush=True)
                            state.retries.append(f"{topology}: {str(first).splitlines()[-1]}")
                            time.sleep(1)
                            try:
                                result = run_sender(*args, rust, udp)
                            except RuntimeError as exc:
                                state.failures.append(f"{topology}: {exc}")
                                print(f"FAILED {exc}", flush=True)
                                continue
                        if "skipped" in result:
                            state.skipped[contender] = result["skipped"]
                            print(f"skipping {LABELS[contender]}: {result['skipped']}", flush=True)
                            continue
                        result.update(
                            topology=topology,
                            contender=contender,
                            size=size,
                            inflight=inflight,
                            round=round_index,
                        )
                        state.rows.append(result)
                print(
                    f"   round {round_index + 1}/{config.rounds} took "
                    f"{time.monotonic() - started:.0f} s",
                    flush=True,
                )


# ---------------------------------------------------------------------------------------------
# Figures


def figures(row: dict[str, Any]) -> dict[str, float]:
    gb = row["bytes"] / 1e9
    cpu = row["cpu_user"] + row["cpu_sys"]
    return {
        "mb_per_s": row["bytes"] / 1e6 / row["elapsed"],
        "sends_per_s": row["sends"] / row["elapsed"],
        "cpu_s_per_gb": cpu / gb if gb else float("nan"),
        "cpu_user_s_per_gb": row["cpu_user"] / gb if gb else float("nan"),
        "cpu_sys_s_per_gb": row["cpu_sys"] / gb if gb else float("nan"),
        "peak_rss_mib": row["maxrss_kib"] / 1024,
        "zerocopy_fraction": row["bytes_zerocopy"] / row["bytes"] if row["bytes"] else 0.0,
        "kernel_copied_fraction": (
            row["bytes_copied_by_kernel"] / row["bytes"] if row["bytes"] else 0.0
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


# ---------------------------------------------------------------------------------------------
# Output


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
        "targets": evaluate(state.rows, config.inflight),
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
(`bench/receiver.py`, the same for every sender, pinned to CPU 1) reads each connection to its end
into a reused buffer and answers with the byte count. A run sends for {seconds} s, then waits for
every release, shuts its write side and waits for that answer: *MB/s* and *sends/s* count from
the first send to the answer, and *CPU s/GB* is the sender's own `getrusage(RUSAGE_SELF)` user +
system time over the same span (all its threads, io_uring's included), divided by the gigabytes
sent. *Peak RSS* is the sender's `ru_maxrss` (interpreter included). Each contender runs once per
cell per round, in an order that rotates from cell to cell and round to round, over {rounds}
rounds; tables show medians, ratios are medians over rounds of the two runs of the same round.

**Topologies.** *loopback*: 127.0.0.1. *rig*: the receiver in its own network namespace behind a
veth pair, RPS steering its receive work to CPU 1 (see DESIGN.md), so the kernel's deferred copy of
a zero-copy send happens on the other CPU, as a NIC would release the pages later. Both copy every
zero-copy send in the end (local delivery). *ifb*: true zero-copy, the kernel never copies: UDP
datagrams on one connected socket out of an `ifb` device (MTU 65535, so never fragmented) that
frees them, as a NIC would after DMA; no receiver, so only zerosend's backends run there (its
copy backend is the copying reference), and a run ends at the last release.

**What "in flight" means for each sender** (every sender keeps N buffers of the size, so memory
is alike):
- *zerosend* (`send_zc` on each backend; "+ pool" takes `zerosend.BufferPool` buffers): one
  connection, N sends submitted and not yet released by the kernel; one task awaits the oldest and
  submits the next from the buffer that came back. The pure-Rust sender (the core `Driver` with no
  Python, `rust/zerosend/examples/bench_sender.rs`) does the same.
- *`loop.sock_sendall`*: N connections, each with one `sock_sendall` pending (one socket cannot
  have two: their bytes would interleave), N tasks.
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
            "| target | in flight | ratio | met |",
            "|---|---|---|---|",
        ]
        for r in results:
            out.append(
                f"| {r['target']} | {r['inflight']} | {r['ratio']:.2f}x | "
                f"{'yes' if r['met'] else '**no**'} |"
            )
        out.append("")
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
            ("peak RSS of the sender, MiB", "peak_rss_mib", 0),
        ):
            out += [f"**{title}** ({topology})", ""]
            out += table(summary, topology, config, here, metric, digits)
            out.append("")
        zc = [c for c in here if c.startswith("zerosend") or c == RUST]
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


def rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return path.name


def write_markdown(path: Path, section: str) -> None:
    """Replaces the part of ``path`` between the core-bench markers, keeping everything else."""
    block = f"{BEGIN}\n{section}{END}"
    if path.exists():
        text = path.read_text()
        if BEGIN in text and END in text:
            head, _, rest = text.partition(BEGIN)
            _, _, tail = rest.partition(END)
            path.write_text(head + block + tail)
            return
        path.write_text(text.rstrip("\n") + "\n\n" + block + "\n")
        return
    path.write_text("# Benchmarks\n\n" + block + "\n")


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
        "--contenders", help="comma-separated; default all: " + ",".join(CONTENDERS)
    )
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument(
        "--from-json", type=Path, help="rewrite Markdown and plots from an earlier core.json"
    )
    args = parser.parse_args(argv)
    quick = args.quick
    out = args.out or (
        Path(tempfile.mkdtemp(prefix="zerosend-bench-")) if quick else ROOT / "bench" / "results"
    )
    contenders = args.contenders.split(",") if args.contenders else list(CONTENDERS)
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
    )


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
    else:
        info = machine()
        started = time.monotonic()
        measure(config, state)
        elapsed = time.monotonic() - started
    if config.plots:
        plot(config, state)
    write_json(config.out / "core.json", config, state, info, elapsed)
    write_markdown(config.markdown, markdown(config, state, info, elapsed))
    print(f"wrote {config.out / 'core.json'} and {config.markdown}", flush=True)
    for r in evaluate(state.rows, config.inflight):
        verdict = "met" if r["met"] else "MISSED"
        print(f"  {r['target']} [{r['inflight']} in flight]: {r['ratio']:.2f}x {verdict}")
    if state.failures:
        print(f"{len(state.failures)} sender run(s) failed", file=sys.stderr)
        return 1
    return 0
