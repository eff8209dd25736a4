"""Run the test suites against each deliberate fault of a ``mutants`` build (``make
test-mutants``): first with no fault (everything must pass), then once per fault with
``ZEROSEND_MUTANT=<fault>``. Prints, for each fault, the tests that failed; exits 1 if the
fault-free run failed, or a fault made no test fail (the tests would not notice that bug).

The faults are read from the core crate's ``src/mutant.rs`` (its ``ALL`` list and each fault's
doc comment): the one place they are written. Where a fault lives decides what runs against it
(found by looking for its name in the sources):

- the core crate: every core test module and the core crate's Rust tests;
- the binding, the stream writer, the fallback: every core test module (the Rust tests never
  reach them), the module that owns the layer first;
- the iSCSI target (its leases and its syncs): the iSCSI tests that own them only.

A faulty run ends at its first failure. A fault is killed only by a test's own verdict (an
assertion, an error, a test's own hang guard). A test stopped by pytest's time limit is
reported apart, as timed out: a fault that only makes things slower is not a kill, and the
run goes on without that test; the fault-free run must not time out either. The limits are the
suite's own (120 s unless a test says otherwise), generous for a loaded machine.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTANT_RS = ROOT / "rust" / "zerosend" / "src" / "mutant.rs"
#: Where the mutants build keeps its Rust artefacts (the Makefile builds the wheel there too).
TARGET_DIR = ROOT / "target" / "mutants"
#: The modules that own the release/acceptance contract run first, so that a fault they catch
#: is killed within seconds; then every other core test module.
FIRST = ["test_send.py", "test_pool.py", "test_true_zerocopy.py", "test_rig.py"]
#: Not the core suite: the slow packaging and benchmark tests (marked slow) and the iSCSI
#: target's own tests (tests/iscsi).
SELECT = ["-m", "not slow"]
#: The iSCSI tests that own the target's leases (pooled buffers, loans of store memory) and its
#: syncs: all that runs against the target's faults.
ISCSI_TESTS = [
    "tests/iscsi/test_iscsi_bufpool.py",
    "tests/iscsi/test_iscsi_leases.py",
    "tests/iscsi/test_iscsi_syncs.py",
    "tests/iscsi/test_iscsi_seams_storage.py::test_a_sync_waits_for_the_sync_under_way_in_another_thread",
    "tests/iscsi/test_iscsi_seams_storage.py::test_a_flush_waits_only_for_the_syncs_that_cover_its_range",
]  # fmt: skip
#: Where faults live (a directory holding the fault's name), and the modules that own the layer,
#: run first against them.
CORE, BINDING, STREAMS, FALLBACK, TARGET = "core", "binding", "streams", "fallback", "target"
OWNERS = {CORE: FIRST, BINDING: FIRST, STREAMS: ["test_streams.py"],
          FALLBACK: ["test_fallback.py"]}  # fmt: skip


def core_tests(first: list[str]) -> list[str]:
    """Every core test module (tests/test_*.py), ``first`` first."""
    found = sorted(p.name for p in (ROOT / "tests").glob("test_*.py"))
    ordered = [name for name in first if name in found] + [n for n in found if n not in first]
    return [f"tests/{name}" for name in ordered]


def layer(const: str, name: str) -> str:
    """Where the fault ``const`` (``name``) is injected: the Rust crates name the constant, the
    Python modules the fault's name."""

    def used(where: str, word: str) -> bool:
        return any(word in f.read_text() for f in (ROOT / where).rglob("*.*")
                   if f.suffix in (".rs", ".py") and f != MUTANT_RS)  # fmt: skip

    if used("rust/zerosend/src", f"mutant::{const}"):
        return CORE
    if used("rust/zerosend-py/src", f"mutant::{const}"):
        return BINDING
    if used("python/zerosend/iscsi", f'"{name}"'):
        return TARGET
    if used("python/zerosend", f'_mutant.on("{name}")'):
        streams = [f.read_text() for f in (ROOT / "python/zerosend").glob("_stream_*.py")]
        return STREAMS if any(f'"{name}"' in text for text in streams) else FALLBACK
    raise SystemExit(f"{MUTANT_RS}: the fault {name} is injected nowhere")


#: A faulty run stops at its first failure: the fault is caught (or, if that failure was a time
#: limit, only slowed things: not a kill). A fault nothing catches runs the whole suite.
MAX_FAILURES = 1
#: Guards a whole run against a hang the per-test limits did not catch; not a time budget.
RUN_HANG_GUARD_S = 1800


def faults() -> dict[str, tuple[str, str]]:
    """``{fault: (what it breaks, where it lives)}``, from mutant.rs: each ``pub const X: &str
    = "name";`` named in ``ALL``, described by the doc comment above it."""
    text = MUTANT_RS.read_text()
    consts: dict[str, tuple[str, tuple[str, str]]] = {}
    for m in re.finditer(r'((?:^///[^\n]*\n)+)pub const (\w+): &str = "(\w+)";', text, re.M):
        doc = " ".join(line.removeprefix("///").strip() for line in m.group(1).splitlines())
        consts[m.group(2)] = (m.group(3), (doc, layer(m.group(2), m.group(3))))
    listed = re.search(r"pub const ALL: \[&str; \d+\] = \[([^\]]*)\]", text)
    if listed is None:
        raise SystemExit(f"no ALL list in {MUTANT_RS}")
    names = [n.strip() for n in listed.group(1).split(",") if n.strip()]
    unknown = [n for n in names if n not in consts]
    if unknown or not names:
        raise SystemExit(
            f"{MUTANT_RS}: ALL names {unknown or 'nothing'} without a documented const"
        )
    return dict(consts[n] for n in names)


@dataclass
class Outcome:
    failed: list[str] = field(default_factory=list)  # the tests' own verdicts
    timed_out: list[str] = field(default_factory=list)  # stopped by a time limit
    seconds: float = 0.0


def environment(fault: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("ZEROSEND_MUTANT", None)
    if fault is not None:
        env["ZEROSEND_MUTANT"] = fault
    return env


def python_tests(fault: str | None, report: Path, tests: list[str]) -> Outcome:
    """The tests' verdicts on ``fault``. A faulty run stops at its first failure; if that was a
    time limit, the run goes on without the tests that timed out (a hang in one test must not
    hide the kill another test would have made)."""
    outcome = Outcome()
    while True:
        deselect = [f"--deselect={_node(name)}" for name in outcome.timed_out]
        more = _python_run(fault, report, [*deselect, *tests])
        outcome.failed += more.failed
        outcome.timed_out += more.timed_out
        outcome.seconds += more.seconds
        if fault is None or outcome.failed or not more.timed_out or _WHOLE_RUN in more.timed_out:
            return outcome


_WHOLE_RUN = "(the pytest run as a whole)"


def _node(name: str) -> str:
    """A junit ``classname::name`` as a pytest node id (``tests.x.test_y::case`` ->
    ``tests/x/test_y.py::case``)."""
    module, _, case = name.partition("::")
    return f"{module.replace('.', '/')}.py::{case}"


def _python_run(fault: str | None, report: Path, tests: list[str]) -> Outcome:
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
            *SELECT, *tests]  # fmt: skip
    if fault is not None:
        argv.append(f"--maxfail={MAX_FAILURES}")
    report.unlink(missing_ok=True)
    started = time.monotonic()
    try:
        subprocess.run(argv, cwd=ROOT, env=environment(fault), stdout=subprocess.DEVNULL,
                       timeout=RUN_HANG_GUARD_S, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        return Outcome(timed_out=[_WHOLE_RUN], seconds=RUN_HANG_GUARD_S)
    outcome = Outcome(seconds=time.monotonic() - started)
    if not report.exists():
        outcome.failed.append("(pytest wrote no report: it could not start)")
        return outcome
    for case in ET.parse(report).iter("testcase"):
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if bad is None:
            continue
        name = f"{case.get('classname')}::{case.get('name')}"
        if "Timeout" in (bad.get("message") or "") and "pytest-timeout" in (bad.text or ""):
            outcome.timed_out.append(name)
        else:
            outcome.failed.append(name)
    return outcome


def cargo(*args: str, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = ["cargo", "test", "-p", "zerosend", "--release", "--features", "mutants", *args]
    env = environment(fault)
    env["CARGO_TARGET_DIR"] = str(TARGET_DIR)
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=RUN_HANG_GUARD_S, check=False)  # fmt: skip


def rust_tests(fault: str | None) -> Outcome:
    started = time.monotonic()
    try:
        done = cargo("--no-fail-fast", fault=fault)
    except subprocess.TimeoutExpired:
        return Outcome(timed_out=["(cargo test as a whole)"], seconds=RUN_HANG_GUARD_S)
    outcome = Outcome(seconds=time.monotonic() - started)
    outcome.failed = [f"rust::{m}" for m in re.findall(r"^test (\S+) \.\.\. FAILED$",
                                                        done.stdout, re.M)]  # fmt: skip
    if done.returncode != 0 and not outcome.failed:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        outcome.failed.append(f"(cargo test failed outside a test: {tail})")
    return outcome


def run(fault: str | None, where: str | None, tmp: Path) -> Outcome:
    """The tests that can see a fault living ``where`` (None: the fault-free run, all of them)."""
    if where == TARGET:
        tests = ISCSI_TESTS
    elif where is None:
        tests = core_tests(FIRST) + ISCSI_TESTS
    else:
        tests = core_tests(OWNERS[where])
    py = python_tests(fault, tmp / f"{fault or 'none'}.xml", tests)
    if where not in (None, CORE):
        return py
    rs = rust_tests(fault)
    return Outcome(py.failed + rs.failed, py.timed_out + rs.timed_out, py.seconds + rs.seconds)


def show(outcome: Outcome) -> None:
    for name in outcome.failed:
        print(f"    {name}")
    for name in outcome.timed_out:
        print(f"    {name} (timed out: not a kill)")


def main() -> int:
    known = faults()
    build = cargo("--no-run")  # once, before the clock of any run starts
    if build.returncode != 0:
        print(build.stderr)
        return 1
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        clean = run(None, None, Path(tmp))
        print(f"no fault: {len(clean.failed) + len(clean.timed_out)} failed "
              f"({clean.seconds:.0f} s)", flush=True)  # fmt: skip
        show(clean)
        ok = not clean.failed and not clean.timed_out
        for fault, (what, where) in known.items():
            outcome = run(fault, where, Path(tmp))
            verdict = f"killed by {len(outcome.failed)} tests" if outcome.failed else "SURVIVED"
            print(f"{fault} [{where}] ({what}): {verdict} ({outcome.seconds:.0f} s)", flush=True)
            show(outcome)
            ok = ok and bool(outcome.failed)
    print(f"{len(known)} faults in {time.monotonic() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
