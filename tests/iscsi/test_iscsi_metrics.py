"""``--metrics HOST:PORT``: the real target's Prometheus endpoint, scraped while real clients
read, checked against what the target logs for each session at its end."""

from __future__ import annotations

import re
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from iscsi_helpers import RunningTarget, make_image, need, run
from prometheus_client.parser import text_string_to_metric_families

MiB = 1 << 20
P = "zerosend_iscsi_"


def metrics_url(t: RunningTarget) -> str:
    m = re.search(r"metrics on (http://[\d.]+:\d+/metrics)", t.log())
    assert m, t.log()
    return m.group(1)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, by (name, sorted labels)."""
    with urllib.request.urlopen(url, timeout=10) as rsp:
        assert rsp.headers["Content-Type"].startswith("text/plain; version=")
        text = rsp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(P + name, tuple(sorted(labels.items())))]


def ended_sessions(log: str) -> list[dict[str, int]]:
    """The counts of each "session ended (...)" line."""
    return [
        {k: int(v) for k, v in re.findall(r"([\w-]+)=(\d+)", m)}
        for m in re.findall(r"session ended \((.*)\)", log)
    ]


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "disk.img"
    return path, make_image(path, 16 * MiB)


def test_scrape_while_a_client_reads(target_factory, image, zc_backend, tmp_path):
    """Zero-copy sends on loopback: the kernel copies them, and the metrics say so."""
    qemu = need("qemu-img")
    perf = need("iscsi-perf")
    path, data = image
    t = target_factory("--lun", str(path), "--metrics", "127.0.0.1:0", "--backend", zc_backend,
                       "--zerocopy-probe", "off")  # fmt: skip
    url = metrics_url(t)
    idle = scrape(url)
    assert value(idle, "sessions", type="normal") == 0
    assert value(idle, "luns") == 1
    assert value(idle, "transmit_buffers_free") == value(idle, "transmit_buffers")
    reader = subprocess.Popen([perf, "-m", "8", "-b", "64", t.url()], stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 60  # a hang guard
        while True:
            during = scrape(url)
            if value(during, "read_bytes_total") >= 4 * MiB:
                break
            assert reader.poll() is None and time.monotonic() < deadline, t.log()
            time.sleep(0.1)
        # The counters keep moving while the client reads (scraped until they did: on a busy
        # machine two scrapes may come before the client's next command).
        later = scrape(url)
        while not (
            value(later, "read_bytes_total") > value(during, "read_bytes_total")
            and value(later, "commands_total") > value(during, "commands_total")
        ):
            assert reader.poll() is None and time.monotonic() < deadline, t.log()
            time.sleep(0.05)
            later = scrape(url)
        assert value(later, "sessions", type="normal") == 1
        assert value(later, "connections") == 1
        # Large Data-In went zero-copy, and loopback copied it: counted as copied by the kernel.
        assert value(later, "sent_bytes_total", how="copied_by_kernel") >= 4 * MiB
        assert value(later, "send_seconds_count", mode="zerocopy") > 0
    finally:
        reader.terminate()
        reader.wait(30)
    copy = tmp_path / "copy.raw"
    run([qemu, "convert", "-f", "raw", "-O", "raw", t.url(), str(copy)])
    assert copy.read_bytes() == data
    deadline = time.monotonic() + 60
    while len(ended_sessions(t.log())) < 2:
        assert time.monotonic() < deadline, t.log()
        time.sleep(0.05)
    after = scrape(url)
    assert value(after, "sessions", type="normal") == 0
    assert value(after, "sessions_ended_total") == 2
    # What the sessions logged at their end is what the endpoint counted.
    ended = ended_sessions(t.log())
    assert value(after, "commands_total") == sum(s["commands"] for s in ended)
    assert value(after, "read_bytes_total") == sum(s["read"] for s in ended)
    assert value(after, "read_bytes_total") >= len(data)
    assert value(after, "sent_bytes_total", how="copied_by_kernel") == sum(
        s["kernel-copied-bytes"] for s in ended
    )
    assert value(after, "sent_bytes_total", how="zerocopy") == sum(
        s["zerocopy-bytes"] for s in ended
    )
    sends = value(after, "send_seconds_count", mode="zerocopy")
    assert value(after, "send_seconds_bucket", mode="zerocopy", le="+Inf") == sends
    assert value(after, "transmit_buffers_free") == value(after, "transmit_buffers")


def test_metrics_endpoint_answers_only_get_metrics(target_factory, image):
    t = target_factory("--lun", str(image[0]), "--metrics", "127.0.0.1:0")
    url = metrics_url(t)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url.replace("/metrics", "/other"), timeout=10)
    assert e.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(url, data=b"x"), timeout=10)
    assert e.value.code == 405
    assert value(scrape(url), "sessions", type="discovery") == 0


def test_metrics_address_in_use_is_a_clear_start_up_error(target_factory, image, tmp_path):
    import socket
    import sys

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = subprocess.run(
            [sys.executable, "-m", "zerosend.iscsi", "--listen", "127.0.0.1:0", "--lun",
             str(image[0]), "--metrics", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in res.stderr
