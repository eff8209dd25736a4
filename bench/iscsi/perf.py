"""iscsi-perf against zerosend's target and against tgtd serving the same image, alternating.

    python bench/iscsi/perf.py [--size 512M] [--seconds 10] [--rounds 3] [--markdown FILE]
                               [--only NAMES] [--before PYTHON]

Needs root (tgtd), libiscsi-bin (iscsi-perf), qemu-utils with qemu-block-extra, and tgt.
Workloads: sequential 128 KiB reads with 16 in flight, random 4 KiB reads with 32 in flight
(iscsi-perf), and writing the whole image with `qemu-img convert` (8 requests in flight, flushes
ignored so that the disk under the image is not what is measured). Every (target, workload) pair
runs once per round, the targets alternating, so drift on the machine hits both alike; the
median is reported, and each target's ratio to tgtd (IOPS; MB/s for the writes).

`--before PYTHON` adds the same variants run by another interpreter, one whose environment has an
earlier build of zerosend (a checkout of an older commit with `make develop`): a change's cost is
then read against tgtd in the same run, before and after side by side.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from zerosend.iscsi.storage.opening import parse_size

IQN_ZS = "iqn.2024-01.org.zerosend:bench"
IQN_TGT = "iqn.2024-01.org.zerosend:tgt-bench"
WORKLOADS = {
    "seq 128 KiB x16": ["-m", "16", "-b", "256"],
    "rand 4 KiB x32": ["-r", "-m", "32", "-b", "8"],
}
WRITES = "write x8 (qemu-img)"
_AVG = re.compile(r"iops average (\d+) \((\d+) MB/s\)")


def ensure_free(port: int, what: str) -> None:
    """Refuse to start ``what`` on a port something else listens on (an earlier run's tgtd,
    which ignores SIGTERM): the run would measure that instead."""
    import socket

    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            sys.exit(f"port {port} for {what} is taken: stop what listens there (ss -ltnp)")


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    import socket

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"{what} did not listen on port {port}")


def start_zerosend(
    python: str, image: str, port: int, log: Path, options: list[str]
) -> subprocess.Popen[bytes]:
    ensure_free(port, "zerosend-iscsi")
    cmd = [python, "-m", "zerosend.iscsi", "--listen", f"127.0.0.1:{port}"]
    cmd += ["--iqn", IQN_ZS, "--lun", image, "--log-level", "WARNING", *options]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    wait_port(port, proc, "zerosend-iscsi")
    return proc


def start_tgtd(image: Path, port: int, control: int, log: Path) -> subprocess.Popen[bytes]:
    tgtd = shutil.which("tgtd")
    if tgtd is None or shutil.which("tgtadm") is None:
        sys.exit("tgtd/tgtadm not found (Debian package tgt)")
    ensure_free(port, "tgtd")
    cmd = [tgtd, "-f", "-C", str(control), "--iscsi", f"portal=127.0.0.1:{port}"]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    wait_port(port, proc, "tgtd")
    adm = ["tgtadm", "-C", str(control), "--lld", "iscsi"]
    for args in (
        ["--op", "new", "--mode", "target", "--tid", "1", "-T", IQN_TGT],
        ["--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b", str(image)],
        ["--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"],
    ):
        subprocess.run(adm + args, check=True)
    return proc


def perf(url: str, args: list[str], seconds: int) -> tuple[int, int]:
    cmd = ["iscsi-perf", "-t", str(seconds), *args, url]
    res = subprocess.run(
        cmd, capture_output=True, text=True, errors="replace", timeout=seconds + 60
    )
    found = _AVG.findall(res.stdout)
    if res.returncode != 0 or not found:
        sys.exit(f"iscsi-perf failed ({res.returncode}): {res.stdout[-500:]} {res.stderr[-500:]}")
    iops, mbs = found[-1]
    return int(iops), int(mbs)


def qemu_write(url: str, source: Path, seconds: int) -> tuple[int, int]:
    """Write ``source`` over the LUN with ``qemu-img convert``, again until ``seconds`` passed:
    (0, MB/s)."""
    cmd = ["qemu-img", "convert", "-n", "-W", "-m", "8", "-t", "unsafe", "-f", "raw", "-O", "raw",
           str(source), url]  # fmt: skip
    written, start = 0, time.monotonic()
    while not written or time.monotonic() - start < seconds:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
        if res.returncode != 0:
            sys.exit(f"qemu-img convert failed ({res.returncode}): {res.stderr[-500:]}")
        written += source.stat().st_size
    return 0, int(written / (time.monotonic() - start) / 1e6)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", default="512M", help="image size (default 512M)")
    ap.add_argument("--seconds", type=int, default=10, help="seconds per run (default 10)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--markdown", help="write the result table to this file")
    ap.add_argument("--only", help="the zerosend variants to run, separated by ';' (and tgtd)")
    ap.add_argument(
        "--before",
        metavar="PYTHON",
        help="also run the variants with this interpreter (an earlier build), named 'before ...'",
    )
    opts = ap.parse_args()
    if opts.before and shutil.which(opts.before) is None:
        sys.exit(f"--before: {opts.before} is not an executable interpreter")
    if shutil.which("iscsi-perf") is None:
        sys.exit("iscsi-perf not found (Debian package libiscsi-bin)")
    if shutil.which("qemu-img") is None:
        sys.exit("qemu-img not found (Debian packages qemu-utils and qemu-block-extra)")
    tmp = Path(tempfile.mkdtemp(prefix="zs-iscsi-bench-"))
    image = tmp / "disk.img"
    source = tmp / "source.img"  # what the writes write
    for path in (image, source):
        with path.open("wb") as f:  # real bytes, not a hole: the targets read the page cache
            for _ in range(parse_size(opts.size) >> 20):
                f.write(os.urandom(1 << 20))
    # zerosend as (LUN form, further options): reading into pooled buffers (the default), the same
    # with the READ fast path's inner loop in Python instead of Rust ("py-loop"), a writable
    # mapped image (":mmap": read into pooled buffers too, since a WRITE could change mapped
    # pages in flight), a read-only image read into pooled buffers (":ro"), sent from its
    # mapping (":ro,mmap") or with sendfile (":ro sendfile"); tgtd with its default backing
    # store (pread in threads).
    forms: dict[str, tuple[str, list[str]]] = {
        "zerosend": ("", []),
        "zerosend:py-loop": ("", ["--read-loop", "python"]),
        "zerosend:mmap": (":mmap", []),
        "zerosend:ro": (":ro", []),
        "zerosend:ro,mmap": (":ro,mmap", []),
        "zerosend:ro sendfile": (":ro", ["--sendfile", "on"]),
    }
    if opts.only:
        forms = {k: v for k, v in forms.items() if k in opts.only.split(";")}
    # name -> (interpreter, LUN form, further options)
    variants = {name: (sys.executable, form, options) for name, (form, options) in forms.items()}
    if opts.before:
        for name, (form, options) in forms.items():
            variants[name.replace("zerosend", "before", 1)] = (opts.before, form, options)
    procs: list[subprocess.Popen[bytes]] = []
    urls = {name: f"iscsi://127.0.0.1:{3272 + i}/{IQN_ZS}/0" for i, name in enumerate(variants)}
    urls["tgtd"] = f"iscsi://127.0.0.1:3271/{IQN_TGT}/1"
    results: dict[tuple[str, str], list[tuple[int, int]]] = {}
    try:
        for i, (python, form, options) in enumerate(variants.values()):
            log = tmp / f"zerosend-{i}.log"
            procs.append(start_zerosend(python, f"{image}{form}", 3272 + i, log, options))
        procs.append(start_tgtd(image, 3271, 7, tmp / "tgtd.log"))
        # Untimed: the first writes into the image's clean page cache cost more than any later
        # ones, and no target should be the one to pay for them.
        qemu_write(urls["tgtd"], source, 0)
        for r in range(opts.rounds):
            for wl in [*WORKLOADS, WRITES]:
                order = list(urls) if r % 2 == 0 else list(reversed(urls))
                for name in order:
                    if wl == WRITES:
                        iops, mbs = qemu_write(urls[name], source, opts.seconds)
                    else:
                        iops, mbs = perf(urls[name], WORKLOADS[wl], opts.seconds)
                    results.setdefault((name, wl), []).append((iops, mbs))
                    print(
                        f"round {r + 1} {wl:16} {name:16} {iops:8d} IOPS {mbs:6d} MB/s", flush=True
                    )
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)  # tgtd ignores it in the foreground: killed below
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [
        f"iscsi-perf and qemu-img, {opts.rounds} alternating rounds of {opts.seconds} s, "
        f"{opts.size} image, median of rounds, {os.cpu_count()} CPUs, loopback",
        "",
        "| workload | target | IOPS | MB/s | vs tgtd |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for wl in [*WORKLOADS, WRITES]:
        measure = 1 if wl == WRITES else 0  # the ratio of MB/s, or of IOPS
        base = statistics.median(r[measure] for r in results[("tgtd", wl)])
        for name in urls:
            median_iops = statistics.median(i for i, _ in results[(name, wl)])
            median_mbs = statistics.median(m for _, m in results[(name, wl)])
            ratio = statistics.median(r[measure] for r in results[(name, wl)]) / base
            shown_iops = "-" if wl == WRITES else f"{median_iops:.0f}"
            lines.append(f"| {wl} | {name} | {shown_iops} | {median_mbs:.0f} | {ratio:.2f} |")
    table = "\n".join(lines)
    print("\n" + table)
    if opts.markdown:
        Path(opts.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
