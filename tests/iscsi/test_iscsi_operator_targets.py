"""Several targets (IQNs) in one daemon, each with its own LUNs and ACLs: ``[[target]]``
tables (tgt's ``<target>`` blocks, LIO's ``/iscsi create``), discovery filtered by ACL, logins
that see only their target's LUNs, identities per target and LUN, reloads that add, remove and
change targets, and the refusals of a bad config naming its key. Real clients (iscsi-ls,
iscsi-inq, qemu-img) where they can say it."""

from __future__ import annotations

import json
import re
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from iscsi_helpers import MiniInitiator, RunningTarget, need, run, wait_for

from zerosend.iscsi.service.config import load_config

A, B, C = (f"iqn.2024-01.org.zerosend:{n}" for n in ("alpha", "beta", "gamma"))
DB, WEB = "iqn.1994-05.com.redhat:db1", "iqn.1994-05.com.redhat:web1"
GOOD, CHECK_CONDITION = 0, 2
UNIT_ATTENTION = 0x6


def images(tmp_path: Path, *names: str) -> dict[str, Path]:
    """One 1 MiB image per name, each filled with a byte of its own."""
    out = {}
    for n, name in enumerate(names):
        path = tmp_path / f"{name}.img"
        path.write_bytes(bytes([0x41 + n]) * (1 << 20))
        out[name] = path
    return out


def two_targets(img: dict[str, Path], alpha_extra: str = "", beta_extra: str = "") -> str:
    """alpha: two LUNs, only DB may log in; beta: one LUN, anyone."""
    return (
        f'[[target]]\niqn = "{A}"\nalias = "alpha disks"\n'
        f'luns = [{{ path = "{img["a0"]}", lun = 0 }}, {{ path = "{img["a1"]}", lun = 1 }}]\n'
        f'acls = [{{ initiator = "{DB}" }}]\n{alpha_extra}'
        f'[[target]]\niqn = "{B}"\nluns = ["{img["b0"]}"]\n{beta_extra}'
    )


def start(tmp_path: Path, *args: str) -> RunningTarget:
    """The daemon on a free loopback port (no --iqn: its targets are in the config)."""
    log_path = tmp_path / f"target-{time.monotonic_ns()}.log"
    cmd = [sys.executable, "-m", "zerosend.iscsi", "--listen", "127.0.0.1:0", *args]
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
    t = RunningTarget(proc, 0, A, log_path)
    pattern = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
    deadline = time.monotonic() + 60
    while (m := pattern.search(t.log())) is None:
        if proc.poll() is not None:
            pytest.fail(f"target exited with {proc.returncode}:\n{t.log()}")
        assert time.monotonic() < deadline, f"target did not start:\n{t.log()}"
        time.sleep(0.05)
    t.port = int(m.group(1))
    return t


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[..., tuple[RunningTarget, Path]]]:
    started: list[RunningTarget] = []

    def serve(text: str, *args: str) -> tuple[RunningTarget, Path]:
        config = tmp_path / "targets.toml"
        config.write_text(text)
        t = start(tmp_path, "--config", str(config), *args)
        started.append(t)
        return t, config

    yield serve
    for t in started:
        assert t.stop() == 0, t.log()
        assert "Traceback" not in t.log(), t.log()


def url(t: RunningTarget, iqn: str, lun: int | None = None) -> str:
    tail = "" if lun is None else f"/{iqn}/{lun}"
    return f"iscsi://127.0.0.1:{t.port}{tail}"


def reload(t: RunningTarget, config: Path, text: str) -> None:
    config.write_text(text)
    before = t.log().count("reload done")
    t.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: t.log().count("reload done") > before, "the reload", 60)


def session(t: RunningTarget, iqn: str, initiator: str = DB) -> MiniInitiator:
    ini = MiniInitiator(t.port)
    ini.login(iqn, {"InitiatorName": initiator})
    return ini


def command(ini: MiniInitiator, cdb: bytes, lun: int = 0, edtl: int = 0):
    ini.scsi(cdb, edtl, read=edtl > 0, lun=lun)
    return ini.read_response()


def report_luns(ini: MiniInitiator) -> list[int]:
    cdb = bytes((0xA0, 0, 0, 0, 0, 0)) + struct.pack(">I", 4096) + bytes(2)
    status, data, _ = command(ini, cdb, 0, 4096)
    assert status == GOOD
    size = struct.unpack_from(">I", data)[0]
    return [int.from_bytes(data[8 + i : 10 + i], "big") & 0x3FFF for i in range(0, size, 8)]


def ended(ini: MiniInitiator) -> bool:
    """The target closed this session's connection (after its Async Message, if any)."""
    ini.sock.settimeout(60)  # a hang guard: a session left alone never closes
    try:
        while True:
            ini.recv()  # (an Async Message that the target drops the session, a NOP-In)
    except TimeoutError:
        return False
    except OSError:  # (ConnectionError: closed, or reset)
        return True


# -- config


def _config(tmp_path: Path, text: str):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return load_config({}, str(path))


def test_the_single_target_form_is_one_target(tmp_path: Path):
    cfg = _config(tmp_path, 'iqn = "iqn.2024-01.org.x:one"\nluns = ["mem:1M"]\n')
    (only,) = cfg.targets()
    assert only.iqn == "iqn.2024-01.org.x:one" and [s.path for s in only.luns] == ["mem:1M"]


def test_target_tables_parse(tmp_path: Path):
    img = images(tmp_path, "a0", "a1", "b0")
    cfg = _config(tmp_path, two_targets(img))
    alpha, beta = cfg.targets()
    assert (alpha.iqn, alpha.alias, [s.lun for s in alpha.luns]) == (A, "alpha disks", [0, 1])
    assert alpha.acls[0].initiator == DB and beta.iqn == B and not beta.acls


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f'[[target]]\niqn = "{A}"\nluns = ["mem:1M"]\n'
         f'[[target]]\niqn = "{A}"\nluns = ["mem:1M"]\n',
         f"config key target[1].iqn: {A} is also target[0]'s"),
        (f'[[target]]\niqn = "{A}"\nluns = [{{ path = "mem:1M", lun = 3 }}, '
         '{ path = "mem:1M", lun = 3 }]\n',
         "config key target[0].luns[1].lun: 3 is also luns[0]'s"),
        (f'[[target]]\niqn = "{A}"\nluns = ["mem:1M"]\nlun = ["mem:1M"]\n',
         "config key target[0].lun: unknown key"),
        (f'[[target]]\niqn = "{A}"\nluns = ["mem:1M"]\nalias = 3\n',
         "config key target[0].alias: must be a string, not an integer"),
        (f'[[target]]\niqn = "{A}"\nluns = [{{ path = "mem:1M", read_only = true }}]\n',
         "config key target[0].luns[0].read_only: unknown key"),
        (f'[[target]]\niqn = "{A}"\nluns = ["mem:1M"]\nacls = [{{ initiator = "{DB}", '
         'luns = [4] }]\n',
         "config key target[0].acls[0].luns: LUN 4 is not served"),
        (f'[[target]]\niqn = "{A}"\nluns = ["mem:1M"]\nacls = [{{ initiator = "{DB}", '
         'lun = [0] }]\n',
         "config key target[0].acls[0].lun: unknown key"),
        ('[[target]]\nluns = ["mem:1M"]\n', "config key target[0].iqn: missing"),
        (f'[[target]]\niqn = "{A}"\n', "config key target[0].luns: missing"),
        (f'[[target]]\niqn = "{A}"\nluns = []\n', "config key target[0].luns: no LUN given"),
        ('[[target]]\niqn = "alpha"\nluns = ["mem:1M"]\n',
         "config key target[0].iqn: target name 'alpha' must start with"),
        (f'target = ["{A}"]\n', "config key target[0]: must be a table"),
        (f'target = {{ iqn = "{A}" }}\n', "config key target: must be a list"),
        (f'luns = ["mem:1M"]\n[[target]]\niqn = "{A}"\nluns = ["mem:1M"]\n',
         "config key luns: with [[target]] tables each target has its own luns"),
        (f'acls = []\n[[target]]\niqn = "{A}"\nluns = ["mem:1M"]\n',
         "config key acls: with [[target]] tables each target has its own acls"),
    ],
)  # fmt: skip
def test_bad_targets_name_the_key(tmp_path: Path, text: str, message: str):
    with pytest.raises(ValueError) as e:
        _config(tmp_path, text)
    assert message in str(e.value)


def test_an_image_served_writable_twice_is_refused(tmp_path: Path):
    img = images(tmp_path, "x")
    x = img["x"]
    two = f'[[target]]\niqn = "{A}"\nluns = ["{x}"]\n[[target]]\niqn = "{B}"\nluns = ["{x}{{}}"]\n'
    with pytest.raises(ValueError, match=r"config key target\[1\]\.luns\[0\]\.path: .* is "
                       r"served by config key target\[0\]\.luns\[0\] too"):  # fmt: skip
        _config(tmp_path, two.format(""))
    with pytest.raises(
        ValueError, match=r"target\[1\]\.luns\[0\]\.path"
    ):  # one writer is one too many
        _config(tmp_path, two.format(":ro"))
    # The same file by another name is the same image; in one target too.
    alias = tmp_path / "link.img"
    alias.symlink_to(x)
    with pytest.raises(ValueError, match=r"config key luns\[1\]\.path: .* is served by"):
        _config(tmp_path, f'luns = ["{x}:ro", "{alias}"]\n')
    both_ro = (
        f'[[target]]\niqn = "{A}"\nluns = ["{x}:ro"]\n'
        f'[[target]]\niqn = "{B}"\nluns = ["{alias}:ro"]\n'
    )
    assert len(_config(tmp_path, both_ro).targets()) == 2  # read-only everywhere: shared


def test_a_target_on_the_command_line_refuses_secrets(tmp_path: Path):
    with pytest.raises(ValueError, match=r"--target\.chap: a CHAP secret on the command line"):
        load_config({"target": [f'{{ iqn = "{A}", luns = ["mem:1M"], chap = "u:s12345678901" }}']})
    cfg = load_config({"target": [f'{{ iqn = "{A}", luns = ["mem:1M"] }}',
                                  f'{{ iqn = "{B}", luns = ["mem:1M"] }}']})  # fmt: skip
    assert [t.iqn for t in cfg.targets()] == [A, B]
    with pytest.raises(ValueError, match="--iqn: with \\[\\[target\\]\\] tables"):
        load_config({"iqn": A, "target": [f'{{ iqn = "{B}", luns = ["mem:1M"] }}']})


# -- discovery and login


def test_discovery_lists_the_targets_each_initiator_may_see(daemon, tmp_path: Path):
    ls = need("iscsi-ls")
    t, _ = daemon(two_targets(images(tmp_path, "a0", "a1", "b0")))
    db = run([ls, "-i", DB, url(t, A)]).stdout
    assert f"Target:{A} Portal:127.0.0.1:{t.port},1" in db
    assert f"Target:{B} Portal:127.0.0.1:{t.port},1" in db
    web = run([ls, "-i", WEB, url(t, A)]).stdout
    assert f"Target:{B}" in web and A not in web  # alpha's ACL does not list web1
    # With -s each target's own LUNs: alpha two, beta one.
    listing = run([ls, "-s", "-i", DB, url(t, A)]).stdout
    blocks = {b.split()[0]: b.count("Lun:") for b in listing.split("Target:")[1:]}
    assert blocks == {A: 2, B: 1}, listing


def test_a_login_sees_only_its_targets_luns_and_acls(daemon, tmp_path: Path):
    inq, qemu = need("iscsi-inq"), need("qemu-img")
    img = images(tmp_path, "a0", "a1", "b0")
    t, _ = daemon(two_targets(img))
    for iqn, lun, name in ((A, 0, "a0"), (A, 1, "a1"), (B, 0, "b0")):
        out = tmp_path / f"{name}.out"
        opts = (f"driver=iscsi,transport=tcp,portal=127.0.0.1:{t.port},target={iqn},lun={lun},"
                f"initiator-name={DB}")  # fmt: skip
        run([qemu, "convert", "--image-opts", opts, "-O", "raw", str(out)])
        assert out.read_bytes() == img[name].read_bytes(), f"{iqn} LUN {lun}"
    assert run([inq, "-i", WEB, url(t, B, 0)]).returncode == 0
    # web1 has no ACL on alpha: refused there (authorization failure), as LUN 1 of beta is absent
    assert run([inq, "-i", WEB, url(t, A, 0)], check=False).returncode != 0
    assert run([inq, "-i", DB, url(t, B, 1)], check=False).returncode != 0
    assert run([inq, "-i", DB, url(t, "iqn.2024-01.org.zerosend:none", 0)],
               check=False).returncode != 0  # fmt: skip
    beta = session(t, B)
    assert report_luns(beta) == [0]
    alpha = session(t, A)
    assert report_luns(alpha) == [0, 1]
    answers = MiniInitiator(t.port)
    assert answers.login(A, {"InitiatorName": DB}).get("TargetAlias") == "alpha disks"
    for ini in (beta, alpha, answers):
        ini.close()


def test_identities_are_per_target_and_lun_and_stable(daemon, tmp_path: Path):
    inq = need("iscsi-inq")
    img = images(tmp_path, "a0", "a1", "b0")
    # beta serves alpha's LUN 0 image read-only too: the same file, another target's LUN
    text = two_targets(img).replace(f'luns = ["{img["b0"]}"]', f'luns = ["{img["a0"]}:ro"]')
    text = text.replace(f'{{ path = "{img["a0"]}", lun = 0 }}',
                        f'{{ path = "{img["a0"]}", lun = 0, readonly = true }}')  # fmt: skip

    def serials(t: RunningTarget) -> dict[tuple[str, int], str]:
        out = {}
        for iqn, lun in ((A, 0), (A, 1), (B, 0)):
            page = run([inq, "-i", DB, "-e", "1", "-c", "128", url(t, iqn, lun)]).stdout
            assert "Unit Serial Number:[" in page, page
            out[iqn, lun] = page
        return out

    t, _ = daemon(text)
    first = serials(t)
    assert len(set(first.values())) == 3, first  # per target and LUN, even for one image
    assert t.stop() == 0
    t2, _ = daemon(text)
    assert serials(t2) == first  # the same after a restart


# -- reload


def test_reload_adds_removes_and_changes_targets(daemon, tmp_path: Path):
    img = images(tmp_path, "a0", "a1", "b0", "c0", "a2")
    t, config = daemon(two_targets(img))
    alpha, beta = session(t, A), session(t, B)
    assert report_luns(alpha) == [0, 1]
    # beta is removed, gamma added, alpha gains LUN 2
    text = (
        two_targets(img).split("[[target]]\niqn = \"" + B)[0]
        .replace(f'{{ path = "{img["a1"]}", lun = 1 }}]',
                 f'{{ path = "{img["a1"]}", lun = 1 }}, {{ path = "{img["a2"]}", lun = 2 }}]')
        + f'[[target]]\niqn = "{C}"\nluns = ["{img["c0"]}"]\n'
    )  # fmt: skip
    reload(t, config, text)
    assert f"target {B} removed" in t.log() and f"target {C} added with 1 LUNs" in t.log()
    assert ended(beta), "the removed target's session went on"
    # alpha's session carries on, told by a unit attention that its LUN inventory changed
    status, _, sense = command(alpha, bytes(6))
    assert status == CHECK_CONDITION and (sense[2] & 0x0F, sense[12], sense[13]) == (
        UNIT_ATTENTION, 0x3F, 0x0E)  # fmt: skip
    assert report_luns(alpha) == [0, 1, 2]
    gamma = session(t, C)
    assert report_luns(gamma) == [0]
    with pytest.raises(AssertionError, match="login failed with status 0x2/0x3"):
        session(t, B)  # no such target any more
    ls = run([need("iscsi-ls"), "-i", DB, url(t, A)]).stdout
    assert A in ls and C in ls and B not in ls
    # A reload that touches only gamma leaves alpha's session alone (no attention, no end).
    reload(t, config, text.replace(f'iqn = "{C}"', f'iqn = "{C}"\nalias = "g"'))
    assert command(alpha, bytes(6))[0] == GOOD
    # gamma's LUN 0 (which its REPORT LUNS addressed) replaced: its session ends, alpha's not
    reload(t, config, text.replace(f'luns = ["{img["c0"]}"]', f'luns = ["{img["b0"]}"]'))
    assert ended(gamma)
    assert command(alpha, bytes(6))[0] == GOOD
    alpha.close()


def test_a_target_reset_reaches_only_its_own_target(daemon, tmp_path: Path):
    from iscsi_helpers import task_management

    t, _ = daemon(two_targets(images(tmp_path, "a0", "a1", "b0")),
                  "--cross-session-resets", "on")  # fmt: skip
    alpha, beta = session(t, A), session(t, B)
    assert task_management(alpha, 7) == 0  # TARGET COLD RESET: alpha's connections drop
    assert ended(alpha)
    assert command(beta, bytes(6))[0] == GOOD
    beta.close()


# -- show and metrics


def test_show_and_metrics_label_per_target(daemon, tmp_path: Path):
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    control = tmp_path / "control"
    t, _ = daemon(two_targets(images(tmp_path, "a0", "a1", "b0")),
                  "--control-socket", str(control), "--metrics", "127.0.0.1:0")  # fmt: skip
    beta = session(t, B, WEB)
    shown = subprocess.run([sys.executable, "-m", "zerosend.iscsi", "show", "--json",
                            "--control-socket", str(control)], capture_output=True, text=True,
                           check=True, timeout=60).stdout  # fmt: skip
    st = json.loads(shown)
    assert [(x["iqn"], len(x["luns"])) for x in st["targets"]] == [(A, 2), (B, 1)]
    assert st["targets"][0]["acls"][0]["initiator"] == DB and not st["targets"][1]["acls"]
    assert [s["target"] for s in st["sessions"]] == [B]
    text = subprocess.run([sys.executable, "-m", "zerosend.iscsi", "show", "--control-socket",
                           str(control)], capture_output=True, text=True, check=True,
                          timeout=60).stdout  # fmt: skip
    assert f"  Target {A} (alpha disks)" in text and f"  Target {B}\n" in text
    assert f"(normal) to {B}" in text
    wait_for(lambda: "metrics on http" in t.log(), "the metrics endpoint", 60)
    m = re.search(r"metrics on (http://[\d.]+:\d+/metrics)", t.log())
    assert m
    body = urllib.request.urlopen(m.group(1), timeout=30).read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }
    assert samples[("zerosend_iscsi_target_luns", (("target", A),))] == 2
    assert samples[("zerosend_iscsi_target_luns", (("target", B),))] == 1
    assert samples[("zerosend_iscsi_target_sessions", (("target", A),))] == 0
    assert samples[("zerosend_iscsi_target_sessions", (("target", B),))] == 1
    sizes = [dict(k[1]) for k in samples if k[0] == "zerosend_iscsi_lun_size_bytes"]
    assert sorted((s["target"], s["lun"]) for s in sizes) == [(A, "0"), (A, "1"), (B, "0")]
    beta.close()


# -- the migration guide's example


def test_the_two_target_translation_in_the_guide_loads(tmp_path: Path):
    guide = (Path(__file__).resolve().parents[2] / "docs" / "iscsi-from-tgt.md").read_text()
    m = re.search(r"### Two targets.*?```toml\n(.*?)```", guide, re.S)
    assert m, "the guide lost its two-target example"
    secret = tmp_path / "db1.secret"
    secret.write_text("db1-secret-0123\n")
    secret.chmod(0o600)
    text = (
        m.group(1)
        .replace("/srv/iscsi/", f"{tmp_path}/")
        .replace("/etc/zerosend-iscsi/db1.secret", str(secret))
    )
    db, media = _config(tmp_path, text).targets()
    assert (db.iqn, [s.lun for s in db.luns], db.luns[0].serial) == (
        "iqn.2024-01.org.example:db", [1, 2], "DB0001")  # fmt: skip
    assert db.acls[0].chap is not None and db.acls[0].addresses
    assert media.luns[0].readonly and not media.acls


def test_renaming_the_single_target_on_reload_is_a_new_target(daemon, tmp_path: Path):
    img = images(tmp_path, "x")
    t, config = daemon(f'iqn = "{A}"\nluns = ["{img["x"]}"]\n')
    old = session(t, A)
    reload(t, config, f'iqn = "{B}"\nluns = ["{img["x"]}"]\n')
    assert ended(old) and "--iqn changed" not in t.log()
    new = session(t, B)
    assert report_luns(new) == [0]
    new.close()


def test_each_target_keeps_its_reservations_in_a_file_of_its_own(tmp_path: Path):
    import asyncio

    from zerosend.iscsi.service.target import Target

    def paths(text: str) -> list[str | None]:
        async def build() -> list[str | None]:
            target = Target(_config(tmp_path, text))
            out = [n.commands.reservations.state_path for n in target.nodes.values()]
            for node in target.nodes.values():
                for lu in node.luns.values():
                    lu.store.close()
            return out

        return asyncio.run(build())

    two = (f'[[target]]\niqn = "{A}"\nluns = ["mem:1M"]\n'
           f'[[target]]\niqn = "{B}"\nluns = ["mem:1M"]\n')  # fmt: skip
    assert paths(two) == [str(tmp_path / f"c.reservations.{A}.json"),
                          str(tmp_path / f"c.reservations.{B}.json")]  # fmt: skip
    assert paths(f'iqn = "{A}"\nluns = ["mem:1M"]\n') == [str(tmp_path / "c.reservations.json")]


def test_one_initiator_and_isid_on_two_targets_are_two_sessions(daemon, tmp_path: Path):
    """An I_T nexus names the target: a login to beta with the ISID of a session with alpha
    is a session of its own, not a reinstatement that would end alpha's."""
    t, _ = daemon(two_targets(images(tmp_path, "a0", "a1", "b0")))
    alpha = session(t, A)
    beta = session(t, B)  # (MiniInitiator: the same ISID every time)
    assert alpha.isid == beta.isid
    assert command(alpha, bytes(6))[0] == GOOD and command(beta, bytes(6))[0] == GOOD
    assert "reinstated" not in t.log()
    again = session(t, A)  # the same nexus with alpha: that one is reinstated
    assert ended(alpha)
    assert command(beta, bytes(6))[0] == GOOD
    for ini in (beta, again):
        ini.close()


def test_check_counts_every_targets_luns_and_opens_their_images(tmp_path: Path):
    img = images(tmp_path, "a0", "a1", "b0")
    config = tmp_path / "targets.toml"
    config.write_text(two_targets(img))
    check = [sys.executable, "-m", "zerosend.iscsi", "--check", "--config", str(config)]
    ok = subprocess.run(check, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and f"{config}: OK (3 LUNs, 2 targets)" in ok.stdout, ok
    img["b0"].unlink()  # beta's image is missing: the check fails as the start would
    bad = subprocess.run(check, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "b0.img" in bad.stderr, bad
