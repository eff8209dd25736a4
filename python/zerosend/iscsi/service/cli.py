"""``zerosend-iscsi`` / ``python -m zerosend.iscsi``: serve disk images over iSCSI."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Mapping
from typing import Any

import zerosend

from ..storage.store import StoreError
from . import sdnotify
from .checks import check, exposure_warnings
from .config import DEFAULTS, SETTINGS, TargetConfig, load_config
from .control import ControlServer
from .control import render as render_state
from .control import request as control_request
from .metrics import TargetMetrics
from .reload import Reloader
from .target import Target

log = logging.getLogger("zerosend.iscsi")

EPILOG = """\
LUN forms: PATH (raw image or block device), PATH:ro (read-only), PATH:ro,mmap (large reads
sent straight from the mapped image), PATH:mmap (writable and mapped: reads go through pooled
buffers like PATH's, since a WRITE would change pages a READ has in flight), a qcow2 image
(always read-only; zlib-compressed clusters are inflated in user space), mem:SIZE, null:SIZE.

Config file (TOML), the same settings by the option's name with underscores; command-line
options win:
  listen = "0.0.0.0:3260"
  iqn = "iqn.2024-01.org.example:disk"
  luns = ["/srv/disk.img", "/srv/base.qcow2:ro"]
  chap = { user = "alice", secret_file = "/etc/zs/alice.secret" }  # mode 0600
  mutual_chap = { user = "tgt", credential = "tgt-chap" }  # systemd LoadCredential=
  allow = ["iqn.1994-05.com.redhat:client1"]
  backend = "io_uring"            # force a zerosend backend (default auto)
  zerocopy_probe = false          # keep sending zero-copy even where the kernel copies
  reservation_state = "/var/lib/zerosend/pr.json"  # persistent reservations kept with APTPL
  metrics = "127.0.0.1:9310"      # Prometheus metrics at http://127.0.0.1:9310/metrics
  session_commands = 64           # per-session limits: commands, unsent bytes, buffers
  nop_interval = 5                # ping an initiator after 5 s without progress

Persistent reservations whose initiator set APTPL are kept in the reservation_state file
(written atomically) and restored at start; a corrupt file stops the start with an error
(restore it, or move it aside to start without reservations), a missing one starts with none.

Signals: SIGTERM/SIGINT stop (in-flight sends drain); SIGHUP reads the config again and applies
its LUNs, allow-list, ACLs and CHAP (sessions the change does not touch stay; a bad config is
refused and the running one kept); SIGUSR1 logs each connection's state. Under systemd
($NOTIFY_SOCKET) start, reload (refused: ERRNO) and stop are reported with sd_notify.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zerosend-iscsi",
        description="iSCSI target with zero-copy Data-In (zerosend). "
        "`zerosend-iscsi show` prints a running target's state (see --control-socket).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", help="TOML file with the settings below")
    p.add_argument(
        "--check",
        action="store_true",
        help="check the settings and open every LUN's image, print any warning, and exit: "
        "0 if the target would start, 2 (with the key at fault) if not",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {zerosend.__version__}")
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


async def _run(cfg: TargetConfig, options: Mapping[str, Any], path: str | None) -> int:
    loop = asyncio.get_running_loop()
    # From the first moment: a signal that comes while the target starts (it already listens,
    # so a client or a test may send one) is kept and acted on once it serves, never the
    # default action (SIGHUP's would end the process).
    early: list[signal.Signals] = []
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        loop.add_signal_handler(sig, early.append, sig)
    target = Target(cfg)
    host, port = await target.start()
    for warning in exposure_warnings(cfg, host):
        log.warning("%s", warning)
    metrics = None
    if cfg.metrics:
        metrics = target.metrics = TargetMetrics(target)
        await metrics.start(cfg.metrics)
    control = None
    control_path = cfg.control_socket or default_control_socket()
    if control_path:
        control = ControlServer(target)
        await control.start(control_path)

    def stop() -> None:
        sdnotify.stopping()
        target.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    loop.add_signal_handler(signal.SIGUSR1, target.log_state)
    reloader = Reloader(target, options, path)

    def serving() -> str:
        nodes = list(target.nodes.values())
        luns = sum(len(node.luns) for node in nodes)
        names = nodes[0].iqn if len(nodes) == 1 else f"{len(nodes)} targets"
        return f"serving {luns} LUNs on {host}:{port} as {names}"

    def reload() -> None:
        # Type=notify-reload: RELOADING=1 now, READY=1 when done (with ERRNO if refused), so
        # `systemctl reload` waits for the outcome and fails when the reload was refused.
        sdnotify.reloading()

        def done(task: asyncio.Task[bool]) -> None:
            ok = not task.cancelled() and task.exception() is None and task.result()
            refused = "reload refused, the running config is kept (see the log); "
            sdnotify.reloaded(ok, serving() if ok else refused + serving())

        reloader.request().add_done_callback(done)

    loop.add_signal_handler(signal.SIGHUP, reload)
    sdnotify.ready(serving())
    handlers = {signal.SIGHUP: reload, signal.SIGTERM: stop, signal.SIGINT: stop,
                signal.SIGUSR1: target.log_state}  # fmt: skip
    for sig in dict.fromkeys(early):  # each kind once, in the order they came
        handlers[sig]()
    try:
        await target.serve()
    finally:
        if metrics is not None:
            metrics.close()
        if control is not None:
            control.close()
    return 0


def default_control_socket() -> str:
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return os.path.join(runtime, "control") if runtime else ""


def show(argv: list[str]) -> int:
    """``zerosend-iscsi show``: the running target's state, read from its control socket."""
    p = argparse.ArgumentParser(prog="zerosend-iscsi show", description=show.__doc__)
    p.add_argument(
        "--control-socket",
        metavar="PATH",
        default=default_control_socket() or "/run/zerosend-iscsi/control",
        help="the target's control socket (default %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print the state as JSON")
    args = p.parse_args(argv)
    try:
        answer = control_request(args.control_socket)
    except OSError as e:
        print(f"zerosend-iscsi show: cannot reach {args.control_socket}: {e.strerror or e}",
              file=sys.stderr)  # fmt: skip
        return 1
    if "error" in answer:
        print(f"zerosend-iscsi show: {answer['error']}", file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps(answer, indent=2) + "\n" if args.json else render_state(answer))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["show"]:
        return show(argv[1:])
    args = build_parser().parse_args(argv)
    if not args.check:
        # A SIGHUP before the config is read asks for what is about to be read anyway; from the
        # event loop's start on it is kept and acted on (see _run), never the end of the process.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    handler = logging.StreamHandler(sys.stderr)
    if sdnotify.under_journal() and not args.check:  # journald stamps and ranks each line
        handler.setFormatter(sdnotify.JournalFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s zerosend-iscsi %(levelname)s %(message)s")
        )
    logging.basicConfig(level=args.log_level, handlers=[handler])
    try:
        options = vars(args)
        cfg = load_config(options, args.config)
        if args.check:
            for warning in check(cfg):
                log.warning("%s", warning)
            targets = cfg.targets()
            luns = sum(len(t.luns) for t in targets)
            several = f", {len(targets)} targets" if len(targets) > 1 else ""
            print(f"{args.config or 'command line'}: OK ({luns} LUNs{several})")
            return 0
        return asyncio.run(_run(cfg, options, args.config))
    except (ValueError, StoreError, OSError) as e:
        log.error("%s", e)
        if not args.check:
            sdnotify.notify(f"STATUS=failed to start: {e}", f"ERRNO={getattr(e, 'errno', 0) or 22}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
