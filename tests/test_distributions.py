"""What users install: the sdist (`make sdist`) and the pure-Python wheel made from it
(`make pure-wheel`), each checked file by file, installed into a fresh venv and smoke-tested.
The manylinux wheel has tests/test_wheel.py."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import tarfile
import tomllib
import venv
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import require_probed

ROOT = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["package"]["version"]

pytestmark = [
    pytest.mark.slow,  # each builds a distribution and installs it into a fresh venv
    pytest.mark.timeout(900),  # a cold release build of the Rust code from the sdist
]


@pytest.fixture(autouse=True)
def _needs_make() -> None:
    require_probed("make")


def make(target: str, dist: Path) -> None:
    done = subprocess.run(
        ["make", "-s", target, f"DIST={dist}"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def package_files() -> set[str]:
    """The Python package's sources, stub and py.typed, as paths below python/."""
    return {
        path.relative_to(ROOT / "python").as_posix()
        for path in (ROOT / "python" / "zerosend").rglob("*")
        if path.suffix in {".py", ".pyi"} or path.name == "py.typed"
    }


def install_and_smoke(
    tmp_path: Path, artefact: Path, *pip_args: str, env: dict[str, str] | None = None
) -> tuple[Path, dict[str, Any]]:
    """Installs ``artefact`` into a fresh venv and runs tests/smoke_install.py there."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = [python, "-m", "pip", "install", "-q", *pip_args, artefact]
    done = subprocess.run(install, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    smoke = [python, ROOT / "tests" / "smoke_install.py"]
    done = subprocess.run(smoke, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    facts: dict[str, Any] = json.loads(done.stdout)
    assert facts["file"].startswith(str(env_dir)), facts
    assert facts["version"] == VERSION
    return env_dir, facts


def test_sdist_has_what_a_build_needs_and_installs(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    make("sdist", dist)
    sdist = dist / f"zerosend-{VERSION}.tar.gz"
    assert [p.name for p in dist.iterdir()] == [sdist.name]
    with tarfile.open(sdist) as tar:
        members = [m.name for m in tar.getmembers() if m.isfile()]
    prefix = f"zerosend-{VERSION}/"
    assert all(name.startswith(prefix) for name in members), members
    files = {name.removeprefix(prefix) for name in members}
    assert not {f for f in files if f.startswith(("bench/", "tests/")) or f.endswith(".so")}

    # The top-level files, the Python package, and each crate's manifest and src/: no more.
    expected = {"PKG-INFO", "pyproject.toml", "Cargo.toml", "Cargo.lock", "README.md"}
    expected |= {"CHANGELOG.md", "LICENSE-MIT", "LICENSE-APACHE"}
    expected |= {f"python/{path}" for path in package_files()}
    for crate in (ROOT / "rust").iterdir():
        expected.add(f"rust/{crate.name}/Cargo.toml")
        expected |= {p.relative_to(ROOT).as_posix() for p in (crate / "src").rglob("*.rs")}
    assert files == expected, (
        f"unexpected: {sorted(files - expected)}, missing: {sorted(expected - files)}"
    )

    # The Rust code is compiled from the sdist's own sources, in a target directory of its own:
    # the sdist's files carry fixed timestamps, so a shared target directory would let cargo
    # reuse an older build of the workspace crates as fresh.
    env = {**os.environ, "CARGO_TARGET_DIR": str(tmp_path / "target")}
    env.pop("VIRTUAL_ENV", None)
    _, facts = install_and_smoke(tmp_path, sdist, env=env)
    assert facts["native"] is True


def test_pure_wheel_installs_and_falls_back_to_copy(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    make("pure-wheel", dist)
    wheel = dist / f"zerosend-{VERSION}-py3-none-any.whl"
    dist_info = f"zerosend-{VERSION}.dist-info"
    with zipfile.ZipFile(wheel) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    meta = {"METADATA", "WHEEL", "RECORD", "entry_points.txt"}
    meta |= {"licenses/LICENSE-MIT", "licenses/LICENSE-APACHE"}
    assert set(files) == package_files() | {f"{dist_info}/{name}" for name in meta}
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

    env_dir, facts = install_and_smoke(tmp_path, wheel, "--no-index", "--no-deps")
    assert facts["native"] is False and facts["backend"] == "copy"
    assert "zerosend._native is not installed" in facts["fallback_reason"]
    iscsi = subprocess.run(
        [env_dir / "bin" / "zerosend-iscsi", "--help"], capture_output=True, text=True, check=False
    )
    assert iscsi.returncode == 0 and "--lun" in iscsi.stdout, iscsi.stderr
