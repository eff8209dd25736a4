"""The two zero-copy backends as test parameters (skipped with the kernel's reason if missing)."""

from __future__ import annotations

import pytest

from tests.conftest import UNAVAILABLE

ZEROCOPY_BACKENDS = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(
            UNAVAILABLE[name] is not None, reason=f"{name} unavailable: {UNAVAILABLE[name]}"
        ),
    )
    for name in ("io_uring", "msg_zerocopy")
]
