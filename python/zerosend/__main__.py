"""``python -m zerosend``: what this kernel offers, and why a backend is missing.

Probes the running kernel (no root needed, nothing is changed) and prints one line per
zero-copy backend, with the reason where it is unavailable. ``--version`` prints the version.
"""

from __future__ import annotations

import argparse
import sys

import zerosend


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zerosend", description=__doc__)
    parser.add_argument("--version", action="version", version=f"zerosend {zerosend.__version__}")
    parser.parse_args(argv)
    print(describe(zerosend.capabilities()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
