"""CHAP secrets: read from a file of their own or a systemd credential, refused on the command
line, never printed; CHAP with SHA-256 and SHA3-256 (CHAP_A 7, 8) chosen over MD5 (5)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from iscsi_helpers import IQN, MiniInitiator, need, run, wait_for

from zerosend.iscsi.service.config import load_config
from zerosend.iscsi.wire.chap import Credentials

SECRET = "s3cret-passw0rd-one"
TARGET_SECRET = "t4rget-secret-two"


def secret_file(path: Path, secret: str, mode: int = 0o600) -> str:
    path.write_text(secret + "\n")
    path.chmod(mode)
    return str(path)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zerosend.iscsi", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.mark.parametrize("flag", ["--chap", "--mutual-chap"])
@pytest.mark.parametrize("value", [f"alice:{SECRET}", f"user=alice,secret={SECRET}"])
def test_a_secret_on_the_command_line_is_refused(flag: str, value: str):
    res = cli("--check", "--lun", "mem:1M", flag, value)
    assert res.returncode == 2, res.stderr
    assert f"{flag}: a CHAP secret on the command line is visible" in res.stderr
    assert "user=NAME,secret_file=FILE" in res.stderr and SECRET not in res.stderr


def test_secret_file_on_the_command_line_and_in_the_config(tmp_path: Path):
    path = secret_file(tmp_path / "alice", SECRET)
    cfg = load_config({"luns": ["mem:1M"], "chap": f"user=alice,secret_file={path}"})
    assert cfg.chap == Credentials("alice", SECRET)  # the final newline is not the secret's
    toml = tmp_path / "t.toml"
    toml.write_text(f'luns = ["mem:1M"]\nchap = {{ user = "alice", secret_file = "{path}" }}\n')
    assert load_config({}, str(toml)).chap == Credentials("alice", SECRET)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('{ user = "a", secret_file = "OPEN" }', "config key chap.secret_file: "),
        ('{ user = "a", secret_file = "MISSING" }', "chap.secret_file: cannot read"),
        ('{ user = "a", secret = "x", secret_file = "F" }', "chap.secret_file: give one of"),
        ('{ user = "a", credential = "alice" }', "chap.credential: credential 'alice': $CRED"),
        ('{ user = "a", credential = "../x" }', "chap.credential: '../x' is not a credential"),
        ('{ user = "a", secret_fil = "F" }', "config key chap.secret_fil: unknown key"),
    ],
)
def test_bad_secret_sources_name_the_key(tmp_path: Path, monkeypatch, table: str, message: str):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    if 'credential = "../x"' in table:
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    opened = secret_file(tmp_path / "open", SECRET, 0o644)
    table = table.replace("OPEN", opened).replace("MISSING", str(tmp_path / "none"))
    table = table.replace('"F"', f'"{secret_file(tmp_path / "f", SECRET)}"')
    toml = tmp_path / "t.toml"
    toml.write_text(f'luns = ["mem:1M"]\nchap = {table}\n')
    with pytest.raises(ValueError) as e:
        load_config({}, str(toml))
    assert message in str(e.value) and SECRET not in str(e.value)
    if "OPEN" in message:
        assert "is open to other users (mode 0644): chmod 600 it" in str(e.value)


def test_a_secret_file_other_users_can_read_is_refused(tmp_path: Path):
    path = secret_file(tmp_path / "alice", SECRET, 0o640)
    with pytest.raises(ValueError, match=r"--chap.secret_file: .* open to other users \(mode 0640"):
        load_config({"luns": ["mem:1M"], "chap": f"user=alice,secret_file={path}"})


def test_systemd_credentials(tmp_path: Path, monkeypatch):
    """LoadCredential=alice-chap:/etc/... puts the file in $CREDENTIALS_DIRECTORY (systemd is
    not the init here: the variable is set as systemd sets it)."""
    creds = tmp_path / "credentials"
    creds.mkdir()
    secret_file(creds / "alice-chap", SECRET, 0o440)  # systemd guards the directory itself
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    cfg = load_config({"luns": ["mem:1M"], "chap": "user=alice,credential=alice-chap"})
    assert cfg.chap == Credentials("alice", SECRET)


def test_secrets_are_never_printed(tmp_path: Path):
    path = secret_file(tmp_path / "alice", SECRET)
    tpath = secret_file(tmp_path / "tgt", TARGET_SECRET)
    cfg = load_config({"luns": ["mem:1M"], "chap": f"user=alice,secret_file={path}",
                       "mutual_chap": f"user=tgt,secret_file={tpath}"})  # fmt: skip
    for text in (repr(cfg), str(cfg), repr(cfg.chap)):
        assert SECRET not in text and TARGET_SECRET not in text
    assert "alice" in repr(cfg.chap)


def test_login_with_a_secret_file_and_rotation_by_reload(target_factory, tmp_path: Path):
    """libiscsi logs in with the file's secret (and the target's debug log never shows it); a
    new secret in the file takes effect at the next reload."""
    inq = need("iscsi-inq")
    path = secret_file(tmp_path / "alice", SECRET)
    toml = tmp_path / "t.toml"
    toml.write_text(f'luns = ["mem:1M"]\nchap = {{ user = "alice", secret_file = "{path}" }}\n')
    t = target_factory("--config", str(toml), "--log-level", "DEBUG")
    assert "Vendor:ZEROSEND" in run([inq, t.url(auth=f"alice%{SECRET}")]).stdout
    rotated = "r0tated-secret-three"
    secret_file(tmp_path / "alice", rotated)
    t.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload done" in t.log(), "the reload", 60)
    assert run([inq, t.url(auth=f"alice%{SECRET}")], check=False).returncode != 0
    assert "Vendor:ZEROSEND" in run([inq, t.url(auth=f"alice%{rotated}")]).stdout
    assert SECRET not in t.log() and rotated not in t.log()


# -- CHAP_A: raw logins, since libiscsi 1.19 offers MD5 only


def _login(ini: MiniInitiator, csg: int, nsg: int, transit: bool, keys: dict[str, str]):
    bhs = bytearray(48)
    bhs[0] = 0x43
    bhs[1] = (0x80 if transit else 0) | (csg << 2) | (nsg if transit else 0)
    bhs[8:14] = ini.isid
    bhs[16:20] = ini.next_itt().to_bytes(4, "big")
    bhs[24:28] = ini.cmdsn.to_bytes(4, "big")
    ini.send(bhs, b"".join(f"{k}={v}".encode() + b"\0" for k, v in keys.items()))
    rsp, data = ini.recv()
    answers = dict(kv.split("=", 1) for kv in data.decode().split("\0") if kv)
    return (rsp[36], rsp[37]), answers


HASHES = {5: hashlib.md5, 7: hashlib.sha256, 8: hashlib.sha3_256}


def chap_login(port: int, offered: str, secret: str = SECRET, mutual: str | None = None):
    """A CHAP login offering ``offered``; returns (status, chosen algorithm, last answers)."""
    ini = MiniInitiator(port)
    try:
        status, ans = _login(ini, 0, 0, False, {
            "InitiatorName": "iqn.2024-01.org.zerosend:mini", "TargetName": IQN,
            "SessionType": "Normal", "AuthMethod": "CHAP",
        })  # fmt: skip
        assert status == (0, 0) and ans["AuthMethod"] == "CHAP", (status, ans)
        status, ans = _login(ini, 0, 0, False, {"CHAP_A": offered})
        if status != (0, 0):
            return status, None, ans
        algorithm = int(ans["CHAP_A"])
        h = HASHES[algorithm]
        challenge = bytes.fromhex(ans["CHAP_C"][2:])
        assert len(challenge) == h().digest_size  # a challenge as long as the digest
        answer = h(bytes((int(ans["CHAP_I"]),)) + secret.encode() + challenge).hexdigest()
        keys = {"CHAP_N": "alice", "CHAP_R": "0x" + answer}
        mine = os.urandom(h().digest_size)
        if mutual is not None:
            keys.update({"CHAP_I": "7", "CHAP_C": "0x" + mine.hex()})
        status, ans = _login(ini, 0, 1, True, keys)
        if mutual is not None and status == (0, 0):
            want = h(bytes((7,)) + mutual.encode() + mine).hexdigest()
            assert ans["CHAP_N"] == "tgt" and ans["CHAP_R"] == "0x" + want, ans
        return status, algorithm, ans
    finally:
        ini.close()


@pytest.fixture
def chap_target(target_factory, tmp_path: Path):
    path = secret_file(tmp_path / "alice", SECRET)
    tpath = secret_file(tmp_path / "tgt", TARGET_SECRET)
    return target_factory("--lun", "mem:1M", "--chap", f"user=alice,secret_file={path}",
                          "--mutual-chap", f"user=tgt,secret_file={tpath}")  # fmt: skip


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [("5", 5), ("7", 7), ("8", 8), ("5,7", 7), ("5,8,7", 8), ("7,8,5", 7), ("6,x,5", 5)],
)
def test_chap_chooses_sha2_or_sha3_over_md5(chap_target, offered: str, chosen: int):
    status, algorithm, _ = chap_login(chap_target.port, offered)
    assert status == (0, 0) and algorithm == chosen
    status, _, _ = chap_login(chap_target.port, offered, secret="wrong-secret-four")
    assert status == (2, 1)  # authentication failure


@pytest.mark.parametrize("offered", ["7", "8"])
def test_mutual_chap_answers_with_the_chosen_hash(chap_target, offered: str):
    status, algorithm, _ = chap_login(chap_target.port, offered, mutual=TARGET_SECRET)
    assert status == (0, 0) and algorithm == int(offered)


def test_chap_without_a_known_algorithm_fails_the_login(chap_target):
    status, algorithm, _ = chap_login(chap_target.port, "6,128")
    assert status == (2, 1) and algorithm is None
    wait_for(lambda: "supported: 7 (SHA-256), 8 (SHA3-256), 5 (MD5)" in chap_target.log(),
             "the log line", 30)  # fmt: skip


def test_libiscsi_md5_login_still_works(chap_target):
    inq = need("iscsi-inq")
    assert "Vendor:ZEROSEND" in run([inq, chap_target.url(auth=f"alice%{SECRET}")]).stdout
