"""The target's settings are defined once (``config.SETTINGS``): every one is a command-line
option and a TOML key, and both spellings give the same configuration."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from zerosend.iscsi.service.cli import build_parser
from zerosend.iscsi.service.config import SETTINGS, TargetConfig, load_config


def test_every_config_field_is_a_setting():
    assert [s.key for s in SETTINGS] == [f.name for f in fields(TargetConfig)]


def test_command_line_and_toml_give_the_same_config(tmp_path: Path):
    (tmp_path / "alice").write_text("secret-number-one\n")
    (tmp_path / "tgt").write_text("secret-number-two")
    for name in ("alice", "tgt"):
        (tmp_path / name).chmod(0o600)
    argv = [
        "--listen", "0.0.0.0:3999", "--iqn", "iqn.2024-01.org.example:same",
        "--lun", "mem:4M", "--lun", "/srv/a.img:ro,mmap",
        "--chap", f"user=alice,secret_file={tmp_path / 'alice'}",
        "--mutual-chap", f"user=tgt,secret_file={tmp_path / 'tgt'}",
        "--allow", "iqn.a", "--allow", "iqn.b", "--cross-session-resets", "on",
        "--max-connections", "9", "--max-pending-logins", "3",
        "--buffers", "12", "--buffer-size", "64K",
        "--backend", "msg_zerocopy", "--zerocopy-probe", "off",
        "--reservation-state", "/var/lib/zs/pr.json",
    ]  # fmt: skip
    toml = tmp_path / "target.toml"
    toml.write_text(
        'listen = "0.0.0.0:3999"\niqn = "iqn.2024-01.org.example:same"\n'
        'luns = ["mem:4M", "/srv/a.img:ro,mmap"]\n'
        'chap = { user = "alice", secret = "secret-number-one" }\n'
        'mutual_chap = "tgt:secret-number-two"\n'
        'allow = ["iqn.b", "iqn.a"]\ncross_session_resets = true\n'
        'max_connections = 9\nmax_pending_logins = "3"\n'
        'buffers = 12\nbuffer_size = "64K"\nbackend = "msg_zerocopy"\nzerocopy_probe = false\n'
        'reservation_state = "/var/lib/zs/pr.json"\n'
    )
    from_cli = load_config(vars(build_parser().parse_args(argv)))
    from_toml = load_config(vars(build_parser().parse_args(["--config", str(toml)])), str(toml))
    assert from_cli == from_toml
    assert from_cli.buffer_size == 65536 and from_cli.luns[1].mapped and from_cli.luns[1].readonly
    assert from_cli.allow == frozenset({"iqn.a", "iqn.b"}) and from_cli.cross_session_resets
    assert from_cli.backend == "msg_zerocopy" and from_cli.zerocopy_probe is False


def test_command_line_wins_and_bad_values_name_their_setting(tmp_path: Path):
    toml = tmp_path / "target.toml"
    toml.write_text('luns = ["mem:1M"]\nbuffers = 5\n')
    args = vars(build_parser().parse_args(["--buffers", "7"]))
    assert load_config(args, str(toml)).buffers == 7
    toml.write_text('luns = ["mem:1M"]\nbuffers = "many"\n')
    with pytest.raises(ValueError, match="config key buffers"):
        load_config(vars(build_parser().parse_args([])), str(toml))
    with pytest.raises(ValueError, match="--max-connections"):
        load_config(vars(build_parser().parse_args(["--lun", "x", "--max-connections", "z"])))
    toml.write_text('luns = ["mem:1M"]\nbufers = 5\n')
    with pytest.raises(ValueError, match="unknown keys bufers"):
        load_config({}, str(toml))


def test_backend_and_probe_refuse_unknown_values():
    with pytest.raises(ValueError, match="--backend: must be one of auto, io_uring"):
        load_config(vars(build_parser().parse_args(["--lun", "x", "--backend", "zc"])))
    with pytest.raises(ValueError, match="--zerocopy-probe: must be on or off"):
        load_config(vars(build_parser().parse_args(["--lun", "x", "--zerocopy-probe", "no"])))
    assert load_config({"luns": ["x"]}).zerocopy_probe is True


@pytest.mark.parametrize(
    ("chap", "mutual", "message"),
    [
        ('{ user = "alice" }', None, "secret of user 'alice' is 0 bytes"),
        ('{ user = "alice", secret = "" }', None, "secret of user 'alice' is 0 bytes"),
        ('{ secret = "long-enough-secret" }', None, "user name is empty"),
        ('"alice:short-one"', None, "is 9 bytes; RFC 7143 12.1.3 needs at least 12"),
        ('"alice:same-secret-both"', '"tgt:same-secret-both"', "forbids using one secret"),
    ],
)
def test_chap_secrets_are_checked_at_start_up(tmp_path: Path, chap, mutual, message):
    """RFC 7143 12.1.3: no empty or short (under 96 bits) secret, no secret in both directions.
    The target refuses to start and says what to change."""
    toml = tmp_path / "target.toml"
    text = f'luns = ["mem:1M"]\nchap = {chap}\n'
    if mutual:
        text += f"mutual_chap = {mutual}\n"
    toml.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config({}, str(toml))
    res = subprocess.run(
        [sys.executable, "-m", "zerosend.iscsi", "--config", str(toml)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and message.split(";")[0] in res.stderr, res.stderr


def test_chap_secret_rules_hold_on_the_command_line(tmp_path: Path):
    short, twelve = tmp_path / "short", tmp_path / "twelve"
    short.write_text("short")
    twelve.write_text("twelve-bytes")
    for f in (short, twelve):
        f.chmod(0o600)
    with pytest.raises(ValueError, match="--chap: the CHAP secret of user 'alice' is 5 bytes"):
        load_config({"luns": ["x"], "chap": f"user=alice,secret_file={short}"})
    with pytest.raises(ValueError, match="forbids using one secret"):
        load_config({"luns": ["x"], "chap": f"user=a,secret_file={twelve}",
                     "mutual_chap": f"user=t,secret_file={twelve}"})  # fmt: skip
