"""The target's native pieces and their pure-Python stand-ins (``zerosend.iscsi._accel``): the
digest is the same in both, and the native ones live in the target's own module, not the
core's."""

from __future__ import annotations

import random
import sys

import pytest

import zerosend
from zerosend.iscsi import _accel


def test_crc32c_known_values_native_and_python() -> None:
    for crc in {_accel.crc32c, _accel.python_crc32c}:
        assert crc(b"123456789") == 0xE3069283
        assert crc(b"") == 0
        part = crc(b"12345")
        assert crc(memoryview(b"6789"), part) == 0xE3069283
        assert crc(bytearray(b"6789"), part) == 0xE3069283


def test_crc32c_native_and_python_agree_on_random_data() -> None:
    rnd = random.Random(31)
    for _ in range(200):
        data = rnd.randbytes(rnd.randrange(0, 300))
        seed = rnd.getrandbits(32)
        assert _accel.crc32c(data, seed) == _accel.python_crc32c(data, seed)


def test_the_native_pieces_are_the_targets_module_not_the_cores() -> None:
    if _accel.NativeReadPath is None:
        pytest.skip("no native extension: the pure-Python install")
    native = sys.modules["zerosend.iscsi._native"]
    assert _accel.NativeReadPath is native.IscsiReadPath
    assert _accel.crc32c is native.crc32c
    assert native.IscsiReadPath.__module__ == "zerosend.iscsi._native"
    for name in ("IscsiReadPath", "crc32c", "ReadRun"):
        assert not hasattr(zerosend._native, name), name
    # The encoders are a test-only entry, not part of the production class.
    assert not hasattr(native.IscsiReadPath, "encode_data_in")
    assert len(native._encode_data_in(0x81, 0, 0, bytes(8), 1, 2, 3, 4, 0, 0, 0)) == 48
