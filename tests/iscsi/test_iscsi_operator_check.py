"""Operating the target: ``--check`` and ``--version``, the metrics address and its connection
cap, the warning for a target open to the network, and the generated config reference."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from iscsi_helpers import RunningTarget, need, run, wait_for

import zerosend
from zerosend.iscsi.service import configdoc
from zerosend.iscsi.service.checks import exposure_warnings
from zerosend.iscsi.service.config import load_config

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "zerosend.iscsi"]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60)


def test_version_prints_the_package_version():
    res = cli("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"zerosend-iscsi {zerosend.__version__}"


def test_check_accepts_a_good_config_and_serves_nothing(tmp_path: Path):
    image = tmp_path / "a.img"
    image.write_bytes(b"\0" * 65536)
    toml = tmp_path / "t.toml"
    toml.write_text(f'listen = "127.0.0.1:1"\nluns = ["{image}", "mem:64G"]\n')
    res = cli("--check", "--config", str(toml))
    assert res.returncode == 0, res.stderr
    assert "OK (2 LUNs)" in res.stdout and "WARNING" not in res.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('luns = ["mem:1M"]\nbuffers = "many"\n', "config key buffers"),
        ('luns = ["mem:1M"]\nmetrics = "9310"\n', "config key metrics: '9310' has no port"),
        ('luns = ["mem:1M"]\nmetrics_conections = 3\n', "unknown keys metrics_conections"),
        ('luns = [{ path = "mem:1M", read_only = true }]\n', "config key luns[0].read_only"),
        ('luns = ["mem:lots"]\n', "lots"),
        ('luns = ["/nonexistent/disk.img"]\n', "cannot open LUN image /nonexistent/disk.img"),
    ],
)
def test_check_refuses_a_bad_config_naming_the_key(tmp_path: Path, text: str, message: str):
    toml = tmp_path / "t.toml"
    toml.write_text(text)
    res = cli("--check", "--config", str(toml))
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert "OK" not in res.stdout


def test_check_warns_of_a_target_open_to_the_network(tmp_path: Path):
    toml = tmp_path / "t.toml"
    toml.write_text('listen = "0.0.0.0:3260"\nluns = ["mem:1M"]\n')
    res = cli("--check", "--config", str(toml))
    assert res.returncode == 0 and "with no allow-list, ACLs or CHAP" in res.stderr
    toml.write_text('listen = "0.0.0.0:3260"\nluns = ["mem:1M"]\nallow = ["iqn.x"]\n')
    assert "no allow-list" not in cli("--check", "--config", str(toml)).stderr


def test_exposure_warning_only_off_loopback_without_allow_or_chap():
    cfg = load_config({"luns": ["mem:1M"]})
    assert exposure_warnings(cfg, "127.0.0.1") == [] and exposure_warnings(cfg, "::1") == []
    assert exposure_warnings(cfg, "localhost") == []
    assert exposure_warnings(cfg, "0.0.0.0") and exposure_warnings(cfg, "10.1.2.3")
    assert exposure_warnings(cfg, "::")
    guarded = load_config({"luns": ["mem:1M"], "allow": ["iqn.a"]})
    assert exposure_warnings(guarded, "0.0.0.0") == []
    with_acls = load_config({"luns": ["mem:1M"], "acls": ['{ initiator = "iqn.a" }']})
    assert exposure_warnings(with_acls, "0.0.0.0") == []


def test_start_up_warns_when_listening_on_every_address(tmp_path: Path):
    """Started for real on 0.0.0.0, inside a network namespace of its own (unreachable)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is not installed")
    log_path = tmp_path / "target.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            [unshare, "-n", *CLI, "--listen", "0.0.0.0:0", "--lun", "mem:1M"],
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: "listening on 0.0.0.0" in log_path.read_text(), "the target listens", 60)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log_path.read_text()
    log = log_path.read_text()
    assert "WARNING listening on 0.0.0.0, not a loopback address, with no allow-list" in log, log


@pytest.mark.parametrize(
    ("given", "bound"),
    [(":9310", "127.0.0.1:9310"), ("0.0.0.0:9310", "0.0.0.0:9310"), ("[::1]:9310", "[::1]:9310")],
)
def test_metrics_address_forms(given: str, bound: str):
    assert load_config({"luns": ["mem:1M"], "metrics": given}).metrics == bound


@pytest.mark.parametrize("given", ["9310", "localhost", "[::1]", "127.0.0.1:http", "h:70000"])
def test_metrics_address_without_a_port_is_refused(given: str):
    with pytest.raises(ValueError, match=r"--metrics: .* has no port: write HOST:PORT"):
        load_config({"luns": ["mem:1M"], "metrics": given})


def _metrics_url(t: RunningTarget) -> str:
    pattern = r"metrics on (http://[\d.]+:\d+/metrics)"
    wait_for(lambda: re.search(pattern, t.log()), "the metrics endpoint", 60)
    m = re.search(pattern, t.log())
    assert m, t.log()
    return m.group(1)


def test_metrics_connections_are_capped(target_factory):
    t = target_factory("--lun", "mem:1M", "--metrics", ":0", "--metrics-connections", "2")
    url = _metrics_url(t)
    assert url.startswith("http://127.0.0.1:")  # ":PORT" is loopback
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    # Two clients that never finish their request hold both places (accepted in order)...
    idle = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(2)]
    for s in idle:
        s.sendall(b"GET /metrics HTTP/1.0\r\n")
    # ... so the third is answered 503 at once, not kept waiting.
    with pytest.raises(urllib.error.HTTPError) as busy:
        urllib.request.urlopen(url, timeout=30)
    assert busy.value.code == 503
    for s in idle:
        s.close()

    def scraped() -> bool:
        try:
            return bool(urllib.request.urlopen(url, timeout=30).status == 200)
        except urllib.error.HTTPError:
            return False  # the closed clients' places are not freed yet

    wait_for(scraped, "a scrape once the idle clients left", 60)


def test_a_default_config_serves_to_libiscsi_after_check(target_factory, tmp_path: Path):
    """What --check accepts starts (the same file, served and read by a real client)."""
    inq = need("iscsi-inq")
    toml = tmp_path / "t.toml"
    toml.write_text('luns = ["mem:1M"]\n')
    assert cli("--check", "--config", str(toml)).returncode == 0
    t = target_factory("--config", str(toml))
    assert "Vendor:ZEROSEND" in run([inq, t.url()]).stdout


def test_config_reference_page_is_current():
    page = REPO / "docs" / "iscsi-config.md"
    assert page.read_text() == configdoc.render(), (
        "docs/iscsi-config.md is stale: "
        "python -m zerosend.iscsi.service.configdoc > docs/iscsi-config.md"
    )


def test_config_reference_names_every_setting():
    text = configdoc.render()
    for key in load_config({"luns": ["mem:1M"]}).__dataclass_fields__:
        assert f"## `{key}`" in text


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("max_connections = true", "config key max_connections: must be an integer, not a boolean"),
        ("buffers = 3.7", "config key buffers: must be an integer, not a number"),
        ("buffers = 0", "config key buffers: must be 1 or more, not 0"),
        ("max_pending_logins = -1", "config key max_pending_logins: must be 1 or more"),
        ('session_commands = "many"', "key session_commands: must be an integer, not 'many'"),
        ("buffer_size = true", "config key buffer_size: must be a size"),
        ("session_bytes = 1.5", "config key session_bytes: must be a size"),
        ("nop_interval = true", "key nop_interval: must be a number of seconds, not a boolean"),
        ('user_timeout = "soon"', "key user_timeout: must be a number of seconds, not 'soon'"),
        ("metrics_connections = [1]", "key metrics_connections: must be an integer, not an array"),
    ],
)  # fmt: skip
def test_top_level_values_of_the_wrong_type_are_refused(tmp_path: Path, line: str, message: str):
    """TOML true is not 1, 3.7 is not 3: a wrong type is refused, naming the key."""
    toml = tmp_path / "t.toml"
    toml.write_text(f'luns = ["mem:1M"]\n{line}\n')
    with pytest.raises(ValueError) as e:
        load_config({}, str(toml))
    assert message in str(e.value)


def test_numbers_still_accepted_in_every_spelling(tmp_path: Path):
    toml = tmp_path / "t.toml"
    toml.write_text('luns = ["mem:1M"]\nbuffers = 12\nmax_connections = "9"\nnop_interval = 2\n'
                    'user_timeout = 0.5\nbuffer_size = "64K"\n'
                    'session_bytes = 1048576\n')  # fmt: skip
    cfg = load_config({}, str(toml))
    assert (cfg.buffers, cfg.max_connections, cfg.nop_interval) == (12, 9, 2.0)
    assert (cfg.user_timeout, cfg.buffer_size, cfg.session_bytes) == (0.5, 65536, 1 << 20)
    cli = load_config({"luns": ["mem:1M"], "buffers": "7", "nop_timeout": "1.5"})
    assert cli.buffers == 7 and cli.nop_timeout == 1.5
