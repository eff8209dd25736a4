"""The README is the PyPI page: its program runs as written, its links work where PyPI renders
them (absolute, into the repository that pyproject.toml declares, at files that exist), and a
fresh machine is set up with exactly two commands. The pages under docs/ link to files that
exist."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
#: ``[text](target)`` and ``![alt](target)``; a target ends at whitespace or ``)``.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCED = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def declared_repository() -> str:
    urls = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]
    return str(urls["Source"]).rstrip("/")


def readme_links(text: str) -> list[str]:
    return LINK.findall(FENCED.sub("", text))


def test_the_readme_program_runs_as_written(tmp_path: Path) -> None:
    text = README.read_text()
    marker = "<!-- readme-example -->\n"
    assert marker in text, "the README's complete program is marked for this test"
    block = FENCED.match(text, text.index(marker) + len(marker))
    assert block is not None and block.group(1) == "python"
    program = tmp_path / "readme_example.py"
    program.write_text(block.group(2))
    done = subprocess.run(
        [sys.executable, str(program)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard on a loaded machine
    )
    assert done.returncode == 0, done.stderr
    assert "client: received 34603008 bytes" in done.stdout, done.stdout
    # Loopback copies on delivery; the program prints what happened and why, as it says.
    assert "zero-copy False" in done.stdout and "peer_on_this_host" in done.stdout, done.stdout


def test_readme_links_are_absolute_and_into_the_declared_repository() -> None:
    repository = declared_repository()
    assert repository.startswith("https://github.com/")
    links = readme_links(README.read_text())
    assert links, "no links found: the pattern is broken"
    for link in links:
        # PyPI renders the README away from the repository: a relative link or an in-page
        # anchor (PyPI gives headings no ids) would lead nowhere.
        assert link.startswith("https://"), f"relative link in the README: {link}"


@pytest.mark.parametrize("kind", ["blob", "tree"])
def test_readme_links_into_the_repository_name_files_that_exist(kind: str) -> None:
    prefix = f"{declared_repository()}/{kind}/main/"
    links = readme_links(README.read_text())
    paths = [link[len(prefix) :].split("#")[0] for link in links if link.startswith(prefix)]
    assert paths, f"no {kind} links into the repository: the pattern is broken"
    for path in paths:
        target = ROOT / path
        assert target.is_dir() if kind == "tree" else target.is_file(), f"{kind} link to {path}"


def test_a_fresh_machine_is_set_up_with_make_run_and_make_test_only() -> None:
    commands = [
        line.split("#")[0].strip()
        for lang, body in FENCED.findall(README.read_text())
        if lang in ("sh", "")
        for line in body.splitlines()
        if line.strip().startswith("make")
    ]
    assert commands == ["make run", "make test"]


def test_links_between_the_docs_pages_resolve() -> None:
    pages = [ROOT / "docs" / name for name in ("contributing.md", "internals.md", "iscsi.md")]
    for page in pages:
        for link in LINK.findall(FENCED.sub("", page.read_text())):
            if link.startswith(("https://", "http://", "#")):
                continue
            target = (page.parent / link.split("#")[0]).resolve()
            assert target.exists(), f"{page.name}: broken link {link}"
