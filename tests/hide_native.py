"""Imported before zerosend in a child process: makes ``zerosend._native`` fail to import, as it
does on a platform without the extension. tests/test_fallback.py runs the contract that way."""

import importlib.abc
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

HIDDEN_BECAUSE = "zerosend._native is hidden by tests/hide_native.py"


class _HideNative(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname == "zerosend._native":
            raise ImportError(HIDDEN_BECAUSE)
        return None


if "zerosend" in sys.modules:
    raise RuntimeError("import tests.hide_native before zerosend, or it hides nothing")
sys.meta_path.insert(0, _HideNative())
