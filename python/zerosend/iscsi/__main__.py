"""``zerosend-iscsi`` / ``python -m zerosend.iscsi``: serve disk images over iSCSI."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import tomllib
from typing import Any

from .chap import Credentials
from .stores import StoreError, parse_size
from .target import DEFAULT_IQN, DEFAULT_LISTEN, LunSpec, Target, TargetConfig

log = logging.getLogger("zerosend.iscsi")

EPILOG = """\
LUN forms: PATH (raw image or block device), PATH:ro (read-only), a qcow2 image (always
read-only; zlib-compressed clusters are inflated in user space), mem:SIZE, null:SIZE.

Config file (TOML), same settings; command-line options win:
  listen = "0.0.0.0:3260"
  iqn = "iqn.2024-01.org.example:disk"
  luns = ["/srv/disk.img", "/srv/base.qcow2:ro"]
  chap = "user:secret"            # initiators must authenticate
  mutual_chap = "target:secret2"  # the target's own credentials for mutual CHAP
  allow = ["iqn.1994-05.com.redhat:client1"]
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zerosend-iscsi",
        description="iSCSI target with zero-copy Data-In (zerosend).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", help="TOML file with the settings below")
    p.add_argument(
        "--listen", metavar="HOST:PORT", help=f"address to listen on (default {DEFAULT_LISTEN})"
    )
    p.add_argument("--iqn", help=f"target name (default {DEFAULT_IQN})")
    p.add_argument(
        "--lun",
        action="append",
        default=[],
        metavar="PATH[:ro]",
        help="a LUN, numbered from 0 in order",
    )
    p.add_argument("--chap", metavar="USER:SECRET", help="require CHAP from initiators")
    p.add_argument(
        "--mutual-chap", metavar="USER:SECRET", help="target credentials for mutual CHAP"
    )
    p.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="IQN",
        help="only these initiators may log in",
    )
    p.add_argument("--max-connections", type=int, help="connections open at once (default 256)")
    p.add_argument(
        "--max-pending-logins",
        type=int,
        help="connections allowed to sit in login at once; the oldest is dropped (default 64)",
    )
    p.add_argument("--buffers", type=int, help="transmit buffers in the pool (default 256)")
    p.add_argument("--buffer-size", help="size of each transmit buffer (default 256K)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def _creds(value: Any, what: str) -> Credentials:
    if isinstance(value, dict):
        return Credentials(str(value.get("user", "")), str(value.get("secret", "")))
    if isinstance(value, str):
        return Credentials.parse(value)
    raise ValueError(f"{what} must be 'USER:SECRET' or a table with user and secret")


def load_config(args: argparse.Namespace) -> TargetConfig:
    cfg = TargetConfig()
    file: dict[str, Any] = {}
    if args.config:
        try:
            with open(args.config, "rb") as f:
                file = tomllib.load(f)
        except OSError as e:
            raise ValueError(f"cannot read config {args.config}: {e.strerror}") from e
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config {args.config} is not valid TOML: {e}") from e
        known = {
            "listen",
            "iqn",
            "luns",
            "chap",
            "mutual_chap",
            "allow",
            "max_connections",
            "max_pending_logins",
            "buffers",
            "buffer_size",
        }
        unknown = set(file) - known
        if unknown:
            raise ValueError(f"config {args.config}: unknown keys {', '.join(sorted(unknown))}")
    cfg.listen = args.listen or file.get("listen", DEFAULT_LISTEN)
    cfg.iqn = args.iqn or file.get("iqn", DEFAULT_IQN)
    luns: list[LunSpec] = []
    for item in file.get("luns", []) if not args.lun else []:
        if isinstance(item, dict):
            luns.append(LunSpec(str(item["path"]), bool(item.get("readonly", False))))
        else:
            luns.append(LunSpec.parse(str(item)))
    luns += [LunSpec.parse(x) for x in args.lun]
    cfg.luns = luns
    chap = args.chap or file.get("chap")
    cfg.chap = _creds(chap, "chap") if chap else None
    mutual = args.mutual_chap or file.get("mutual_chap")
    cfg.mutual_chap = _creds(mutual, "mutual_chap") if mutual else None
    if cfg.mutual_chap and not cfg.chap:
        raise ValueError("--mutual-chap needs --chap as well")
    cfg.allow = frozenset(args.allow or file.get("allow", []))
    cfg.max_connections = args.max_connections or int(
        file.get("max_connections", cfg.max_connections)
    )
    cfg.max_pending_logins = args.max_pending_logins or int(
        file.get("max_pending_logins", cfg.max_pending_logins)
    )
    cfg.buffers = args.buffers or int(file.get("buffers", cfg.buffers))
    size = args.buffer_size or file.get("buffer_size")
    if size:
        cfg.buffer_size = parse_size(str(size))
    if not cfg.iqn.startswith(("iqn.", "eui.", "naa.")):
        raise ValueError(f"target name {cfg.iqn!r} must start with iqn., eui. or naa.")
    if not cfg.luns:
        raise ValueError("no LUN given: use --lun PATH (or luns = [...] in the config file)")
    return cfg


async def _run(cfg: TargetConfig) -> int:
    target = Target(cfg)
    await target.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, target.stop)
    loop.add_signal_handler(signal.SIGUSR1, target.log_state)
    await target.serve()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s zerosend-iscsi %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        cfg = load_config(args)
        return asyncio.run(_run(cfg))
    except (ValueError, StoreError, OSError) as e:
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
