"""``auto`` that measures: the calibration ``python -m zerosend calibrate`` stores per kernel and
CPU model in the user's cache directory, which ``wrap()``'s defaults then use for TCP.

On the rig (a real peer behind veth, not loopback, which auto always copies to): with no
calibration a 128 KiB send is below the default 1 MiB threshold and copies; with a calibration
that found zero-copy paying from 64 KiB it goes zero-copy, and ``fallback_reason`` says where the
threshold came from. ``python -m zerosend`` prints the threshold and its source, and a cache file
that cannot be used is refused naming the file and the field. The calibration itself runs
against a receiver in the rig.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import zerosend
import zerosend._socket
from bench.harness.receiver import start_receiver
from bench.harness.rig import Rig
from tests.helpers import require_backend, rig_connection
from zerosend import _calibrate, _calibration

KiB = 1 << 10
HANG_GUARD_S = 60


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("ZEROSEND_BACKEND", raising=False)
    monkeypatch.setattr(zerosend._socket, "_cached_thresholds", None)
    yield _calibration.cache_path()


def write(path: Path, document: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))


def main_output(cache_home: Path) -> str:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home)}
    done = subprocess.run(
        [sys.executable, "-m", "zerosend"], capture_output=True, text=True, env=env, check=True
    )
    return done.stdout


def test_main_prints_the_thresholds_and_where_they_came_from(cache: Path) -> None:
    home = Path(os.environ["XDG_CACHE_HOME"])
    assert "1048576 bytes [default" in main_output(home)
    write(cache, {"tcp_zerocopy_threshold": 65536, "measured_at": "then"})
    out = main_output(home)
    assert "65536 bytes [calibrated" in out and str(cache) in out
    write(cache, {"tcp_zerocopy_threshold": None})
    assert "never (every send copies) [calibrated" in main_output(home)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "not JSON"),
        ('{"tcp_zerocopy_threshold": "64K"}', "tcp_zerocopy_threshold"),
        ('{"tcp_zerocopy_threshold": -1}', "tcp_zerocopy_threshold"),
        ("{}", "tcp_zerocopy_threshold"),
    ],
)
def test_a_bad_cache_file_is_refused_naming_the_file_and_field(
    cache: Path, content: str, match: str
) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        _calibration.load()
    assert str(cache) in str(info.value)


def test_the_crossover_is_where_zero_copy_wins_from_there_up() -> None:
    def row(size: int, mode: str, cpu: float, mbps: float) -> dict[str, object]:
        return {"size": size, "mode": mode, "cpu_s_per_gb": cpu, "mb_per_s": mbps}

    rows = [
        row(64 * KiB, "copy", 0.5, 1000),
        row(64 * KiB, "zerocopy", 0.7, 900),  # loses
        row(256 * KiB, "copy", 0.5, 1000),
        row(256 * KiB, "zerocopy", 0.6, 1000),  # costs more CPU
        row(1024 * KiB, "copy", 0.5, 1000),
        row(1024 * KiB, "zerocopy", 0.3, 960),  # wins, within 5% of the rate
    ]
    assert _calibration.crossover(rows) == 1024 * KiB
    rows[-1] = row(1024 * KiB, "zerocopy", 0.3, 900)  # more than 5% slower: copy
    assert _calibration.crossover(rows) is None


async def send_128k(rig: Rig, port: int) -> tuple[zerosend.Socket, dict[str, int], str | None]:
    async with rig_connection(rig, port) as (sock, report):
        zs = zerosend.wrap(sock)
        payload = os.urandom(128 * KiB)
        await asyncio.wait_for(zs.send_zc(payload), HANG_GUARD_S)
        stats, reason = dict(zs.stats), zs.fallback_reason
        await asyncio.wait_for(zs.aclose(), HANG_GUARD_S)
        sock.close()
    assert report["bytes"] == len(payload)
    return zs, stats, reason


@pytest.mark.asyncio
async def test_auto_uses_the_calibrated_threshold_on_the_rig(rig: Rig, cache: Path) -> None:
    require_backend("io_uring")
    _, stats, reason = await send_128k(rig, 5341)
    assert stats["bytes_copied_requested"] == 0 or stats["bytes_zerocopy"] == 0
    assert stats["bytes_zerocopy"] + stats["bytes_copied_by_kernel"] == 0, stats
    assert reason is None or "calibrated" not in reason

    write(cache, {"tcp_zerocopy_threshold": 64 * KiB, "measured_at": "now"})
    zerosend._socket._cached_thresholds = None
    _, stats, reason = await send_128k(rig, 5342)
    assert stats["bytes_zerocopy"] + stats["bytes_copied_by_kernel"] == 128 * KiB, stats
    assert reason is not None and "calibrated" in reason and "65536" in reason


def test_calibrate_measures_against_a_peer_and_stores_the_result(rig: Rig, cache: Path) -> None:
    require_backend("io_uring")
    with start_receiver(rig.peer_addr, 5343, namespace=rig.ns):
        argv = [sys.executable, "-m", "zerosend", "calibrate"]
        argv += ["--connect", f"{rig.peer_addr}:5343", "--seconds", "0.1"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    document = json.loads(cache.read_text())
    modes = {(row["size"], row["mode"]) for row in document["measured"]}
    assert modes == {(s, m) for s in _calibrate.SIZES for m in ("copy", "zerocopy")}
    assert document["cpu"] and document["kernel"]
    assert "[calibrated" in done.stdout
