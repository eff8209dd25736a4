"""Parse ``iscsi-test-cu`` verbose output into per-test outcomes.

iscsi-test-cu reports a test that skipped itself (command not implemented, LUN not removable...)
as "passed"; a test is counted as skipped here when a ``[SKIPPED]`` line appears inside it.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

_TOKEN = re.compile(
    r"^Suite: (?P<suite>\S+)|Test: (?P<test>\S+) \.\.\.|(?P<end>\.\.\.passed|passed|FAILED)", re.M
)


@dataclass(frozen=True)
class Outcome:
    suite: str
    test: str
    result: str  # "pass", "skip" or "fail"
    detail: str


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
