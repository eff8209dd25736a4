"""The sdist users get: `make sdist`, exactly the files a build needs, and a fresh venv that
builds the Rust code from it and passes the smoke script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tomllib
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["package"]["version"]
TOP_LEVEL = {
    "PKG-INFO",
    "pyproject.toml",
    "Cargo.toml",
    "Cargo.lock",
    "README.md",
    "CHANGELOG.md",
    "LICENSE-MIT",
    "LICENSE-APACHE",
}


def expected_files() -> set[str]:
    """The Python package (sources, stubs, py.typed) and each crate's manifest and src/."""
    files = set(TOP_LEVEL)
    for path in (ROOT / "python" / "zerosend").rglob("*"):
        if path.suffix in {".py", ".pyi"} or path.name == "py.typed":
            files.add(path.relative_to(ROOT).as_posix())
    for crate in (ROOT / "rust").iterdir():
        files.add(f"rust/{crate.name}/Cargo.toml")
        files.update(p.relative_to(ROOT).as_posix() for p in (crate / "src").rglob("*.rs"))
    return files


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_sdist_has_what_a_build_needs_and_installs(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        ["make", "-s", "sdist", f"DIST={dist}"], cwd=ROOT, check=True, capture_output=True
    )
    sdist = dist / f"zerosend-{VERSION}.tar.gz"
    assert [p.name for p in dist.iterdir()] == [sdist.name]
    with tarfile.open(sdist) as tar:
        members = [m.name for m in tar.getmembers() if m.isfile()]
    prefix = f"zerosend-{VERSION}/"
    assert all(name.startswith(prefix) for name in members), members
    files = {name.removeprefix(prefix) for name in members}
    assert not {f for f in files if f.startswith(("bench/", "tests/")) or f.endswith(".so")}
    assert files == expected_files(), (
        f"unexpected: {sorted(files - expected_files())}, "
        f"missing: {sorted(expected_files() - files)}"
    )

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    # Only the dependencies' build artefacts are cached between runs; the crates of the sdist
    # are compiled from its own sources every time (their path is new each time).
    env = {**os.environ, "CARGO_TARGET_DIR": str(ROOT / "target" / "sdist-install")}
    env.pop("VIRTUAL_ENV", None)
    subprocess.run(
        [python, "-m", "pip", "install", "-q", sdist], check=True, env=env, capture_output=True
    )
    done = subprocess.run(
        [python, ROOT / "tests" / "smoke_install.py", "--expect-native"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout)
    assert facts["file"].startswith(str(env_dir)), facts
    assert facts["version"] == VERSION
    assert facts["native"] is True
