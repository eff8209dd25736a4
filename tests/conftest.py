"""Shared fixtures: the backends this kernel offers, the rig and the ifb sink, and system
settings changed only through a fixture that always puts them back. Plain helpers are in
tests/helpers.py, whose import repairs sysctls a killed run left behind before zerosend probes
the kernel.

Capabilities a test may lack, each skipped with its reason or, named in ``ZEROSEND_REQUIRE``
(comma-separated; ``.ci/run`` names all that CI has), failed: ``io_uring``, ``msg_zerocopy``,
``rig`` (root, iproute2, nftables), ``fuse`` (root, /dev/fuse), ``nofile`` (RLIMIT_NOFILE of
12,000), ``sysctl`` (root; the sysctls tests change), ``hugepages``, ``setpriv``, ``ipv6``,
``tc``, ``uvloop``, ``iscsi_clients`` (libiscsi-bin, qemu-img, tgt), ``make``, ``native`` (the
Rust extension). ``CAPABILITIES`` in tests/helpers.py says what each is; ``python -m
tests.helpers`` what this machine has.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.harness.rig import IfbSink, Rig
from tests.helpers import (
    BACKENDS,
    CAPS,
    REPAIRED_SYSCTLS,
    REQUIRED,
    RIG_UNAVAILABLE,
    SYSCTL_MARKERS,
    SYSCTL_ROOT,
    ZERO_COPY_BACKENDS,
    require,
    require_backend,
)


def pytest_report_header() -> list[str]:
    lines = [f"zerosend capabilities: {CAPS!r}; rig: {RIG_UNAVAILABLE or 'available'}"]
    if REQUIRED:
        lines.append(f"ZEROSEND_REQUIRE: {','.join(sorted(REQUIRED))}")
    if REPAIRED_SYSCTLS:
        lines.append(f"restored sysctls left by a killed run: {', '.join(REPAIRED_SYSCTLS)}")
    return lines


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each backend in turn; skipped (with the kernel's reason) where unavailable."""
    require_backend(request.param)
    return request.param


@pytest.fixture(params=ZERO_COPY_BACKENDS)
def zc_backend(request: pytest.FixtureRequest) -> str:
    """Each zero-copy backend in turn."""
    require_backend(request.param)
    return request.param


@pytest.fixture
def rig() -> Iterator[Rig]:
    """The measuring rig (a receiver namespace behind veth), with nftables."""
    require("rig", RIG_UNAVAILABLE)
    with Rig() as built:
        yield built


@pytest.fixture
def ifb() -> Iterator[IfbSink]:
    """The true-zero-copy topology: an ifb device that frees, uncopied, what is sent to it."""
    require("rig", RIG_UNAVAILABLE)
    with IfbSink() as sink:
        yield sink


@pytest.fixture
def sysctl() -> Iterator[Callable[[str, str], str]]:
    """``sysctl(name, value)`` sets a sysctl (e.g. ``"net.core.optmem_max"``) and returns its
    value before; every one set is restored after the test, and after a killed run at the next
    session start (the original is kept in a marker file until then)."""
    changed: list[tuple[Path, Path]] = []

    def set_sysctl(name: str, value: str) -> str:
        path = SYSCTL_ROOT / name.replace(".", "/")
        if not path.exists():
            require("sysctl", f"this kernel has no {name} sysctl")
        if not os.access(path, os.W_OK):
            require("sysctl", f"changing {name} needs root")
        before = path.read_text().strip()
        marker = SYSCTL_MARKERS / name
        if not marker.exists():  # the first change of this test: remember the original
            SYSCTL_MARKERS.mkdir(exist_ok=True)
            marker.write_text(before)
            changed.append((path, marker))
        path.write_text(value)
        return before

    yield set_sysctl
    for path, marker in reversed(changed):
        path.write_text(marker.read_text())
        marker.unlink()
