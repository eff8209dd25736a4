"""Running the benchmark: the receiver of each topology, one process per sender run, the
rounds over every cell (size, sends in flight) with the order of contenders rotating."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.harness.config import (
    C_CONTENDERS,
    IFB,
    LABELS,
    OPT_IN,
    POOL,
    ROOT,
    RUST_CONTENDERS,
    RUST_POOL,
    Config,
    State,
    topology_contenders,
    topology_sizes,
)
from bench.harness.receiver import start_receiver
from bench.harness.rig import IfbSink, Rig, rig_unavailable_reason


def pinning() -> tuple[int | None, int | None]:
    """(sender CPU, receiver CPU): 0 and 1 when there are two CPUs to spread over."""
    if len(os.sched_getaffinity(0)) >= 2 and (os.cpu_count() or 1) >= 2:
        return 0, 1
    return None, None


def target_dir() -> Path:
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return target if target.is_absolute() else ROOT / target


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
    binary = target_dir() / "release" / "examples" / "bench_sender"
    if not binary.exists():
        raise RuntimeError(f"cargo built the Rust sender but {binary.name} is missing")
    return binary, None


def build_c_sender() -> tuple[Path | None, str | None]:
    """Compiles bench/senders/c_sender.c against liburing; returns (binary, None) or (None,
    why not)."""
    cc = shutil.which("cc")
    if cc is None:
        return None, "no C compiler (cc) on PATH"
    binary = target_dir() / "bench" / "c_sender"
    binary.parent.mkdir(parents=True, exist_ok=True)
    source = ROOT / "bench" / "senders" / "c_sender.c"
    done = subprocess.run(
        [cc, "-O2", "-Wall", "-o", str(binary), str(source), "-luring"],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        if "liburing.h" in done.stderr:
            return None, "liburing's headers are missing (scripts/install-system-deps.sh)"
        raise RuntimeError(f"building the C sender failed:\n{done.stderr}")
    return binary, None


@contextmanager
def receiver(topology: str, cpu: int | None) -> Iterator[tuple[str, int]]:
    """Starts the receiver for ``topology``; yields the address senders connect to."""
    if topology == IFB:
        with IfbSink() as ifb:
            yield ifb.sink_addr, 9  # the discard port; the device drops everything anyway
    elif topology == "loopback":
        with start_receiver("127.0.0.1", cpu=cpu) as rx:
            yield rx.host, rx.port
    else:
        with Rig(rps_cpu=1) as rig, start_receiver(rig.peer_addr, namespace=rig.ns, cpu=cpu) as rx:
            yield rx.host, rx.port


def rig_reason() -> str | None:
    if (os.cpu_count() or 1) < 2:
        return "the rig needs two CPUs (sender on one, receive work on the other)"
    return rig_unavailable_reason()


def sender_argv(
    contender: str,
    address: tuple[str, int],
    size: int,
    inflight: int,
    config: Config,
    cpu: int | None,
    native: dict[str, Path],
    udp: bool = False,
) -> list[str]:
    """The command line of one sender run."""
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
    if contender in RUST_CONTENDERS:
        buffers = "registered" if contender == RUST_POOL else "plain"
        return [str(native["rust"]), *common, "--buffers", buffers, "--threshold", "0"]
    if contender in C_CONTENDERS:
        return [str(native["c"]), *common, "--mode", contender.partition("-")[2]]
    return [sys.executable, "-m", "bench.senders.sender", contender, *common]


def run_sender(
    contender: str,
    address: tuple[str, int],
    size: int,
    inflight: int,
    config: Config,
    cpu: int | None,
    native: dict[str, Path],
    udp: bool = False,
) -> dict[str, Any]:
    """One sender process; returns its JSON (or {"skipped": why}); raises if it failed."""
    argv = sender_argv(contender, address, size, inflight, config, cpu, native, udp)
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
    if contender in C_CONTENDERS:  # it counts what it can; zerosend's other counters are 0
        import zerosend

        result["stats"] = {**dict.fromkeys(zerosend.STATS_KEYS, 0), **result["stats"]}
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
        skips.update(dict.fromkeys(("zerosend-io_uring", POOL, *OPT_IN, *RUST_CONTENDERS), why))
        skips.update(dict.fromkeys(C_CONTENDERS, why))
    if not caps.msg_zerocopy:
        skips["zerosend-msg_zerocopy"] = f"MSG_ZEROCOPY unavailable: {caps.msg_zerocopy_reason}"
    return skips


def native_senders(
    contenders: Sequence[str], skipped: dict[str, str] | None = None
) -> dict[str, Path]:
    """Builds the Rust and C senders that ``contenders`` need; records in ``skipped`` (and
    prints) those that cannot be built here."""
    skipped = {} if skipped is None else skipped
    native: dict[str, Path] = {}
    for name, group, build in (
        ("rust", RUST_CONTENDERS, build_rust_sender),
        ("c", C_CONTENDERS, build_c_sender),
    ):
        wanted = [c for c in group if c in contenders and c not in skipped]
        if not wanted:
            continue
        binary, why_not = build()
        if binary is not None:
            native[name] = binary
            continue
        for contender in wanted:
            skipped[contender] = str(why_not)
            print(f"skipping {LABELS[contender]}: {why_not}", flush=True)
    return native


def measure(config: Config, state: State) -> None:
    sender_cpu, receiver_cpu = pinning()
    for contender, why in kernel_skips().items():
        if contender in config.contenders:
            state.skipped[contender] = why
            print(f"skipping {LABELS[contender]}: {why}", flush=True)
    native = native_senders(config.contenders, state.skipped)
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
                            result = run_sender(*args, native, udp)
                        except RuntimeError as first:
                            # Once more, in case the machine changed under us (a sysctl toggled
                            # by another test, say); a contender that fails twice has failed.
                            print(f"retrying after: {first}", flush=True)
                            state.retries.append(f"{topology}: {str(first).splitlines()[-1]}")
                            time.sleep(1)
                            try:
                                result = run_sender(*args, native, udp)
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
