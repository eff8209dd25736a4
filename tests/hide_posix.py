"""Imported before zerosend in a child process: takes away what Python lacks on Windows (the
POSIX-only modules, ``os.sysconf``, ``os.sendfile``), so that importing the pure-Python fallback
is tested as the pure wheel meets it there. tests/test_api_fallback_import.py uses it."""

import os
import sys

POSIX_ONLY_MODULES = ("fcntl", "termios", "tty", "pty", "resource", "grp", "pwd", "syslog")
POSIX_ONLY_OS = ("sysconf", "sysconf_names", "sendfile")

if "zerosend" in sys.modules:
    raise RuntimeError("import tests.hide_posix before zerosend, or it hides nothing")
for name in POSIX_ONLY_MODULES:
    sys.modules[name] = None  # type: ignore[assignment]  # import raises ImportError
for name in POSIX_ONLY_OS:
    if hasattr(os, name):
        delattr(os, name)
