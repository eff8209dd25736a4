"""libiscsi's conformance suite (iscsi-test-cu) against the target: the SCSI and iSCSI families.

Both families run whole (about a minute together). The run must match what was recorded in
``conformance_expected.json``: CUnit's own summary says no suite and no test failed and every
test ran (Total == Ran); every test that skipped itself (iscsi-test-cu reports those as
passed) is on the family's expected-skip list, with the reason it gave; and at least the
family's minimum of tests really passed. A command that regresses to "not implemented" turns
its tests into new skips, and fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import cuparse
import pytest
from iscsi_helpers import need, run

FAMILIES = ["iSCSI", "SCSI"]
EXPECTED = json.loads((Path(__file__).parent / "conformance_expected.json").read_text())


@pytest.mark.timeout(960)
@pytest.mark.parametrize("family", FAMILIES)
def test_iscsi_test_cu_family(target_factory, tmp_path: Path, family: str):
    cu = need("iscsi-test-cu")
    expected = EXPECTED[family]
    image = tmp_path / "cu.img"
    with image.open("wb") as f:
        f.truncate(64 << 20)
    t = target_factory("--lun", str(image))
    # -d allows the destructive (write) tests; the image is scratch.
    res = run([cu, "-d", "-v", "-t", family, t.url()], timeout=900, check=False)
    text = res.stdout + res.stderr
    (tmp_path / f"iscsi-test-cu-{family}.txt").write_text(text)
    outcomes = cuparse.parse(text)
    cunit = cuparse.summary(text)
    counted = cuparse.counts(outcomes)
    print(
        f"{family}: {cunit.total} total, {cunit.ran} ran, {counted['pass']} pass, "
        f"{counted['skip']} skip, {counted['fail']} fail, {cunit.suites_failed} suites failed"
    )
    assert len(outcomes) == cunit.ran, "could not attribute every test in the output"
    failures = [f"{o.suite}.{o.test}" for o in outcomes if o.result == "fail"]
    assert cunit.failed == 0 and not failures, f"failing: {failures}"
    assert cunit.suites_failed == 0, "a suite failed (its setup or teardown)"
    assert cunit.total == cunit.ran, f"{cunit.total - cunit.ran} tests did not run"
    skipped = cuparse.skip_list(outcomes)
    new_skips = {name: why for name, why in skipped.items() if name not in expected["skips"]}
    assert not new_skips, f"tests that newly skip themselves: {new_skips}"
    now_passing = sorted(set(expected["skips"]) - set(skipped))
    if now_passing:
        print(f"{family}: expected to skip but passed (trim the list): {now_passing}")
    assert counted["pass"] >= expected["min_pass"], (
        f"{counted['pass']} passed, fewer than the {expected['min_pass']} recorded"
    )
