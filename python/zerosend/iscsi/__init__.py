"""An iSCSI target (RFC 7143) on asyncio and zerosend: Data-In leaves with zero-copy sends."""

from .config import LunSpec, TargetConfig
from .target import Target

__all__ = ["LunSpec", "Target", "TargetConfig"]
