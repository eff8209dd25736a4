"""``python -m zerosend``: what this kernel offers, and why a backend is missing.

Probes the running kernel (no root needed, nothing is changed) and prints one line per
zero-copy backend, with the reason where it is unavailable, and the thresholds ``auto`` uses
with where they came from (calibrated on this machine, or the default). ``--version`` prints
the version.

``python -m zerosend calibrate --connect HOST:PORT [--seconds S]`` measures copy against
zero-copy sends to a peer that reads and discards (over the device your application uses, not
loopback) and stores the crossover for this kernel and CPU in the user's cache directory.
"""

from __future__ import annotations

import argparse
import sys

import zerosend
from zerosend._calibrate import calibrate
from zerosend._calibration import Thresholds, cache_path, load


def describe(caps: zerosend.Capabilities) -> str:
    """The probe's result as a few lines of text."""
    rows = [
        ("io_uring SEND_ZC", caps.io_uring_send_zc, caps.io_uring_send_zc_reason),
        ("MSG_ZEROCOPY", caps.msg_zerocopy, caps.msg_zerocopy_reason),
    ]
    width = max(len(name) for name, _, _ in rows)
    lines = [f"kernel {caps.kernel}"]
    for name, available, reason in rows:
        line = f"  {name.ljust(width)} : {'yes' if available else 'no'}"
        lines.append(line + (f" ({reason})" if reason else ""))
    return "\n".join(lines)


def describe_thresholds(thresholds: Thresholds) -> str:
    value = thresholds.tcp_zerocopy_threshold
    what = "never (every send copies)" if value is None else f"{value} bytes"
    return (
        f"auto, TCP zero-copy threshold: {what} [{thresholds.source}: {thresholds.detail}]\n"
        f"  cache: {cache_path()}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m zerosend",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"zerosend {zerosend.__version__}")
    commands = parser.add_subparsers(dest="command")
    calibration = commands.add_parser("calibrate", help="measure auto's threshold here")
    calibration.add_argument("--connect", required=True, help="HOST:PORT of a discarding peer")
    calibration.add_argument("--seconds", type=float, default=0.5, help="per measurement")
    args = parser.parse_args(argv)
    if args.command == "calibrate":
        host, sep, port = args.connect.rpartition(":")
        if not sep or not port.isdigit():
            parser.error(f"--connect: expected HOST:PORT, got {args.connect!r}")
        document = calibrate(host.strip("[]"), int(port), seconds=args.seconds)
        for row in document["measured"]:
            print(
                f"  {row['size']:>9} B {row['mode']:>8} ({row['backend']}): "
                f"{row['cpu_s_per_gb']:.3f} CPU s/GB, {row['mb_per_s']:,.0f} MB/s"
            )
    print(describe(zerosend.capabilities()))
    print(describe_thresholds(load()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
