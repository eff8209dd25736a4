"""Parse ``iscsi-test-cu`` verbose output into per-test outcomes.

iscsi-test-cu reports a test that skipped itself (command not implemented, LUN not removable...)
as "passed"; a test is counted as skipped here when a ``[SKIPPED]`` line appears inside it.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

# CUnit prints "Test: NAME ..." then "passed" or "FAILED", with the test's own log lines
# (which may say "[FAILED] ..." about an expected failure) in between.
_TOKEN = re.compile(
    r"^Suite: (?P<suite>\S+)|Test: (?P<test>\S+) \.\.\."
    r"|(?<![\[\w])(?P<end>passed|FAILED)(?![\]\w])",
    re.M,
)
_SUMMARY = re.compile(r"^\s+tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", re.M)
_SUITES = re.compile(r"^\s+suites\s+(\d+)\s+(\d+)\s+n/a\s+(\d+)", re.M)


@dataclass(frozen=True)
class Outcome:
    suite: str
    test: str
    result: str  # "pass", "skip" or "fail"
    detail: str

    @property
    def skip_reason(self) -> str:
        m = re.search(r"\[SKIPPED\]\s*([^\n]*)", self.detail)
        return m.group(1).strip() if m else ""


def parse(text: str) -> list[Outcome]:
    out: list[Outcome] = []
    suite = ""
    current: str | None = None
    start = 0
    for m in _TOKEN.finditer(text):
        if m.group("suite"):
            suite = m.group("suite")
        elif m.group("test"):
            current, start = m.group("test"), m.end()
        elif current is not None:
            body = text[start : m.start()]
            if m.group("end") == "FAILED":
                result = "fail"
            elif "[SKIPPED]" in body:
                result = "skip"
            else:
                result = "pass"
            out.append(Outcome(suite, current, result, body.strip()))
            current = None
    return out


def counts(outcomes: list[Outcome]) -> Counter[str]:
    return Counter(o.result for o in outcomes)


@dataclass(frozen=True)
class RunSummary:
    """CUnit's own counts from its "Run Summary" table."""

    total: int
    ran: int
    passed: int
    failed: int
    suites_failed: int


def summary(text: str) -> RunSummary:
    tests, suites = _SUMMARY.search(text), _SUITES.search(text)
    if tests is None or suites is None:
        raise ValueError("no CUnit run summary (suites and tests lines) in the output")
    total, ran, passed, failed = (int(g) for g in tests.groups())
    return RunSummary(total, ran, passed, failed, int(suites.group(3)))


def skip_list(outcomes: list[Outcome]) -> dict[str, str]:
    """``{"Suite.Test": reason}`` for every test that skipped itself: the expected-skip list."""
    return {f"{o.suite}.{o.test}": o.skip_reason for o in outcomes if o.result == "skip"}


if __name__ == "__main__":
    # Regenerate a family's expected-skip list from a saved run (the test writes the output to
    # its tmp_path as iscsi-test-cu-FAMILY.txt): python tests/iscsi/cuparse.py OUTPUT.txt
    import json
    import sys

    with open(sys.argv[1]) as saved:
        print(json.dumps(skip_list(parse(saved.read())), indent=2, sort_keys=True))
