"""``python -m bench.senders.gso``: UDP GSO on the true-zero-copy topology, copy against zero-copy.

    python -m bench.senders.gso [--segments 1200,1472,8972] [--inflight 8] [--rounds 3]
                                [--seconds 1] [--backends copy,msg_zerocopy,io_uring]
                                [--markdown FILE] [--out DIR] [--quick]

One connected UDP socket sends datagrams of ``SEGMENT`` bytes out of an ``ifb`` device that frees
every packet without copying (``bench/harness/rig.py``'s ``IfbSink``: the kernel never copies
there, as on a NIC after its DMA). Each cell (segment size, backend) runs twice per round:

* *one datagram per send*: each ``send_zc`` is one datagram of ``SEGMENT`` bytes;
* *GSO*: the socket is wrapped with ``udp_segment=SEGMENT`` and each ``send_zc`` is one batch of
  as many whole segments as fit in a datagram's 65,507 bytes (at most 64), which the kernel
  cuts into datagrams of ``SEGMENT`` bytes where a device needs it.

Every run is its own process (pinned to CPU 0 when there are two CPUs) keeping ``--inflight``
sends submitted and not yet released, for ``--seconds``; *MB/s* counts from the first send to
the last release, *CPU s/GB* is the process's own ``getrusage`` user + system time over that
span divided by the gigabytes sent. Zero-copy backends are wrapped with
``zerocopy_threshold=0``, so every send goes zero-copy; the copy backend is the reference. The
order of the runs rotates from cell to cell and round to round; the tables are medians over the
rounds and every ratio pairs the two runs of one round (median over rounds).

Writes ``gso.json`` into ``--out`` (default ``bench/results``) and its section of
``BENCHMARKS.md`` between ``<!-- gso-bench:begin -->`` and ``<!-- gso-bench:end -->`` (the rest
of the file is kept). ``--quick`` is a smoke run of seconds into a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness.report import rel, write_markdown

ROOT = Path(__file__).resolve().parents[2]
BEGIN = "<!-- gso-bench:begin -->"
END = "<!-- gso-bench:end -->"
MAX_DATAGRAM = 65_507
MAX_SEGMENTS = 64  # the kernel's UDP_MAX_SEGMENTS
BACKENDS = ("copy", "msg_zerocopy", "io_uring")
#: QUIC's usual datagram, an Ethernet MTU's UDP payload, a jumbo frame's.
SEGMENTS = (1200, 1472, 8972)
MODES = ("single", "gso")
MODE_LABELS = {"single": "one datagram per send", "gso": "GSO batch per send"}


def batch_size(segment: int) -> int:
    """Bytes per GSO send: whole segments, at most 64 of them and 65,507 bytes in all."""
    return segment * min(MAX_SEGMENTS, MAX_DATAGRAM // segment)


# -- one run, in its own process ---------------------------------------------------------------


async def send_for(
    host: str, backend: str, segment: int, gso: bool, inflight: int, seconds: float
) -> dict[str, Any]:
    import zerosend

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((host, 9))  # the discard port; the device drops everything anyway
    sock.setblocking(False)
    zs = zerosend.wrap(
        sock,
        backend=backend,  # type: ignore[arg-type]
        zerocopy_threshold=0,
        udp_segment=segment if gso else None,
    )
    size = batch_size(segment) if gso else segment
    free = [bytearray(b"\xa5") * size for _ in range(inflight)]
    window: collections.deque[tuple[Any, bytearray]] = collections.deque()
    sent = sends = 0
    send_zc = zs.send_zc
    monotonic = time.monotonic
    ru = resource.getrusage(resource.RUSAGE_SELF)
    started = monotonic()
    deadline = started + seconds
    stopping = False
    while True:
        while not stopping and window.__len__() < inflight:
            buf = free.pop()
            window.append((send_zc(buf), buf))
            sent += size
            sends += 1
            stopping = monotonic() >= deadline
        if not window:
            break
        future, buf = window.popleft()
        await future
        free.append(buf)
    await zs.drain()
    elapsed = monotonic() - started
    end = resource.getrusage(resource.RUSAGE_SELF)
    stats = dict(zs.stats)
    backend_used = zs.backend
    await zs.aclose()
    cpu = (end.ru_utime - ru.ru_utime) + (end.ru_stime - ru.ru_stime)
    return {
        "backend": backend_used,
        "bytes": sent,
        "sends": sends,
        "datagrams": sent // segment,
        "elapsed_s": elapsed,
        "cpu_s": cpu,
        "mb_per_s": sent / elapsed / 1e6,
        "cpu_s_per_gb": cpu / (sent / 1e9),
        "zerocopy_fraction": stats["bytes_zerocopy"] / sent if sent else 0.0,
        # Below 100 the sender waited (for socket room, for releases): the path set the pace.
        "busy_percent": 100 * cpu / elapsed,
    }


def sender_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.senders.gso --sender")
    parser.add_argument("--host", required=True)
    parser.add_argument("--backend", choices=BACKENDS, required=True)
    parser.add_argument("--segment", type=int, required=True)
    parser.add_argument("--gso", action="store_true")
    parser.add_argument("--inflight", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--cpu", type=int)
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    result = asyncio.run(
        send_for(args.host, args.backend, args.segment, args.gso, args.inflight, args.seconds)
    )
    print(json.dumps(result), flush=True)
    return 0


# -- the harness -------------------------------------------------------------------------------


@dataclass
class Config:
    segments: Sequence[int]
    inflight: int
    rounds: int
    seconds: float
    backends: Sequence[str]
    out: Path
    markdown: Path
    quick: bool
    from_json: Path | None = None


def run_one(
    host: str, backend: str, segment: int, mode: str, config: Config, cpu: int | None
) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.senders.gso", "--sender", "--host", host]
    argv += ["--backend", backend, "--segment", str(segment)]
    argv += ["--inflight", str(config.inflight), "--seconds", str(config.seconds)]
    if mode == "gso":
        argv.append("--gso")
    if cpu is not None:
        argv += ["--cpu", str(cpu)]
    timeout = 120 + 4 * config.seconds  # a hang guard on a loaded machine, not a measurement
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{backend} {mode} {segment} B exited with {done.returncode}: {tail}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def skipped_backends(backends: Sequence[str]) -> dict[str, str]:
    import zerosend

    caps = zerosend.capabilities()
    why = {}
    if "io_uring" in backends and not caps.io_uring_send_zc:
        why["io_uring"] = f"io_uring SEND_ZC unavailable: {caps.io_uring_send_zc_reason}"
    if "msg_zerocopy" in backends and not caps.msg_zerocopy:
        why["msg_zerocopy"] = f"MSG_ZEROCOPY unavailable: {caps.msg_zerocopy_reason}"
    return why


def measure(config: Config) -> tuple[list[dict[str, Any]], dict[str, str]]:
    from bench.harness.rig import IfbSink

    skipped = skipped_backends(config.backends)
    backends = [b for b in config.backends if b not in skipped]
    cpu = 0 if len(os.sched_getaffinity(0)) >= 2 else None
    variants = [(b, m) for b in backends for m in MODES]
    rows: list[dict[str, Any]] = []
    with IfbSink() as ifb:
        for round_index in range(config.rounds):
            for cell_index, segment in enumerate(config.segments):
                by = (round_index + cell_index) % len(variants)
                for backend, mode in [*variants[by:], *variants[:by]]:
                    result = run_one(ifb.sink_addr, backend, segment, mode, config, cpu)
                    result.update(segment=segment, mode=mode, round=round_index)
                    result["requested"] = backend
                    rows.append(result)
            print(f"  round {round_index + 1}/{config.rounds} done", flush=True)
    return rows, skipped


# -- the report --------------------------------------------------------------------------------


def medians(rows: list[dict[str, Any]]) -> dict[tuple[int, str, str], dict[str, float]]:
    cells: dict[tuple[int, str, str], list[dict[str, Any]]] = collections.defaultdict(list)
    for row in rows:
        cells[(row["segment"], row["requested"], row["mode"])].append(row)
    return {
        key: {
            metric: statistics.median(r[metric] for r in runs)
            for metric in ("mb_per_s", "cpu_s_per_gb", "zerocopy_fraction", "busy_percent")
        }
        for key, runs in cells.items()
    }


def paired_ratio(
    rows: list[dict[str, Any]], metric: str, a: tuple[int, str, str], b: tuple[int, str, str]
) -> float | None:
    """Median over rounds of ``a``'s ``metric`` over ``b``'s in the same round."""
    by_round: dict[int, dict[tuple[int, str, str], float]] = collections.defaultdict(dict)
    for row in rows:
        by_round[row["round"]][(row["segment"], row["requested"], row["mode"])] = row[metric]
    ratios = [r[a] / r[b] for r in by_round.values() if a in r and b in r and r[b]]
    return statistics.median(ratios) if ratios else None


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model or platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()}, " \
        f"Python {platform.python_version()}"  # fmt: skip


def markdown(
    config: Config, rows: list[dict[str, Any]], skipped: dict[str, str], info: dict[str, Any]
) -> str:
    figs = medians(rows)
    backends = [b for b in config.backends if b not in skipped]
    columns = [(b, m) for b in backends for m in MODES]
    out = [
        "## UDP GSO on the true-zero-copy topology",
        "",
        f"Run `python -m bench.senders.gso` (part of `make bench`) on {info['date']}, "
        f"{info['elapsed_s'] / 60:.0f} min: {info['machine']}. Raw data: "
        f"`{rel(config.out / 'gso.json')}`. {config.rounds} rounds of {config.seconds:g} s per "
        f"run, {config.inflight} sends in flight, medians; ratios pair the runs of one round. "
        "One connected UDP socket sends out of an `ifb` device (MTU 65535) that frees every "
        "packet without copying, as a NIC would after its DMA. *One datagram per send*: each "
        "`send_zc` is one datagram of the segment size. *GSO*: `wrap(sock, "
        "udp_segment=SEGMENT)`, each `send_zc` one batch of whole segments (at most 64, "
        "65,507 bytes in all) that the kernel cuts into datagrams of the segment size. Zero-copy "
        "backends send with `zerocopy_threshold=0`; *CPU s/GB* is the sender's own `getrusage` "
        "over the span from the first send to the last release. With MTU 65535 the device "
        "takes a GSO batch whole, as a NIC with UDP segmentation offload does; where the "
        "kernel has to cut the batch itself (no offload) that work is not measured here.",
        "",
    ]
    if skipped:
        out += ["**Skipped.** " + "; ".join(f"{k}: {v}" for k, v in skipped.items()) + ".", ""]
    head = "| segment | bytes per GSO send | " + " | ".join(
        f"{b}, {MODE_LABELS[m]}" for b, m in columns
    ) + " |"  # fmt: skip
    for title, metric, digits in (
        ("sender CPU seconds per GB", "cpu_s_per_gb", 3),
        ("MB/s", "mb_per_s", 0),
        (
            "sender CPU busy, % of the span (below 100 it waited: for socket room, for releases, "
            "or for a CPU shared with other work)",
            "busy_percent",
            0,
        ),
    ):
        out += [f"**{title}** (ifb, {config.inflight} in flight)", "", head]
        out.append("|" + "---|" * (len(columns) + 2))
        for segment in config.segments:
            cells = [fmt(figs.get((segment, b, m), {}).get(metric), digits) for b, m in columns]
            out.append(f"| {segment:,} B | {batch_size(segment):,} | " + " | ".join(cells) + " |")
        out.append("")
    out += [
        "**Bytes the kernel sent without copying, %** (ifb)",
        "",
        head,
        "|" + "---|" * (len(columns) + 2),
    ]
    for segment in config.segments:
        cells = []
        for b, m in columns:
            frac = figs.get((segment, b, m), {}).get("zerocopy_fraction")
            cells.append("-" if frac is None else f"{100 * frac:.0f}")
        out.append(f"| {segment:,} B | {batch_size(segment):,} | " + " | ".join(cells) + " |")
    out.append("")
    out += [
        "**GSO against one datagram per send, and zero-copy against copy** (paired ratios, "
        "medians over rounds; below 1 on CPU and above 1 on MB/s is better for the first)",
        "",
        "| segment | backend | GSO / single, CPU s/GB | GSO / single, MB/s "
        "| against copy with GSO, CPU s/GB | against copy with GSO, MB/s |",
        "|---|---|---|---|---|---|",
    ]
    for segment in config.segments:
        for b in backends:
            gso, single = (segment, b, "gso"), (segment, b, "single")
            copy_gso = (segment, "copy", "gso")
            cells = [
                ratio(paired_ratio(rows, "cpu_s_per_gb", gso, single)),
                ratio(paired_ratio(rows, "mb_per_s", gso, single)),
            ]
            if b == "copy":
                cells += ["-", "-"]
            else:
                cells += [
                    ratio(paired_ratio(rows, "cpu_s_per_gb", gso, copy_gso)),
                    ratio(paired_ratio(rows, "mb_per_s", gso, copy_gso)),
                ]
            out.append(f"| {segment:,} B | {b} | " + " | ".join(cells) + " |")
    out.append("")
    return "\n".join(out)


def fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if digits == 0 else f"{value:.{digits}f}"


def ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(
        prog="python -m bench.senders.gso", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--segments", help="comma-separated datagram sizes in bytes")
    parser.add_argument("--inflight", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--backends", help="comma-separated: " + ",".join(BACKENDS))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--quick", action="store_true", help="a smoke run of seconds")
    parser.add_argument(
        "--from-json", type=Path, help="rewrite the Markdown from an earlier gso.json"
    )
    args = parser.parse_args(argv)
    segments = [int(s) for s in args.segments.split(",")] if args.segments else list(SEGMENTS)
    for segment in segments:
        if not 1 <= segment <= MAX_DATAGRAM:
            parser.error(f"--segments: {segment} is not between 1 and {MAX_DATAGRAM} bytes")
    backends = args.backends.split(",") if args.backends else list(BACKENDS)
    for backend in backends:
        if backend not in BACKENDS:
            parser.error(f"--backends: unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    quick = args.quick
    out = args.out or (
        Path(tempfile.mkdtemp(prefix="zerosend-gso-")) if quick else ROOT / "bench" / "results"
    )
    return Config(
        segments=segments[:1] if quick and not args.segments else segments,
        inflight=args.inflight or 8,
        rounds=args.rounds or (1 if quick else 3),
        seconds=args.seconds or (0.05 if quick else 1.0),
        backends=backends,
        out=out,
        markdown=args.markdown or (out / "BENCHMARKS.md" if quick else ROOT / "BENCHMARKS.md"),
        quick=quick,
        from_json=args.from_json,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--sender"]:
        return sender_main(argv[1:])
    config = parse_args(argv)
    if config.from_json:  # the same run's figures, written again (after a change of wording)
        document = json.loads(config.from_json.read_text())
        for name in ("segments", "inflight", "rounds", "seconds", "backends"):
            setattr(config, name, document["config"][name])
        config.out = config.from_json.parent
        info, skipped = document["machine"], document["skipped"]
        write_markdown(
            config.markdown, markdown(config, document["runs"], skipped, info), BEGIN, END
        )
        print(f"wrote {config.markdown} from {config.from_json}", flush=True)
        return 0
    from bench.harness.rig import rig_unavailable_reason

    why = rig_unavailable_reason()
    if why:
        # As the core run skips its ifb topology: said, and not a failure of `make bench`.
        print(
            f"bench.senders.gso: skipped, the ifb topology is unavailable here: {why}", flush=True
        )
        return 0
    config.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"== gso: {len(config.segments)} segment sizes x {config.rounds} rounds", flush=True)
    rows, skipped = measure(config)
    info = {"date": date, "elapsed_s": round(time.monotonic() - started, 1), "machine": machine()}
    document = {
        "machine": info,
        "config": {
            "segments": list(config.segments),
            "inflight": config.inflight,
            "rounds": config.rounds,
            "seconds": config.seconds,
            "backends": list(config.backends),
        },
        "skipped": skipped,
        "summary": [
            {"segment": s, "backend": b, "mode": m, **v} for (s, b, m), v in medians(rows).items()
        ],
        "runs": rows,
    }
    (config.out / "gso.json").write_text(json.dumps(document, indent=1) + "\n")
    write_markdown(config.markdown, markdown(config, rows, skipped, info), BEGIN, END)
    print(f"wrote {config.out / 'gso.json'} and {config.markdown}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
