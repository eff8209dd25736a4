"""The service manager's side of the service: ``sd_notify`` state (READY, RELOADING,
STOPPING, STATUS, ERRNO) written as one datagram to ``$NOTIFY_SOCKET`` (the protocol of
sd_notify(3): newline-separated ``KEY=VALUE`` lines, a path or an ``@`` abstract address), and a
log format for journald. No dependency on libsystemd."""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("zerosend.iscsi")

NOTIFY_ENV = "NOTIFY_SOCKET"


def _address(value: str) -> str | bytes:
    if value.startswith("@"):  # abstract namespace
        return b"\0" + value[1:].encode()
    return value


def notify(*lines: str) -> bool:
    """Send ``KEY=VALUE`` lines to the service manager; False if not run by one (or it is
    gone: a notification is never worth failing the target for)."""
    target = os.environ.get(NOTIFY_ENV)
    if not target or not target.startswith(("/", "@")):
        return False
    message = "\n".join(lines).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(message, _address(target))
    except OSError as e:
        log.warning("cannot notify the service manager at %s: %s", target, e)
        return False
    return True


def ready(status: str) -> bool:
    return notify("READY=1", f"STATUS={status}")


def reloading() -> bool:
    """RELOADING=1 with the time of the request, as Type=notify-reload wants it."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")


def reloaded(ok: bool, status: str, errno: int = 22) -> bool:
    """The reload ended: READY again; a refused one also says ERRNO (EINVAL: the config)."""
    lines = ["READY=1", f"STATUS={status}"]
    if not ok:
        lines.append(f"ERRNO={errno}")
    return notify(*lines)


def stopping() -> bool:
    return notify("STOPPING=1", "STATUS=stopping: draining in-flight sends")


_PRIORITIES = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}


class JournalFormatter(logging.Formatter):
    """Under journald (``$JOURNAL_STREAM`` set): no timestamp (the journal has its own) and a
    ``<N>`` syslog priority prefix, which journald turns into the entry's priority."""

    def __init__(self) -> None:
        super().__init__("%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITIES.get(record.levelname, 6)
        return f"<{priority}>{super().format(record)}"


def under_journal() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM"))
