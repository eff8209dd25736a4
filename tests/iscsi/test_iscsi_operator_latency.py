"""Command and disk latency histograms on the metrics endpoint, read with prometheus_client's own
parser: their counts equal the commands a client sent (by target, LUN and op family: the READ
fast path, the general paths, other commands) and the store operations those commands did."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from iscsi_helpers import MiniInitiator, RunningTarget, need, read10, run, write10

from zerosend.iscsi.service.config import LunSpec, TargetConfig
from zerosend.iscsi.service.target import Target

parser = pytest.importorskip("prometheus_client.parser")

A, B = "iqn.2024-01.org.zerosend:alpha", "iqn.2024-01.org.zerosend:beta"
CMD, DISK = "zerosend_iscsi_command_seconds", "zerosend_iscsi_disk_seconds"
GOOD = 0
SYNC10 = bytes((0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0))
INQUIRY = bytes((0x12, 0, 0, 0, 96, 0))


def start(tmp_path: Path, *args: str) -> RunningTarget:
    log_path = tmp_path / f"target-{time.monotonic_ns()}.log"
    cmd = [sys.executable, "-m", "zerosend.iscsi", "--listen", "127.0.0.1:0", *args]
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
    t = RunningTarget(proc, 0, A, log_path)
    deadline = time.monotonic() + 60
    while (m := re.search(r"metrics on (http://[\d.]+:\d+/metrics)", t.log())) is None:
        if proc.poll() is not None:
            pytest.fail(f"target exited with {proc.returncode}:\n{t.log()}")
        assert time.monotonic() < deadline, f"target did not start:\n{t.log()}"
        time.sleep(0.05)
    port = re.search(r"listening on 127\.0\.0\.1:(\d+)", t.log())
    assert port
    t.port = int(port.group(1))
    t.host = m.group(1)  # (the metrics URL, for scrape)
    return t


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[..., RunningTarget]]:
    started: list[RunningTarget] = []

    def serve(*args: str) -> RunningTarget:
        t = start(tmp_path, "--metrics", "127.0.0.1:0", *args)
        started.append(t)
        return t

    yield serve
    for t in started:
        assert t.stop() == 0, t.log()
        assert "Traceback" not in t.log(), t.log()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(t: RunningTarget) -> Samples:
    text = urllib.request.urlopen(t.host, timeout=30).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in parser.text_string_to_metric_families(text)
        for s in family.samples
    }


def count(samples: Samples, name: str, target: str, lun: int, op: str) -> float:
    return samples[(name + "_count", (("lun", str(lun)), ("op", op), ("target", target)))]


def buckets(samples: Samples, name: str, target: str, lun: int, op: str) -> dict[str, float]:
    want = {("lun", str(lun)), ("op", op), ("target", target)}
    return {
        dict(labels)["le"]: v
        for (n, labels), v in samples.items()
        if n == name + "_bucket" and want <= set(labels)
    }


def command(ini: MiniInitiator, cdb: bytes, lun: int = 0, edtl: int = 0, out: bytes = b""):
    ini.scsi(cdb, edtl or len(out), read=edtl > 0, write=bool(out), data=out, lun=lun)
    status, data, _ = ini.read_response()
    assert status == GOOD
    return data


def test_counts_equal_the_commands_sent_by_lun_and_op(daemon, tmp_path: Path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    t = daemon("--iqn", A, "--lun", str(image), "--lun", "mem:1M")
    before = scrape(t)
    for lun in (0, 1):
        for op in ("read", "write", "other"):
            assert count(before, CMD, A, lun, op) == 0
    ini = MiniInitiator(t.port)
    ini.login(A)
    for n in range(7):  # the READ fast path: plain READ(10)s of the image
        assert len(command(ini, read10(n, 1), 0, 512)) == 512
    for n in range(3):
        command(ini, write10(n, 1), 0, out=bytes([n]) * 512)
    command(ini, SYNC10, 0)
    command(ini, INQUIRY, 0, 96)
    for n in range(2):
        command(ini, read10(n, 2), 1, 1024)  # a mem LUN: the general READ path
    command(ini, write10(0, 1), 1, out=b"\1" * 512)
    after = scrape(t)
    expected = {(0, "read"): 7, (0, "write"): 3, (0, "other"): 2, (1, "read"): 2,
                (1, "write"): 1, (1, "other"): 0}  # fmt: skip
    for (lun, op), n in expected.items():
        assert count(after, CMD, A, lun, op) == n, (lun, op)
        cumulative = buckets(after, CMD, A, lun, op)
        assert cumulative["+Inf"] == n and cumulative["5e-05"] <= cumulative["10.0"] <= n
    assert after[("zerosend_iscsi_commands_total", ())] == sum(expected.values())
    # The image's store: three writes and one flush (the SYNCHRONIZE CACHE); every fast-path
    # READ came from the page cache without a store operation.
    assert count(after, DISK, A, 0, "read") == 0  # (so the 7 READs took the fast path)
    assert count(after, DISK, A, 0, "write") == 3 and count(after, DISK, A, 0, "flush") == 1
    assert count(after, DISK, A, 1, "write") == 1
    assert after[(DISK + "_sum", (("lun", "0"), ("op", "write"), ("target", A)))] > 0
    ini.close()


def test_reads_off_the_fast_path_are_store_reads(daemon, tmp_path: Path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    t = daemon("--iqn", A, "--lun", str(image))
    ini = MiniInitiator(t.port)
    ini.login(A, {"HeaderDigest": "CRC32C"})  # digests: every READ takes the general path
    for n in range(5):
        assert len(command(ini, read10(n * 8, 8), 0, 4096)) == 4096
    s = scrape(t)
    assert count(s, CMD, A, 0, "read") == 5 and count(s, DISK, A, 0, "read") == 5
    ini.close()


def test_each_target_counts_its_own_and_a_real_client_adds_up(daemon, tmp_path: Path):
    qemu, inq = need("qemu-img"), need("iscsi-inq")
    images = {}
    for name in ("a", "b"):
        images[name] = tmp_path / f"{name}.img"
        images[name].write_bytes(bytes([ord(name)]) * (4 << 20))
    config = tmp_path / "targets.toml"
    config.write_text(
        f'[[target]]\niqn = "{A}"\nluns = ["{images["a"]}"]\n'
        f'[[target]]\niqn = "{B}"\nluns = ["{images["b"]}", "mem:1M"]\n'
    )
    t = daemon("--config", str(config))
    out = tmp_path / "copy.raw"
    run([qemu, "convert", "-O", "raw", f"iscsi://127.0.0.1:{t.port}/{B}/0", str(out)])
    assert out.read_bytes() == images["b"].read_bytes()
    run([inq, f"iscsi://127.0.0.1:{t.port}/{A}/0"])
    s = scrape(t)
    # Every command either client sent is in exactly one histogram of the target it named.
    sent = s[("zerosend_iscsi_commands_total", ())]
    timed = {
        target: sum(
            count(s, CMD, target, lun, op) for lun in luns for op in ("read", "write", "other")
        )
        for target, luns in ((A, (0,)), (B, (0, 1)))
    }
    assert timed[A] + timed[B] == sent
    assert count(s, CMD, B, 0, "read") >= (4 << 20) // (2 << 20)  # qemu read it all
    assert count(s, CMD, A, 0, "read") == 0 and timed[A] >= 1  # INQUIRY and the like
    assert count(s, CMD, B, 1, "read") == 0  # nobody read beta's second LUN


def test_without_metrics_nothing_is_timed():
    """The histograms cost nothing when not served: no store is wrapped, no command timed."""

    async def build() -> tuple[Target, Target]:
        plain = Target(TargetConfig(luns=[LunSpec("mem:1M")]))
        measured = Target(TargetConfig(luns=[LunSpec("mem:1M")], metrics="127.0.0.1:0"))
        return plain, measured

    plain, measured = asyncio.run(build())
    try:
        assert plain.first.latency == {} and "write" not in vars(plain.luns[0].store)
        assert set(measured.first.latency) == {0} and "write" in vars(measured.luns[0].store)
    finally:
        for t in (plain, measured):
            for lu in t.luns.values():
                lu.store.close()
