"""Fixtures for the iSCSI target tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from iscsi_helpers import IQN, RunningTarget, start_target


@pytest.fixture
def target_factory(tmp_path: Path) -> Iterator[Callable[..., RunningTarget]]:
    """Start targets with the given command-line arguments; each is stopped with SIGTERM at the
    end of the test and must exit 0 without a traceback."""
    started: list[RunningTarget] = []

    def factory(*args: str, iqn: str = IQN, host: str = "127.0.0.1") -> RunningTarget:
        t = start_target(tmp_path, *args, iqn=iqn, host=host)
        started.append(t)
        return t

    yield factory
    for t in started:
        rc = t.stop()
        assert rc == 0, f"target exit status {rc}:\n{t.log()}"
        assert "Traceback" not in t.log(), t.log()
