"""The metrics operators expect beside the target's own: process and platform collectors,
build info, per-LUN labels, and counters of login failures, rejects, check conditions and
resets, read with prometheus_client's own text parser."""

from __future__ import annotations

import re
import urllib.request

import pytest
from iscsi_helpers import IQN, MiniInitiator, RunningTarget, need, run, task_management, wait_for

import zerosend

parser = pytest.importorskip("prometheus_client.parser")


def scrape(t: RunningTarget) -> dict[str, list[tuple[dict[str, str], float]]]:
    pattern = r"metrics on (http://[\d.]+:\d+/metrics)"
    wait_for(lambda: re.search(pattern, t.log()), "the metrics endpoint", 60)
    m = re.search(pattern, t.log())
    assert m, t.log()
    text = urllib.request.urlopen(m.group(1), timeout=30).read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in parser.text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def value(samples, name: str) -> float:
    (only,) = samples[name]
    return only[1]


def test_process_platform_build_and_lun_metrics(target_factory, tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    t = target_factory("--lun", str(image) + ":ro", "--lun", "mem:2M", "--metrics", "127.0.0.1:0")
    s = scrape(t)
    assert value(s, "process_cpu_seconds_total") >= 0 and value(s, "process_open_fds") > 0
    assert "python_info" in s
    labels, one = s["zerosend_iscsi_build_info"][0]
    assert one == 1 and labels == {"version": zerosend.__version__, "iqn": IQN}
    sizes = {lab["lun"]: (lab, v) for lab, v in s["zerosend_iscsi_lun_size_bytes"]}
    assert sizes["0"][0]["path"] == str(image) and sizes["0"][0]["readonly"] == "true"
    assert sizes["0"][1] == 1 << 20 and sizes["1"][1] == 2 << 20
    assert sizes["1"][0]["kind"] == "mem" and sizes["1"][0]["readonly"] == "false"


def test_failure_counters(target_factory):
    inq = need("iscsi-inq")
    allowed = "iqn.2024-01.org.zerosend:mini"
    t = target_factory("--lun", "mem:1M", "--metrics", "127.0.0.1:0", "--allow", allowed)
    s = scrape(t)
    for name in ("login_failures", "rejects", "check_conditions", "resets"):
        assert value(s, f"zerosend_iscsi_{name}_total") == 0
    assert run([inq, "-i", "iqn.2024-01.org.zerosend:stranger", t.url()], check=False).returncode
    ini = MiniInitiator(t.port)
    ini.login(IQN)
    ini.scsi(bytes(6), 0, lun=5)  # TEST UNIT READY to a LUN that does not exist
    assert ini.read_response()[0] == 2
    assert task_management(ini, 5, lun=0) == 0  # LOGICAL UNIT RESET
    bhs = bytearray(48)
    bhs[0] = 0x40 | 0x1C  # an immediate PDU of an opcode initiators do not have
    bhs[1] = 0x80
    bhs[24:28] = ini.cmdsn.to_bytes(4, "big")
    ini.send(bhs)
    rsp, _ = ini.recv()
    assert rsp[0] & 0x3F == 0x3F  # Reject
    wait_for(lambda: "login of iqn.2024-01.org.zerosend:stranger rejected" in t.log(), "log", 30)
    s = scrape(t)  # the open session counts, and so does the ended one
    assert value(s, "zerosend_iscsi_login_failures_total") == 1
    assert value(s, "zerosend_iscsi_check_conditions_total") >= 1
    assert value(s, "zerosend_iscsi_resets_total") == 1
    assert value(s, "zerosend_iscsi_rejects_total") == 1
    ini.close()
