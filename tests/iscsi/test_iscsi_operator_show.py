"""``zerosend-iscsi show``: the live state (sessions, connections, LUNs, reservations, commands
in flight) read from the target's control socket, a 0600 AF_UNIX socket."""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from iscsi_helpers import IQN, MiniInitiator, need, run

from zerosend.iscsi.service.control import request

KEY = 0x1122334455667788


def show(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zerosend.iscsi", "show", "--control-socket", str(path), *extra],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def prout(ini: MiniInitiator, action: int, key: int, sa_key: int, kind: int = 0) -> int:
    params = struct.pack(">QQ4xB3x", key, sa_key, 0)
    cdb = struct.pack(">BBBxxIB", 0x5F, action, kind, len(params), 0)
    ini.scsi(cdb, len(params), write=True, data=params)
    return ini.read_response()[0]


def test_show_prints_sessions_luns_and_reservations(target_factory, tmp_path: Path):
    ctl = tmp_path / "control"
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    t = target_factory("--lun", str(image), "--lun", "mem:1M", "--control-socket", str(ctl))
    st = os.stat(ctl)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    ini = MiniInitiator(t.port)
    ini.login(IQN, {"InitiatorName": "iqn.2024-01.org.zerosend:shown"})
    assert prout(ini, 0, 0, KEY) == 0  # REGISTER
    assert prout(ini, 1, KEY, 0, kind=1) == 0  # RESERVE, Write Exclusive
    inq = need("iscsi-inq")
    run([inq, t.url(1)])  # a session that came and went
    res = show(ctl)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert f"Target {IQN} on 127.0.0.1:{t.port}" in out
    assert f"LUN 0: {image} (raw, 1048576 bytes, rw)" in out and "LUN 1: mem:" in out
    assert "1 registered, WE reservation held by iqn.2024-01.org.zerosend:shown,i,0x8000" in out
    assert "Connections: 1" in out and "iqn.2024-01.org.zerosend:shown" in out
    assert "(normal) ISID 800000010203" in out and "commands in flight 0" in out
    data = json.loads(show(ctl, "--json").stdout)
    assert [lu["lun"] for lu in data["luns"]] == [0, 1]
    assert data["sessions"][0]["initiator"] == "iqn.2024-01.org.zerosend:shown"
    ini.close()


def test_show_names_the_socket_it_cannot_reach(tmp_path: Path):
    res = show(tmp_path / "none")
    assert res.returncode == 1 and f"cannot reach {tmp_path / 'none'}" in res.stderr


def test_unknown_command_and_no_secret_in_state(target_factory, tmp_path: Path):
    ctl = tmp_path / "control"
    secret = tmp_path / "alice"
    secret.write_text("alice-secret-0123\n")
    secret.chmod(0o600)
    acl = f'{{ initiator = "iqn.a", chap = {{ user = "alice", secret_file = "{secret}" }} }}'
    t = target_factory("--lun", "mem:1M", "--control-socket", str(ctl), "--acl", acl)
    assert "unknown command" in request(str(ctl), "reload")["error"]
    raw = json.dumps(request(str(ctl)))
    assert "alice-secret-0123" not in raw and '"chap_user": "alice"' in raw
    assert "CHAP user alice" in show(ctl).stdout
    assert t.proc.poll() is None


def test_a_live_socket_is_not_taken_over_and_a_stale_one_is_replaced(target_factory, tmp_path):
    ctl = tmp_path / "control"
    target_factory("--lun", "mem:1M", "--control-socket", str(ctl))
    res = subprocess.run(
        [sys.executable, "-m", "zerosend.iscsi", "--lun", "mem:1M", "--listen", "127.0.0.1:0",
         "--control-socket", str(ctl)], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2 and "another target is serving it" in res.stderr
    stale = tmp_path / "stale"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on, as a killed target leaves it
    target_factory("--lun", "mem:1M", "--control-socket", str(stale))
    assert show(stale).returncode == 0


@pytest.mark.parametrize("mode", [0o644])
def test_a_file_in_the_way_is_refused(tmp_path: Path, mode: int):
    path = tmp_path / "control"
    path.write_text("not a socket")
    path.chmod(mode)
    res = subprocess.run(
        [sys.executable, "-m", "zerosend.iscsi", "--lun", "mem:1M", "--listen", "127.0.0.1:0",
         "--control-socket", str(path)], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2 and "a file that is not a socket is in the way" in res.stderr
    assert path.read_text() == "not a socket"
