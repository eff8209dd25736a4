"""Per-initiator ACLs: each initiator with its own CHAP credentials, the LUNs it sees (LUN
masking, everywhere a LUN is looked up: commands, the READ fast path, REPORT LUNS, EXTENDED
COPY's targets), read-only access per initiator, address filters, and separate discovery
authentication; plus the README's two-initiator setup, started as written."""

from __future__ import annotations

import hashlib
import re
import signal
import struct
from pathlib import Path

import pytest
from iscsi_helpers import IQN, MiniInitiator, RunningTarget, need, run, task_management, wait_for

from zerosend.iscsi.service.config import load_config

REPO = Path(__file__).resolve().parents[2]
DB, WEB, STRANGER = (f"iqn.1994-05.com.redhat:{n}" for n in ("db1", "web1", "stranger"))
DB_SECRET, WEB_SECRET, DISCOVERY_SECRET = "db1-secret-0123", "web1-secret-4567", "disc-secret-89ab"
GOOD, CHECK_CONDITION = 0, 2
ILLEGAL_REQUEST, DATA_PROTECT, COPY_ABORTED = 0x05, 0x07, 0x0A
WWN = {n: f"500140500000000{n}" for n in range(3)}


def secret_file(directory: Path, name: str, secret: str) -> str:
    path = directory / name
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return str(path)


def config_text(tmp_path: Path, acls: str, extra: str = "") -> str:
    # Image files: a READ of one may be served by the READ fast path, which masking must reach.
    for n in range(3):
        (tmp_path / f"lun{n}.img").write_bytes(bytes([n]) * (1 << 20))
    luns = ", ".join(
        f'{{ path = "{tmp_path}/lun{n}.img", lun = {n}, wwn = "naa.{WWN[n]}" }}' for n in range(3)
    )
    return f"luns = [{luns}]\n{extra}{acls}"


def acls(tmp_path: Path, db: str = "", web: str = "") -> str:
    d = secret_file(tmp_path, "db1", DB_SECRET)
    w = secret_file(tmp_path, "web1", WEB_SECRET)
    return (
        f'[[acls]]\ninitiator = "{DB}"\nchap = {{ user = "db1", secret_file = "{d}" }}\n'
        f"luns = [0, 2]\n{db}"
        f'[[acls]]\ninitiator = "{WEB}"\nchap = {{ user = "web1", secret_file = "{w}" }}\n'
        f"luns = [1, 2]\nreadonly_luns = [2]\n{web}"
    )


def serve(target_factory, tmp_path: Path, text: str) -> tuple[RunningTarget, Path]:
    config = tmp_path / "target.toml"
    config.write_text(text)
    return target_factory("--config", str(config)), config


def _login_step(ini: MiniInitiator, csg: int, nsg: int, transit: bool, keys: dict[str, str]):
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


def chap_session(
    port: int, initiator: str, user: str, secret: str, target: str = IQN
) -> MiniInitiator:
    """A raw-PDU normal session logged in with CHAP (MD5) as ``user``."""
    ini = MiniInitiator(port)
    status, _ = _login_step(ini, 0, 0, False, {
        "InitiatorName": initiator, "TargetName": target, "SessionType": "Normal",
        "AuthMethod": "CHAP",
    })  # fmt: skip
    assert status == (0, 0), status
    status, ans = _login_step(ini, 0, 0, False, {"CHAP_A": "5"})
    assert status == (0, 0), status
    challenge = bytes.fromhex(ans["CHAP_C"][2:])
    answer = hashlib.md5(bytes((int(ans["CHAP_I"]),)) + secret.encode() + challenge).hexdigest()
    status, _ = _login_step(ini, 0, 1, True, {"CHAP_N": user, "CHAP_R": "0x" + answer})
    assert status == (0, 0), f"CHAP login of {user} failed: {status}"
    status, _ = _login_step(ini, 1, 3, True, {
        "HeaderDigest": "None", "DataDigest": "None", "MaxRecvDataSegmentLength": "8192",
        "InitialR2T": "Yes", "ImmediateData": "Yes",
    })  # fmt: skip
    assert status == (0, 0), status
    return ini


def command(ini: MiniInitiator, cdb: bytes, lun: int, want: int = 0, out: bytes = b""):
    ini.scsi(cdb, want or len(out), read=want > 0, write=bool(out), data=out, lun=lun)
    return ini.read_response()


def key(sense: bytes) -> tuple[int, int, int]:
    return sense[2] & 0x0F, sense[12], sense[13]


def reported(ini: MiniInitiator) -> list[int]:
    status, data, _ = command(ini, struct.pack(">BBBxxxIxx", 0xA0, 0, 0, 4096), 0, 4096)
    assert status == GOOD
    size = struct.unpack_from(">I", data)[0]
    return [int.from_bytes(data[8 + i : 10 + i], "big") & 0x3FFF for i in range(0, size, 8)]


READ10 = struct.pack(">BBIBHB", 0x28, 0, 0, 0, 8, 0)
WRITE10 = struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0)
TUR = bytes(6)


# -- config


@pytest.mark.parametrize(
    ("acl", "message"),
    [
        ('{ initiator = "iqn.a", lun = [0] }', "config key acls[0].lun: unknown key"),
        ("{ luns = [0] }", "config key acls[0].initiator: missing"),
        ('{ initiator = "iqn.a", luns = [7] }', "config key acls[0].luns: LUN 7 is not served"),
        ('{ initiator = "iqn.a", luns = ["0"] }', "config key acls[0].luns: must be LUN numbers"),
        ('{ initiator = "iqn.a", readonly_luns = [9] }', "acls[0].readonly_luns: LUN 9 is not"),
        ('{ initiator = "iqn.a", luns = 0 }', "config key acls[0].luns: must be an array"),
        ('{ initiator = "iqn.a", addresses = ["10.1.2"] }', "config key acls[0].addresses: "),
        ('{ initiator = "iqn.a", readonly = "yes" }', "acls[0].readonly: must be true or false"),
        ('{ initiator = "iqn.a", chap = { user = "u", secrt = "x" } }', "acls[0].chap.secrt"),
        ('{ initiator = "iqn.a", chap = 5 }', "config key acls[0].chap: must be a table or"),
        ('{ initiator = "iqn.a" }, { initiator = "iqn.a" }', "acls[1].initiator: iqn.a has an"),
        ('"iqn.a"', "config key acls[0]: must be a table"),
    ],
)
def test_bad_acls_name_the_key(tmp_path: Path, acl: str, message: str):
    toml = tmp_path / "t.toml"
    toml.write_text(f'luns = ["mem:1M"]\nacls = [{acl}]\n')
    with pytest.raises(ValueError) as e:
        load_config({}, str(toml))
    assert message in str(e.value)


def test_acls_and_allow_are_not_mixed(tmp_path: Path):
    toml = tmp_path / "t.toml"
    toml.write_text('luns = ["mem:1M"]\nallow = ["iqn.b"]\nacls = [{ initiator = "iqn.a" }]\n')
    with pytest.raises(ValueError, match="allow and acls both given"):
        load_config({}, str(toml))


def test_acl_on_the_command_line_refuses_secrets(tmp_path: Path):
    path = secret_file(tmp_path, "a", DB_SECRET)
    good = f'{{ initiator = "iqn.a", chap = {{ user = "a", secret_file = "{path}" }} }}'
    cfg = load_config({"luns": ["mem:1M"], "acls": [good]})
    assert cfg.acls[0].chap is not None and cfg.acls[0].chap.secret == DB_SECRET
    for bad in (
        '{ initiator = "iqn.a", chap = "a:secret-secret" }',
        '{ initiator = "iqn.a", chap = { user = "a", secret = "secret-secret" } }',
    ):
        with pytest.raises(ValueError, match=r"--acl\.chap: a CHAP secret on the command line"):
            load_config({"luns": ["mem:1M"], "acls": [bad]})
    with pytest.raises(ValueError, match="--acl: must be an inline TOML table"):
        load_config({"luns": ["mem:1M"], "acls": ["initiator=iqn.a"]})


# -- logins


def test_each_initiator_logs_in_with_its_own_chap(target_factory, tmp_path: Path):
    inq = need("iscsi-inq")
    t, _ = serve(target_factory, tmp_path, config_text(tmp_path, acls(tmp_path)))
    ok = run([inq, "-i", DB, t.url(0, auth=f"db1%{DB_SECRET}")])
    assert "Vendor:ZEROSEND" in ok.stdout
    assert "Vendor:ZEROSEND" in run([inq, "-i", WEB, t.url(1, auth=f"web1%{WEB_SECRET}")]).stdout
    # Another initiator's credentials, none, or an initiator without an ACL: refused.
    assert run([inq, "-i", DB, t.url(0, auth=f"web1%{WEB_SECRET}")], check=False).returncode
    assert run([inq, "-i", DB, t.url(0)], check=False).returncode
    assert run([inq, "-i", STRANGER, t.url(0, auth=f"db1%{DB_SECRET}")], check=False).returncode
    wait_for(lambda: f"initiator {STRANGER} has no ACL" in t.log(), "the refusal", 30)


def test_lun_masking_and_read_only_per_initiator(target_factory, tmp_path: Path):
    t, _ = serve(target_factory, tmp_path, config_text(tmp_path, acls(tmp_path)))
    db = chap_session(t.port, DB, "db1", DB_SECRET)
    web = chap_session(t.port, WEB, "web1", WEB_SECRET)
    assert reported(db) == [0, 2] and reported(web) == [1, 2]
    # A hidden LUN does not exist for the initiator: not by TUR, nor by the READ fast path.
    for cdb, want in ((TUR, 0), (READ10, 8 * 512)):
        status, _, sense = command(db, cdb, 1, want)
        assert status == CHECK_CONDITION and key(sense) == (ILLEGAL_REQUEST, 0x25, 0x00)
    assert command(web, READ10, 1, 8 * 512)[0] == GOOD
    # Nor can it reset it under the initiators that see it (5: LOGICAL UNIT RESET; 2: no LUN).
    assert task_management(db, 5, lun=1) == 2
    assert command(web, TUR, 1)[0] == GOOD  # no reset unit attention reached web1
    # LUN 2: db1 writes it, web1 reads it only (and MODE SENSE shows it write-protected).
    assert command(db, WRITE10, 2, out=b"\x5a" * 512)[0] == GOOD
    status, data, _ = command(web, READ10, 2, 8 * 512)
    assert status == GOOD and data[:512] == b"\x5a" * 512
    status, _, sense = command(web, WRITE10, 2, out=b"\xa5" * 512)
    assert status == CHECK_CONDITION and key(sense) == (DATA_PROTECT, 0x27, 0x00)
    _, mode, _ = command(web, struct.pack(">BBBBBB", 0x1A, 0, 0x3F, 0, 255, 0), 2, 255)
    assert mode[2] & 0x80  # WP
    _, mode, _ = command(db, struct.pack(">BBBBBB", 0x1A, 0, 0x3F, 0, 255, 0), 2, 255)
    assert not mode[2] & 0x80
    db.close()
    web.close()


def _xcopy(src: int, dst: int) -> tuple[bytes, bytes]:
    targets = [bytes((0x01, 0x03, 0x00, 8)) + bytes.fromhex(WWN[n]) for n in (src, dst)]
    descriptors = b"".join(
        bytes((0xE4, 0, 0, 0)) + d + bytes(24 - len(d)) + b"\0" + (512).to_bytes(3, "big")
        for d in targets
    )
    body = struct.pack(">BBHHH2xHQQ", 0x02, 0, 24, 0, 1, 1, 0, 0)
    params = struct.pack(">BBH4xII", 1, 3 << 3, len(descriptors), len(body), 0)
    params += descriptors + body
    return struct.pack(">BB8xIBB", 0x83, 0, len(params), 0, 0), params


def test_extended_copy_reaches_only_luns_the_initiator_sees_and_writes(
    target_factory, tmp_path: Path
):
    """EXTENDED COPY names its LUNs by NAA, not by LUN number: it must not reach past the
    masking (copy a hidden LUN out, or into a LUN the initiator may only read)."""
    t, _ = serve(target_factory, tmp_path, config_text(tmp_path, acls(tmp_path)))
    web = chap_session(t.port, WEB, "web1", WEB_SECRET)
    cdb, params = _xcopy(0, 1)  # hidden LUN 0 into LUN 1
    status, _, sense = command(web, cdb, 1, out=params)
    assert status == CHECK_CONDITION and key(sense) == (COPY_ABORTED, 0x08, 0x04)
    cdb, params = _xcopy(1, 2)  # into LUN 2, read-only for web1
    status, _, sense = command(web, cdb, 1, out=params)
    assert status == CHECK_CONDITION and key(sense) == (DATA_PROTECT, 0x27, 0x00)
    db = chap_session(t.port, DB, "db1", DB_SECRET)
    cdb, params = _xcopy(0, 2)  # db1 sees and writes both
    assert command(db, cdb, 0, out=params)[0] == GOOD
    web.close()
    db.close()


def test_address_filters(target_factory, tmp_path: Path):
    inq = need("iscsi-inq")
    only_there = 'addresses = ["10.9.9.0/24"]\n'
    also_here = 'addresses = ["127.0.0.1", "10.9.9.0/24"]\n'
    text = config_text(tmp_path, acls(tmp_path, db=only_there, web=also_here))
    t, _ = serve(target_factory, tmp_path, text)
    assert run([inq, "-i", DB, t.url(0, auth=f"db1%{DB_SECRET}")], check=False).returncode
    wait_for(lambda: f"initiator {DB} may not log in from 127.0.0.1" in t.log(), "refusal", 30)
    assert "Vendor:ZEROSEND" in run([inq, "-i", WEB, t.url(1, auth=f"web1%{WEB_SECRET}")]).stdout


def test_discovery_has_its_own_chap(target_factory, tmp_path: Path):
    ls = need("iscsi-ls")
    d = secret_file(tmp_path, "discovery", DISCOVERY_SECRET)
    extra = f'discovery_chap = {{ user = "discovery", secret_file = "{d}" }}\n'
    t, _ = serve(target_factory, tmp_path, config_text(tmp_path, acls(tmp_path), extra))
    ok = run([ls, "-i", DB, t.url(None, auth=f"discovery%{DISCOVERY_SECRET}")])
    assert f"Target:{IQN}" in ok.stdout
    assert run([ls, "-i", DB, t.url(None, auth=f"db1%{DB_SECRET}")], check=False).returncode
    assert run([ls, "-i", STRANGER, t.url(None, auth=f"discovery%{DISCOVERY_SECRET}")],
               check=False).returncode  # fmt: skip


def test_reload_ends_only_the_sessions_whose_acl_changed(target_factory, tmp_path: Path):
    t, config = serve(target_factory, tmp_path, config_text(tmp_path, acls(tmp_path)))
    db = chap_session(t.port, DB, "db1", DB_SECRET)
    web = chap_session(t.port, WEB, "web1", WEB_SECRET)
    config.write_text(config_text(tmp_path, acls(tmp_path, web="readonly = true\n")))
    before = t.log().count("reload done")
    t.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: t.log().count("reload done") > before, "the reload", 60)
    assert f"{WEB} tsih=" in t.log() and "ending session: its ACL changed" in t.log()
    assert re.search(rf"{re.escape(DB)} tsih=\d+: ending session", t.log()) is None
    assert command(db, TUR, 0)[0] == GOOD
    web.close()
    db.close()
    web = chap_session(t.port, WEB, "web1", WEB_SECRET)
    status, _, sense = command(web, WRITE10, 1, out=b"\0" * 512)
    assert status == CHECK_CONDITION and key(sense) == (DATA_PROTECT, 0x27, 0x00)
    web.close()


# -- the README's setup (in the target's guide, docs/iscsi.md, which the README links)


def readme_config() -> str:
    text = (REPO / "docs" / "iscsi.md").read_text()
    m = re.search(r"<!-- two-initiators -->\n```toml\n(.*?)```", text, re.S)
    assert m, "docs/iscsi.md lost its two-initiator example"
    return m.group(1)


def test_the_readme_two_initiator_setup_starts_as_written(target_factory, tmp_path, monkeypatch):
    """The README's TOML with only its directories moved here: images and credentials (as
    systemd's LoadCredential= would provide them)."""
    state, creds = tmp_path / "state", tmp_path / "credentials"
    state.mkdir()
    creds.mkdir()
    text = readme_config().replace("/var/lib/zerosend-iscsi/", f"{state}/")
    for name in re.findall(r'credential = "([^"]+)"', text):
        secret_file(creds, name, f"{name}-secret-0123")
    for name in re.findall(rf'path = "{re.escape(str(state))}/([^"]+)"', text):
        (state / name).write_bytes(bytes(1 << 20))
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    config = tmp_path / "target.toml"
    config.write_text(text)
    cfg = load_config({}, str(config))
    assert len(cfg.acls) == 2 and cfg.discovery_chap is not None
    t = target_factory("--config", str(config), "--metrics", "127.0.0.1:0",
                       iqn=cfg.iqn)  # fmt: skip
    inq, ls = need("iscsi-inq"), need("iscsi-ls")
    for acl in cfg.acls:
        assert acl.chap is not None and acl.luns is not None
        auth = f"{acl.chap.user}%{acl.chap.secret}"
        if acl.addresses and not acl.admits("127.0.0.1"):
            assert run([inq, "-i", acl.initiator, t.url(0, auth=auth)], check=False).returncode
            continue
        ini = chap_session(t.port, acl.initiator, acl.chap.user, acl.chap.secret, cfg.iqn)
        assert reported(ini) == sorted(acl.luns)
        for lun in sorted(acl.luns):
            assert (
                "Vendor:ZEROSEND" in run([inq, "-i", acl.initiator, t.url(lun, auth=auth)]).stdout
            )
        ini.close()
    d = cfg.discovery_chap
    out = run([ls, "-i", cfg.acls[0].initiator, t.url(None, auth=f"{d.user}%{d.secret}")])
    assert f"Target:{cfg.iqn}" in out.stdout
