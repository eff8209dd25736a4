"""The target's settings are defined once (``config.SETTINGS``): every one is a command-line
option and a TOML key, and both spellings give the same configuration."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from zerosend.iscsi.__main__ import build_parser
from zerosend.iscsi.config import SETTINGS, TargetConfig, load_config


def test_every_config_field_is_a_setting():
    assert [s.key for s in SETTINGS] == [f.name for f in fields(TargetConfig)]


def test_command_line_and_toml_give_the_same_config(tmp_path: Path):
    argv = [
        "--listen", "0.0.0.0:3999", "--iqn", "iqn.2024-01.org.example:same",
        "--lun", "mem:4M", "--lun", "/srv/a.img:ro,mmap",
        "--chap", "alice:secret-one", "--mutual-chap", "tgt:secret-two",
        "--allow", "iqn.a", "--allow", "iqn.b",
        "--max-connections", "9", "--max-pending-logins", "3",
        "--buffers", "12", "--buffer-size", "64K",
        "--backend", "msg_zerocopy", "--zerocopy-probe", "off",
        "--reservation-state", "/var/lib/zs/pr.json",
    ]  # fmt: skip
    toml = tmp_path / "target.toml"
    toml.write_text(
        'listen = "0.0.0.0:3999"\niqn = "iqn.2024-01.org.example:same"\n'
        'luns = ["mem:4M", "/srv/a.img:ro,mmap"]\n'
        'chap = { user = "alice", secret = "secret-one" }\nmutual_chap = "tgt:secret-two"\n'
        'allow = ["iqn.b", "iqn.a"]\nmax_connections = 9\nmax_pending_logins = "3"\n'
        'buffers = 12\nbuffer_size = "64K"\nbackend = "msg_zerocopy"\nzerocopy_probe = false\n'
        'reservation_state = "/var/lib/zs/pr.json"\n'
    )
    from_cli = load_config(vars(build_parser().parse_args(argv)))
    from_toml = load_config(vars(build_parser().parse_args(["--config", str(toml)])), str(toml))
    assert from_cli == from_toml
    assert from_cli.buffer_size == 65536 and from_cli.luns[1].mapped and from_cli.luns[1].readonly
    assert from_cli.allow == frozenset({"iqn.a", "iqn.b"})
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
