"""No orphan figures: every measured figure the README (and BENCHMARKS.md's prose) quotes, a
number with a unit such as MB/s, s/GB, a ratio ``1.2x``, IOPS, %, µs, is held by a table of the
benchmark results (the Markdown files the harness writes: ``BENCHMARKS.md`` and the results
under ``bench/``) or sits between a harness's markers there. A figure that no current table
holds fails, so the README cannot quote a run that is gone or a number nobody measured. (A
figure is matched by its digits as written; a small integer may be matched by chance.)"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

NUMBER = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
#: Units of measured figures. Sizes (KiB, MiB) and settings (seconds, bytes) are not figures.
UNIT = r"CPU\s+s/GB|s/GB|MB/s|GB/s|IOPS|µs|us|%"
#: A ratio's x sticks to its number (``0.72x``); ``32 x 1 MiB`` is a count.
RATIO = "x|\u00d7"  # x or the multiplication sign
#: One figure, or several sharing a unit: ``0.71 / 0.76 CPU s/GB``, ``3.5-4.4x``.
FIGURE = re.compile(
    rf"(?<![\w.,/])(?P<numbers>(?:{NUMBER})(?:\s*(?:-|\u2013|/|to|and|against)\s*(?:{NUMBER}))*)"
    rf"(?:\s?(?:{UNIT})|{RATIO})(?![\w/])"
)
NUMBER_RE = re.compile(NUMBER)
#: A harness writes between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``.
MARKED = re.compile(r"<!-- ([\w-]+):begin -->.*?<!-- \1:end -->", re.S)
FENCED = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")


@dataclass(frozen=True)
class Figure:
    text: str
    value: str
    line: int


def canonical(number: str) -> str:
    """``1,080`` and ``1080`` are one figure; ``0.70`` and ``0.7`` are not (a table writes
    the digits it measured)."""
    return number.replace(",", "")


def prose(markdown: str) -> str:
    """``markdown`` without what is not prose (code blocks, code spans, harness-written
    blocks), blanked so that line numbers stay right."""

    def blank(match: re.Match[str]) -> str:
        return re.sub(r"[^\n]", " ", match.group(0))

    for pattern in (MARKED, FENCED, CODE_SPAN):
        markdown = pattern.sub(blank, markdown)
    return markdown


def figures(markdown: str) -> list[Figure]:
    """Every measured figure in the prose of ``markdown`` (tables included)."""
    text = prose(markdown)
    found = []
    for match in FIGURE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        for number in NUMBER_RE.findall(match.group("numbers")):
            found.append(Figure(match.group(0), canonical(number), line))
    return found


def held_numbers(results: list[str]) -> set[str]:
    """The numbers the results hold: in their tables' rows, and anywhere between markers."""
    held: set[str] = set()
    for markdown in results:
        for line in markdown.splitlines():
            if line.lstrip().startswith("|"):
                held.update(canonical(n) for n in NUMBER_RE.findall(line))
        for block in MARKED.finditer(markdown):
            held.update(canonical(n) for n in NUMBER_RE.findall(block.group(0)))
    return held


def orphans(readme: str, results: list[str]) -> list[Figure]:
    """The README's figures that no results table holds."""
    held = held_numbers(results)
    return [f for f in figures(readme) if f.value not in held]


def result_files() -> list[Path]:
    """The files the harness writes: BENCHMARKS.md and the Markdown results under bench/."""
    files = [ROOT / "BENCHMARKS.md"]
    files += sorted(p for p in (ROOT / "bench").rglob("*.md") if "notes" not in p.name)
    return [p for p in files if p.exists()]


def test_the_readme_quotes_no_figure_that_no_table_holds() -> None:
    results = [p.read_text() for p in result_files()]
    missing = orphans(README.read_text(), results)
    assert not missing, "README figures no results table holds:\n" + "\n".join(
        f"  line {f.line}: {f.text!r} ({f.value})" for f in missing
    )


def test_benchmarks_prose_quotes_no_figure_that_no_table_holds() -> None:
    # The same rule for BENCHMARKS.md's own prose (what the harness wrote between markers is
    # not prose here): a figure in a sentence is one a table of some run holds.
    benchmarks = ROOT / "BENCHMARKS.md"
    results = [p.read_text() for p in result_files()]
    missing = orphans(benchmarks.read_text(), results)
    assert not missing, "BENCHMARKS.md figures no results table holds:\n" + "\n".join(
        f"  line {f.line}: {f.text!r} ({f.value})" for f in missing
    )


def test_the_readme_quotes_figures_at_all() -> None:
    # The check above passes trivially on a README whose figures it cannot see.
    assert len(figures(README.read_text())) >= 3


TABLES = """\
| size | in flight | copy | io_uring |
|---|---|---|---|
| 64 KiB | 8 | 0.64, 1,094 | 0.71, 485 |

<!-- core-bench:begin -->
auto's pick lost on both in 3 of 48 cells; io_uring at 0.74x of sock_sendall.
<!-- core-bench:end -->
"""


def test_a_made_up_figure_is_caught() -> None:
    readme = "io_uring spent 0.71 CPU s/GB at 485 MB/s, copy 1,094 MB/s; really 7.77x faster.\n"
    missing = orphans(readme, [TABLES])
    assert [(f.text, f.value) for f in missing] == [("7.77x", "7.77")]


def test_figures_held_by_a_table_or_between_markers_pass() -> None:
    readme = "Copy: 0.64 / 0.71 CPU s/GB and 1094 MB/s; io_uring reached 0.74x.\n"
    assert [f.value for f in figures(readme)] == ["0.64", "0.71", "1094", "0.74"]
    assert orphans(readme, [TABLES]) == []


def test_prose_between_markers_of_the_results_holds_but_prose_outside_does_not() -> None:
    results = "Outside the markers: 0.91x.\n" + TABLES
    assert [f.value for f in orphans("it ran at 0.91x", [results])] == ["0.91"]


@pytest.mark.parametrize(
    ("text", "values"),
    [
        ("3.5-4.4x the rate", ["3.5", "4.4"]),
        ("4.5\u20137.6\u00d7 more", ["4.5", "7.6"]),  # an en dash, a multiplication sign
        ("0.5 µs per future", ["0.5"]),
        ("283,417 IOPS", ["283417"]),
        ("at 95% of copy", ["95"]),
        ("0.165 against 0.189 CPU s/GB", ["0.165", "0.189"]),
        ("12 x 1 MiB, 0x80, 4 KiB, a 30 s limit, `9.99x` in code", []),
    ],
)
def test_what_counts_as_a_figure(text: str, values: list[str]) -> None:
    assert [f.value for f in figures(text)] == values


def test_code_and_harness_blocks_in_the_readme_are_not_prose() -> None:
    readme = "```\nprint('1.23x')\n```\n<!-- x-bench:begin -->\n9.87x\n<!-- x-bench:end -->\n"
    assert figures(readme) == []
