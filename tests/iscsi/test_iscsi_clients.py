"""Real initiators from Debian (libiscsi-bin, qemu-img) against the target over loopback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from iscsi_helpers import IQN, make_image, need, run

MiB = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "disk.img"
    return path, make_image(path, 8 * MiB)


def test_sendtargets_discovery_lists_target_and_luns(target_factory, image, tmp_path):
    ls = need("iscsi-ls")
    ro = tmp_path / "ro.img"
    make_image(ro, 2 * MiB, seed=2)
    t = target_factory("--lun", str(image[0]), "--lun", f"{ro}:ro")
    out = run([ls, "-s", t.url(None)]).stdout
    assert f"Target:{IQN} Portal:127.0.0.1:{t.port},1" in out
    assert re.search(r"Lun:0\s+Type:DIRECT_ACCESS", out)
    assert re.search(r"Lun:1\s+Type:DIRECT_ACCESS", out)
    assert "discovery session logged in" in t.log()


def test_inquiry_standard_and_vpd(target_factory, image):
    inq = need("iscsi-inq")
    t = target_factory("--lun", str(image[0]))
    std = run([inq, t.url()]).stdout
    assert "Vendor:ZEROSEND" in std
    assert "Peripheral Device Type:DIRECT_ACCESS" in std
    pages = run([inq, "-e", "1", "-c", "0", t.url()]).stdout
    for page in ("0x80", "0x83", "0xb0", "0xb1", "0xb2"):
        assert page in pages.lower(), pages
    ids = run([inq, "-e", "1", "-c", str(0x83), t.url()]).stdout
    assert IQN in ids


def test_readcapacity16_reports_image_size(target_factory, image):
    rc16 = need("iscsi-readcapacity16")
    t = target_factory("--lun", str(image[0]))
    out = run([rc16, t.url()]).stdout
    assert f"Total size:{8 * MiB}" in out
    assert "LOGICAL BLOCK LENGTH IN BYTES:512" in out


def test_qemu_img_reads_image_byte_exact(target_factory, image, tmp_path):
    qemu = need("qemu-img")
    path, data = image
    t = target_factory("--lun", str(path))
    out = tmp_path / "copy.raw"
    run([qemu, "convert", "-f", "raw", "-O", "raw", t.url(), str(out)])
    assert out.read_bytes() == data


def test_qemu_img_write_then_read_back(target_factory, image, tmp_path):
    qemu = need("qemu-img")
    path, _ = image
    src = tmp_path / "src.raw"
    new = make_image(src, 8 * MiB, seed=7)
    t = target_factory("--lun", str(path))
    run([qemu, "convert", "-n", "-f", "raw", "-O", "raw", str(src), t.url()])
    back = tmp_path / "back.raw"
    run([qemu, "convert", "-f", "raw", "-O", "raw", t.url(), str(back)])
    assert back.read_bytes() == new
    assert path.read_bytes() == new


def test_read_only_lun_refuses_writes(target_factory, image, tmp_path):
    qemu = need("qemu-img")
    path, data = image
    src = tmp_path / "src.raw"
    make_image(src, 8 * MiB, seed=9)
    t = target_factory("--lun", f"{path}:ro")
    res = run([qemu, "convert", "-n", "-f", "raw", "-O", "raw", str(src), t.url()], check=False)
    assert res.returncode != 0
    assert "write protected" in res.stderr.lower()
    assert path.read_bytes() == data


def test_compressed_qcow2_lun_serves_original_bytes(target_factory, tmp_path):
    qemu = need("qemu-img")
    src = tmp_path / "src.raw"
    # compressible but not trivial: text-like blocks with a sparse hole in the middle
    import random

    rnd = random.Random(5)
    chunk = b"".join(rnd.choice([b"zero", b"send", b"iscsi", b"\n"]) for _ in range(800_000))
    chunk = (chunk * 2)[: 3 * MiB]
    data = chunk + bytes(2 * MiB) + chunk
    src.write_bytes(data)
    image = tmp_path / "disk.qcow2"
    run([qemu, "convert", "-c", "-f", "raw", "-O", "qcow2", str(src), str(image)])
    assert image.stat().st_size < len(data) // 2  # really compressed
    t = target_factory("--lun", str(image))
    out = tmp_path / "out.raw"
    run([qemu, "convert", "-f", "raw", "-O", "raw", t.url(), str(out)])
    assert out.read_bytes() == data
    res = run([qemu, "convert", "-n", "-f", "raw", "-O", "raw", str(src), t.url()], check=False)
    assert res.returncode != 0 and "write protected" in res.stderr.lower()


def _secret_file(path: Path, secret: str) -> str:
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return str(path)


def test_chap_accepts_right_secret_and_rejects_wrong(target_factory, image, tmp_path):
    inq = need("iscsi-inq")
    alice = _secret_file(tmp_path / "alice.secret", "s3cret-passw0rd")
    t = target_factory("--lun", str(image[0]), "--chap", f"user=alice,secret_file={alice}")
    ok = run([inq, t.url(auth="alice%s3cret-passw0rd")])
    assert "Vendor:ZEROSEND" in ok.stdout
    bad = run([inq, t.url(auth="alice%wrong-password")], check=False)
    assert bad.returncode != 0
    none = run([inq, t.url()], check=False)
    assert none.returncode != 0
    log = t.log()
    assert "wrong CHAP response for user 'alice'" in log
    assert "auth=alice" in log


def test_mutual_chap(target_factory, image, tmp_path):
    inq = need("iscsi-inq")
    alice = _secret_file(tmp_path / "alice.secret", "s3cret-passw0rd")
    tgt = _secret_file(tmp_path / "tgt.secret", "t4rget-secret1")
    t = target_factory(
        "--lun",
        str(image[0]),
        "--chap",
        f"user=alice,secret_file={alice}",
        "--mutual-chap",
        f"user=tgt,secret_file={tgt}",
    )
    good = t.url(
        auth="alice%s3cret-passw0rd", query="?target_user=tgt&target_password=t4rget-secret1"
    )
    assert "Vendor:ZEROSEND" in run([inq, good]).stdout
    # The initiator checks the target's answer: a wrong expected target secret fails the login.
    bad = t.url(
        auth="alice%s3cret-passw0rd", query="?target_user=tgt&target_password=not-the-secret"
    )
    assert run([inq, bad], check=False).returncode != 0


def test_allow_list(target_factory, image):
    inq = need("iscsi-inq")
    allowed = "iqn.2024-01.org.example:allowed"
    t = target_factory("--lun", str(image[0]), "--allow", allowed)
    assert "Vendor:ZEROSEND" in run([inq, "-i", allowed, t.url()]).stdout
    res = run([inq, "-i", "iqn.2024-01.org.example:stranger", t.url()], check=False)
    assert res.returncode != 0
    assert "not on the allow-list" in t.log()


def test_config_file_and_several_luns(target_factory, image, tmp_path):
    inq = need("iscsi-inq")
    rc16 = need("iscsi-readcapacity16")
    cfg = tmp_path / "target.toml"
    cfg.write_text(f'luns = ["{image[0]}", "mem:4M"]\nallow = []\n')
    t = target_factory("--config", str(cfg))
    assert f"Total size:{8 * MiB}" in run([rc16, t.url(0)]).stdout
    assert f"Total size:{4 * MiB}" in run([rc16, t.url(1)]).stdout
    assert "Vendor:ZEROSEND" in run([inq, t.url(1)]).stdout


def test_memory_lun_write_read_back(target_factory, tmp_path):
    qemu = need("qemu-img")
    src = tmp_path / "src.raw"
    data = make_image(src, 4 * MiB, seed=11)
    t = target_factory("--lun", "mem:4M")
    run([qemu, "convert", "-n", "-f", "raw", "-O", "raw", str(src), t.url()])
    out = tmp_path / "out.raw"
    run([qemu, "convert", "-f", "raw", "-O", "raw", t.url(), str(out)])
    assert out.read_bytes() == data


def test_mapped_lun_reads_and_writes_coherently(target_factory, image, tmp_path):
    qemu = need("qemu-img")
    path, data = image
    t = target_factory("--lun", f"{path}:mmap")
    out = tmp_path / "copy.raw"
    run([qemu, "convert", "-f", "raw", "-O", "raw", t.url(), str(out)])
    assert out.read_bytes() == data
    src = tmp_path / "src.raw"
    new = make_image(src, 8 * MiB, seed=13)
    run([qemu, "convert", "-n", "-f", "raw", "-O", "raw", str(src), t.url()])
    run([qemu, "convert", "-f", "raw", "-O", "raw", t.url(), str(out)])
    assert out.read_bytes() == new
    assert "raw, mapped" in t.log()
