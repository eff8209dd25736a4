"""An iSCSI target (RFC 7143) on asyncio and zerosend: Data-In leaves with zero-copy sends."""

from .target import LunSpec, Target, TargetConfig

__all__ = ["LunSpec", "Target", "TargetConfig"]
