"""Run the contract tests against each deliberate fault of a ``mutants`` build (``make
test-mutants``): first with no fault (everything must pass), then once per fault with
``ZEROSEND_MUTANT=<fault>``. Prints, for each fault, the tests that failed; exits 1 if a fault
made no test fail (the tests would not notice that bug) or the fault-free run failed."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The faults of rust/zerosend/src/mutant.rs (ALL), each with what it breaks.
FAULTS = {
    "resolve_at_acceptance": "a send resolves when accepted (first CQE / sendmsg return)",
    "zerocopy_false": "every result says zerocopy=False",
    "drop_out_of_order": "MSG_ZEROCOPY ranges that come out of order are ignored",
    "early_release_on_cancel": "cancelling a send's future releases its buffer export",
}
# The contract tests: release vs acceptance, held buffers, cancellation, order, honest results.
CONTRACT_TESTS = [
    "tests/test_send.py",
    "tests/test_pool.py",
    "tests/test_rig.py",
    "tests/test_true_zerocopy.py",
]
# A fault that makes a send never resolve is caught by the per-test time limit; a short one
# keeps the whole run short.
TIMEOUT_SECONDS = 30


def run_tests(fault: str | None, report: Path) -> tuple[list[str], float]:
    """The tests that failed (or errored) with ``fault`` on, and the run's duration."""
    env = dict(os.environ)
    env.pop("ZEROSEND_MUTANT", None)
    if fault is not None:
        env["ZEROSEND_MUTANT"] = fault
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            f"--timeout={TIMEOUT_SECONDS}", f"--junitxml={report}", *CONTRACT_TESTS]  # fmt: skip
    started = time.monotonic()
    subprocess.run(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, check=False)
    elapsed = time.monotonic() - started
    if not report.exists():
        return ["(pytest wrote no report: it could not start)"], elapsed
    failed = []
    for case in ET.parse(report).iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    return failed, elapsed


def main() -> int:
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        failed, elapsed = run_tests(None, Path(tmp) / "none.xml")
        print(f"no fault: {len(failed)} failed ({elapsed:.0f} s)", flush=True)
        for name in failed:
            print(f"    {name}")
        ok = not failed
        for fault, what in FAULTS.items():
            failed, elapsed = run_tests(fault, Path(tmp) / f"{fault}.xml")
            verdict = f"killed by {len(failed)} tests" if failed else "SURVIVED"
            print(f"{fault} ({what}): {verdict} ({elapsed:.0f} s)", flush=True)
            for name in failed:
                print(f"    {name}")
            ok = ok and bool(failed)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
