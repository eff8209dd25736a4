"""``zerosend-iscsi`` / ``python -m zerosend.iscsi``: serve disk images over iSCSI."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from .config import DEFAULTS, SETTINGS, TargetConfig, load_config
from .stores import StoreError
from .target import Target

log = logging.getLogger("zerosend.iscsi")

EPILOG = """\
LUN forms: PATH (raw image or block device), PATH:ro (read-only), PATH:mmap (reads sent from
the mapped image), a qcow2 image (always read-only; zlib-compressed clusters are inflated in
user space), mem:SIZE, null:SIZE.

Config file (TOML), the same settings by the option's name with underscores; command-line
options win:
  listen = "0.0.0.0:3260"
  iqn = "iqn.2024-01.org.example:disk"
  luns = ["/srv/disk.img", "/srv/base.qcow2:ro"]
  chap = "user:secret"            # initiators must authenticate
  mutual_chap = "target:secret2"  # the target's own credentials for mutual CHAP
  allow = ["iqn.1994-05.com.redhat:client1"]
  backend = "io_uring"            # force a zerosend backend (default auto)
  zerocopy_probe = false          # keep sending zero-copy even where the kernel copies
  session_commands = 64           # per-session limits: commands, unsent bytes, buffers
  nop_interval = 5                # ping an initiator after 5 s without progress
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zerosend-iscsi",
        description="iSCSI target with zero-copy Data-In (zerosend).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", help="TOML file with the settings below")
    for s in SETTINGS:
        default = getattr(DEFAULTS, s.key)
        if isinstance(default, bool):
            default = "on" if default else "off"
        shown = f" (default {default})" if isinstance(default, (str, int, float)) else ""
        p.add_argument(
            s.flag,
            dest=s.key,
            metavar=s.metavar,
            action="append" if s.repeated else "store",
            help=s.help + shown,
        )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


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
        cfg = load_config(vars(args), args.config)
        return asyncio.run(_run(cfg))
    except (ValueError, StoreError, OSError) as e:
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
