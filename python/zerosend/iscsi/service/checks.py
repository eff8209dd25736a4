"""``--check`` and the start-up warnings: what can be told about a configuration before (or
without) serving it."""

from __future__ import annotations

import ipaddress
import socket

from ..storage.opening import open_store, parse_size
from .config import TargetConfig, split_hostport


def is_loopback(host: str) -> bool:
    """True if every address ``host`` names is a loopback address (a name that does not
    resolve counts as not loopback: the warning is better given than missed)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def exposure_warnings(cfg: TargetConfig, host: str) -> list[str]:
    """Warnings for a target listening on ``host`` with ``cfg``'s access rules."""
    if is_loopback(host):
        return []
    several = len(cfg.targets()) > 1
    return [
        f"listening on {host}, not a loopback address, with no allow-list, ACLs or CHAP"
        f"{' for target ' + t.iqn if several else ''}: any host that reaches it can read and "
        "write every LUN (set acls, allow or chap)"
        for t in cfg.targets()
        if not (t.allow or t.acls or t.chap is not None)
    ]


def check(cfg: TargetConfig) -> list[str]:
    """Opens every LUN's image (read-only, then closes it) so that a missing or unreadable
    image fails the check as it would fail the start; returns the warnings."""
    for spec in [lun for t in cfg.targets() for lun in t.luns]:
        if spec.path.startswith(("mem:", "null:")):
            parse_size(spec.path.partition(":")[2])  # not allocated for a check
        else:
            open_store(spec.path, readonly=True, mapped=False).close()
    host, _ = split_hostport(cfg.listen)
    return exposure_warnings(cfg, host)
