"""libiscsi's conformance suite (iscsi-test-cu) against the target: the SCSI and iSCSI families.

Both families run whole (about a minute together); a test that skipped itself is counted apart
from a pass, and any failure fails the test with the failing suite/test names.
"""

from __future__ import annotations

from pathlib import Path

import cuparse
import pytest
from iscsi_helpers import need, run

FAMILIES = ["iSCSI", "SCSI"]


@pytest.mark.parametrize("family", FAMILIES)
def test_iscsi_test_cu_family(target_factory, tmp_path: Path, family: str):
    cu = need("iscsi-test-cu")
    image = tmp_path / "cu.img"
    with image.open("wb") as f:
        f.truncate(64 << 20)
    t = target_factory("--lun", str(image))
    # -d allows the destructive (write) tests; the image is scratch.
    res = run([cu, "-d", "-v", "-t", family, t.url()], timeout=900, check=False)
    text = res.stdout + res.stderr
    (tmp_path / f"iscsi-test-cu-{family}.txt").write_text(text)
    outcomes = cuparse.parse(text)
    ran, _passed, failed = cuparse.summary(text)
    assert len(outcomes) == ran, "could not attribute every test in the output"
    counted = cuparse.counts(outcomes)
    failures = [f"{o.suite}.{o.test}" for o in outcomes if o.result == "fail"]
    print(f"{family}: {counted['pass']} pass, {counted['skip']} skip, {counted['fail']} fail")
    assert failed == 0 and not failures, f"failing: {failures}"
    assert counted["pass"] > 0
