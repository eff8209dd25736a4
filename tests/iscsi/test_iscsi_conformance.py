"""libiscsi's conformance suite (iscsi-test-cu) against the target: the SCSI and iSCSI families,
on each kind of LUN: a raw image, the same mapped, a RAM disk, a read-only image. (Digests are
not run here: libiscsi offers HeaderDigest "None,CRC32C", so None is chosen, and it has no data
digest at all; the raw-PDU protocol tests cover both digests.)

Each family runs whole. The run must match what was recorded per configuration in
``conformance_expected.json``: CUnit's own summary says no suite failed and every test ran
(Total == Ran); the tests that fail are exactly the configuration's expected failures (on the
read-only LUN, libiscsi's write tests, which the LUN refuses as it must); every test that
skipped itself (iscsi-test-cu reports those as passed) is on the family's expected-skip list,
with the reason it gave; and at least the family's minimum of tests really passed. A command
that regresses to "not implemented" turns its tests into new skips, and fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import cuparse
import pytest
from iscsi_helpers import need, run

FAMILIES = ["iSCSI", "SCSI"]
EXPECTED = json.loads((Path(__file__).parent / "conformance_expected.json").read_text())
# configuration: the LUN, with {image} for a 64 MiB scratch image
CONFIGURATIONS = {"raw": "{image}", "mmap": "{image}:mmap", "mem": "mem:64M", "ro": "{image}:ro"}


@pytest.mark.slow
@pytest.mark.timeout(960)
@pytest.mark.parametrize("configuration", CONFIGURATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_iscsi_test_cu_family(target_factory, tmp_path: Path, family: str, configuration: str):
    cu = need("iscsi-test-cu")
    expected = EXPECTED[configuration][family]
    image = tmp_path / "cu.img"
    with image.open("wb") as f:
        f.truncate(64 << 20)
    # On the default settings: the suite's second initiator is the same host on a second path
    # (multipath, clusters), whose LUN resets reach the other session's tasks (SAM-5).
    lun = CONFIGURATIONS[configuration].format(image=image)
    t = target_factory("--lun", lun)
    # -d allows the destructive (write) tests; the image is scratch. The URL twice: a second
    # path to the same LUN, logged in as iscsi-test-cu's second initiator name, for the tests
    # of several I_T nexuses (reservations, multipath I/O and resets).
    res = run([cu, "-d", "-v", "-t", family, t.url(), t.url()], timeout=900, check=False)
    text = res.stdout + res.stderr
    (tmp_path / f"iscsi-test-cu-{configuration}-{family}.txt").write_text(text)
    outcomes = cuparse.parse(text)
    cunit = cuparse.summary(text)
    counted = cuparse.counts(outcomes)
    print(
        f"{configuration} {family}: {cunit.total} total, {cunit.ran} ran, {counted['pass']} pass, "
        f"{counted['skip']} skip, {counted['fail']} fail, {cunit.suites_failed} suites failed"
    )
    assert len(outcomes) == cunit.ran, "could not attribute every test in the output"
    failures = {f"{o.suite}.{o.test}" for o in outcomes if o.result == "fail"}
    expected_failures = expected.get("expected_failures", {})
    assert cunit.failed == len(failures), "could not attribute every failure in the output"
    unexpected = sorted(failures - set(expected_failures))
    assert not unexpected, f"failing: {unexpected}"
    assert failures == set(expected_failures), (
        f"expected to fail but passed (trim the list): {sorted(set(expected_failures) - failures)}"
    )
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
