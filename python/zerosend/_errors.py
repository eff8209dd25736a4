"""zerosend's own exceptions, shared by the extension and the pure-Python fallback.

Errors of the kernel stay what the kernel said: ``OSError`` subclasses with ``errno``
(``BrokenPipeError``, ``ConnectionResetError``, ...), so code that handles socket errors keeps
working. Errors zerosend itself decides derive from :class:`ZerosendError` as well.
"""

from __future__ import annotations


class ZerosendError(Exception):
    """Base class of the exceptions zerosend defines (``except zerosend.ZerosendError``)."""


class BackendUnavailableError(ZerosendError, OSError):
    """The requested zero-copy backend cannot be used on this kernel or socket; the message
    says why, ``errno`` is the kernel's."""


# Pickled and shown under the module that raises it (the extension, or its stand-in).
BackendUnavailableError.__module__ = "zerosend._native"
