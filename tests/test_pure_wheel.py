"""The pure-Python wheel for platforms without a binary wheel: made from the sdist, installed
into a fresh venv, it runs on the copy backend and says why."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["package"]["version"]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_pure_wheel_installs_and_falls_back_to_copy(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        ["make", "-s", "pure-wheel", f"DIST={dist}"], cwd=ROOT, check=True, capture_output=True
    )
    wheel = dist / f"zerosend-{VERSION}-py3-none-any.whl"
    dist_info = f"zerosend-{VERSION}.dist-info"
    with zipfile.ZipFile(wheel) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    package = {
        f"zerosend/{p.relative_to(ROOT / 'python' / 'zerosend').as_posix()}"
        for p in (ROOT / "python" / "zerosend").rglob("*")
        if p.suffix in {".py", ".pyi"} or p.name == "py.typed"
    }
    meta = {"METADATA", "WHEEL", "RECORD", "entry_points.txt"}
    meta |= {"licenses/LICENSE-MIT", "licenses/LICENSE-APACHE"}
    assert set(files) == package | {f"{dist_info}/{name}" for name in meta}
    assert b"Tag: py3-none-any\n" in files[f"{dist_info}/WHEEL"]
    metadata = files[f"{dist_info}/METADATA"].decode()
    assert f"\nVersion: {VERSION}\n" in metadata
    assert "\nLicense-Expression: MIT OR Apache-2.0\n" in metadata
    for line in files[f"{dist_info}/RECORD"].decode().splitlines():
        name, digest, size = line.split(",")
        if name.endswith("/RECORD"):
            continue
        data = files[name]
        expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
        assert digest == f"sha256={expected.decode()}" and int(size) == len(data), name

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", wheel], check=True
    )
    done = subprocess.run(
        [python, ROOT / "tests" / "smoke_install.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout)
    assert facts["file"].startswith(str(env_dir)), facts
    assert facts["native"] is False and facts["backend"] == "copy"
    assert "zerosend._native could not be imported" in facts["fallback_reason"]
    iscsi = subprocess.run(
        [env_dir / "bin" / "zerosend-iscsi", "--help"], capture_output=True, text=True, check=False
    )
    assert iscsi.returncode == 0 and "--lun" in iscsi.stdout, iscsi.stderr
