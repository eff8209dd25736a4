"""One version for the crates and the Python package: the workspace version in Cargo.toml."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import zerosend

ROOT = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["package"]["version"]


def test_every_crate_and_the_python_package_take_the_workspace_version() -> None:
    for manifest in sorted((ROOT / "rust").glob("*/Cargo.toml")):
        package = tomllib.loads(manifest.read_text())["package"]
        assert package["version"] == {"workspace": True}, manifest
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]


def test_dunder_version_is_the_installed_distribution_version() -> None:
    assert zerosend.__version__ == version("zerosend") == VERSION


def test_python_m_zerosend_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "zerosend", "--version"], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == f"zerosend {VERSION}"


def test_changelog_describes_this_version() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog
    assert re.search(rf"^## \[{re.escape(VERSION)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", changelog, re.M)
    assert re.search(rf"^\[{re.escape(VERSION)}\]: https://", changelog, re.M)
