"""The deliberate fault of a ``mutants`` build (``make test-mutants``; the list is the core
crate's ``src/mutant.rs``), for the faults that live in Python: ``on(name)`` is True only in a
process whose extension was built with mutation controls and whose ``ZEROSEND_MUTANT`` names
``name``. A release build has no ``_mutant()`` helper, so there ``on`` is always False; without
``ZEROSEND_MUTANT`` the extension is not even asked."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType


def _extension() -> ModuleType | None:
    try:
        from zerosend import _native

        if hasattr(_native, "_mutant"):
            return _native
    except ImportError:
        pass
    # The extension is there but kept from ``import`` (the fallback's tests hide it, and the
    # fallback stands in for it): loaded apart, under no importable name, only to ask it which
    # fault is on.
    for path in sorted(Path(__file__).parent.glob("_native*.so")):
        try:
            spec = importlib.util.spec_from_file_location("zerosend._native", path)
            if spec is None or spec.loader is None:
                continue
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        except Exception:  # an extension that cannot load here: no faults
            continue
    return None


def _chosen() -> str | None:
    if not os.environ.get("ZEROSEND_MUTANT"):
        return None
    helper = getattr(_extension(), "_mutant", None)
    chosen = None if helper is None else helper()
    return None if chosen is None else str(chosen)


CHOSEN = _chosen()


def on(fault: str) -> bool:
    """True if ``fault`` is the deliberate fault this process runs with."""
    return CHOSEN == fault
