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


def summary(text: str) -> tuple[int, int, int]:
    """CUnit's own (ran, passed, failed) test counts from its run summary."""
    m = _SUMMARY.search(text)
    if m is None:
        raise ValueError("no CUnit run summary in the output")
    return int(m.group(2)), int(m.group(3)), int(m.group(4))
