"""``--metrics HOST:PORT``: the target's counters in the Prometheus text format.

Counters are not bumped on the I/O path: a scrape adds up what each open session already
counts (its commands and bytes, and its zerosend socket's ``stats``) and what sessions that
ended counted, kept when they end. The one measurement taken as it happens is the send latency:
how long each vectored send of a connection took from submission until it resolved, which for a
zero-copy send is when the kernel released its pages.

The endpoint is served on the target's own event loop (an HTTP/1.0 GET of ``/metrics``), so a
scrape reads the sessions between two steps of the loop, never while one changes them.
``prometheus_client`` (the ``zerosend[metrics]`` extra) writes the text format.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import zerosend

from ..session.latency import FAMILIES
from .config import metrics_address, split_hostport

if TYPE_CHECKING:
    from ..session.connection import Session
    from .target import Node, Target

try:
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        Histogram,
        PlatformCollector,
        ProcessCollector,
    )
    from prometheus_client import generate_latest as _generate_latest
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )
except ImportError:  # the extra is not installed: `--metrics` says so at start-up
    CollectorRegistry = None  # type: ignore[assignment,misc]

log = logging.getLogger("zerosend.iscsi")

PREFIX = "zerosend_iscsi"
# zerosend's per-socket byte counters by how the bytes went (zerosend.STATS_KEYS).
SENT_HOW = {
    "zerocopy": "bytes_zerocopy",
    "copied_by_kernel": "bytes_copied_by_kernel",
    "copied_below_threshold": "bytes_copied_below_threshold",
    "copied_requested": "bytes_copied_requested",
    "copied_backend": "bytes_copied_backend",
    "sendfile": "bytes_sendfile",
}
# The session's own counters (Session.stats) exported as <PREFIX>_<name>_total.
SESSION_COUNTERS = {
    "commands": ("commands", "SCSI commands received"),
    "read_bytes": ("read_bytes", "bytes of READ data sent (Data-In)"),
    "write_bytes": ("write_bytes", "bytes of WRITE data received (Data-Out and immediate)"),
    "zerocopy_fallbacks": (
        "zc_fallbacks",
        "times a connection left zero-copy because the kernel copied its zero-copy sends anyway",
    ),
    "login_failures": ("login_failures", "logins refused (authentication, ACL, target name)"),
    "rejects": ("rejects", "Reject PDUs sent (malformed or out-of-window PDUs)"),
    "check_conditions": ("check_conditions", "commands answered CHECK CONDITION"),
    "resets": ("resets", "LOGICAL UNIT RESET and TARGET WARM/COLD RESET requests carried out"),
}
# Send latency buckets: from a loopback copy (tens of microseconds) to a congested link.
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
HTTP_TIMEOUT = 10.0


def available() -> str | None:
    """None if the endpoint can be served, else what to install."""
    if CollectorRegistry is None:
        return "--metrics needs prometheus_client: pip install 'zerosend[metrics]'"
    return None


class TargetMetrics:
    """The target's metrics registry; ``attach``/``detach`` follow each connection."""

    def __init__(self, target: Target) -> None:
        reason = available()
        if reason is not None:
            raise ValueError(reason)
        self.target = target
        self.registry = CollectorRegistry()
        self.ended_sessions = 0
        self._ended_stats: dict[str, int] = dict.fromkeys(
            [key for key, _ in SESSION_COUNTERS.values()] + list(SENT_HOW.values()), 0
        )
        self._latency = Histogram(
            f"{PREFIX}_send_seconds",
            "time from submitting a send until it resolved (zero-copy: the kernel released "
            "its pages), by how it was sent",
            ["mode"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._observe = {
            True: self._latency.labels("zerocopy").observe,
            False: self._latency.labels("copy").observe,
        }
        self.registry.register(_SessionCollector(self))
        # The usual process_* (CPU, memory, descriptors) and python_info, as a default
        # registry would have them.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self._server: asyncio.Server | None = None
        self._open = 0  # connections being answered now
        self._refusing = 0  # connections past the limit, being answered 503
        self.limit = target.config.metrics_connections

    # -- following the connections

    def attach(self, session: Session) -> None:
        session.outbox.on_submit.append(self._submitted)

    def detach(self, session: Session) -> None:
        """The session ended: keep what it counted."""
        if session.logged_in:
            self.ended_sessions += 1
        for key, value in _session_counts(session).items():
            self._ended_stats[key] += value

    def _submitted(self, fut: asyncio.Future[Any], zerocopy: bool, _parts: list[Any]) -> None:
        start = time.perf_counter()
        observe = self._observe[zerocopy]
        fut.add_done_callback(lambda _: observe(time.perf_counter() - start))

    def totals(self) -> dict[str, int]:
        """Every counter summed over ended and open sessions."""
        out = dict(self._ended_stats)
        for session in self.target.sessions():
            for key, value in _session_counts(session).items():
                out[key] += value
        return out

    def render(self) -> bytes:
        data: bytes = _generate_latest(self.registry)
        return data

    # -- the endpoint

    async def start(self, listen: str) -> tuple[str, int]:
        host, port = split_hostport(metrics_address(listen))
        try:
            self._server = await asyncio.start_server(self._handle, host, port)
        except OSError as e:
            raise OSError(e.errno, f"cannot serve metrics on {listen}: {e.strerror}") from e
        bound = self._server.sockets[0].getsockname()
        log.info("metrics on http://%s:%d/metrics", bound[0], bound[1])
        return bound[0], bound[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= self.limit:
            # Idle or slow clients must not pile up on the target's own event loop: past the
            # limit a client gets a 503, once its request is read (closing on an unread
            # request would reset the connection under the answer), within LINGER seconds;
            # past twice the limit it is closed at once.
            await self._busy(reader, writer)
            return
        self._open += 1
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HTTP_TIMEOUT)
            status, body, ctype = self._answer(head)
            writer.write(
                f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            )
            if not head.startswith(b"HEAD "):
                writer.write(body)
            await asyncio.wait_for(writer.drain(), HTTP_TIMEOUT)
            # Lingering close: take what the client still sends (a request body) until it
            # closes; closing with unread bytes would make the kernel answer with a reset,
            # which can destroy the response before the client has read it.
            writer.write_eof()
            await asyncio.wait_for(_discard_until_eof(reader), LINGER)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a scraper that went away or never sent a whole request
        except asyncio.CancelledError:
            pass  # the target is stopping: the connection just closes (nothing awaits this task)
        finally:
            self._open -= 1
            writer.close()

    async def _busy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing >= self.limit:
            writer.close()
            return
        self._refusing += 1
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), LINGER)
            writer.write(
                b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n"
                b"Connection: close\r\n\r\n"
            )
            writer.write_eof()
            await asyncio.wait_for(_discard_until_eof(reader), LINGER)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            pass  # the target is stopping
        finally:
            self._refusing -= 1
            writer.close()

    def _answer(self, head: bytes) -> tuple[str, bytes, str]:
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) < 2 or parts[0] not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", b"only GET /metrics\n", "text/plain"
        if parts[1].split(b"?", 1)[0] not in (b"/metrics", b"/"):
            return "404 Not Found", b"the metrics are at /metrics\n", "text/plain"
        return "200 OK", self.render(), CONTENT_TYPE_LATEST


#: How long a finished request's connection waits for the client to close it.
LINGER = 2.0


async def _discard_until_eof(reader: asyncio.StreamReader) -> None:
    while await reader.read(1 << 16):
        pass


def _session_counts(session: Session) -> dict[str, int]:
    st = session.stats
    zs = session.zs.stats
    counts = {key: st.get(key, 0) for key, _ in SESSION_COUNTERS.values()}
    counts.update({key: zs.get(key, 0) for key in SENT_HOW.values()})
    return counts


class _SessionCollector:
    """Reads the sessions at scrape time."""

    def __init__(self, metrics: TargetMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        m = self.metrics
        target = m.target
        sessions = target.sessions()
        kinds = {"normal": 0, "discovery": 0}
        for s in sessions:
            if s.logged_in:
                kinds["discovery" if s.discovery else "normal"] += 1
        gauge = GaugeMetricFamily(
            f"{PREFIX}_sessions", "logged-in sessions, by type", labels=["type"]
        )
        for kind, n in kinds.items():
            gauge.add_metric([kind], n)
        yield gauge
        yield _gauge("connections", "open connections, logged in or not", len(sessions))
        yield _counter("sessions_ended", "sessions that ended", m.ended_sessions)
        nodes = list(target.nodes.values())
        yield _gauge("luns", "LUNs served", sum(len(node.luns) for node in nodes))
        build = GaugeMetricFamily(
            f"{PREFIX}_build_info", "the zerosend version and the (first) target's name",
            labels=["version", "iqn"],
        )  # fmt: skip
        build.add_metric([zerosend.__version__, target.iqn], 1)
        yield build
        per_target = GaugeMetricFamily(
            f"{PREFIX}_target_luns", "LUNs served, by target", labels=["target"]
        )
        logged_in = GaugeMetricFamily(
            f"{PREFIX}_target_sessions", "normal sessions logged in, by target", labels=["target"]
        )
        by_host: dict[int, int] = {}
        for s in sessions:
            if s.logged_in and not s.discovery:
                by_host[id(s.host)] = by_host.get(id(s.host), 0) + 1
        for node in nodes:
            per_target.add_metric([node.iqn], len(node.luns))
            logged_in.add_metric([node.iqn], by_host.get(id(node), 0))
        yield per_target
        yield logged_in
        size = GaugeMetricFamily(
            f"{PREFIX}_lun_size_bytes",
            "each LUN's size, by target, LUN number, image and access",
            labels=["target", "lun", "path", "kind", "readonly"],
        )  # fmt: skip
        for node in nodes:
            for number, lu in sorted(node.luns.items()):
                readonly = "true" if lu.readonly else "false"
                size.add_metric(
                    [node.iqn, str(number), lu.store.name, lu.store.kind, readonly], lu.store.size
                )
        yield size
        yield from _latency(nodes)
        pool = target.pool
        yield _gauge("transmit_buffers", "transmit buffers in the pool", pool.count)
        yield _gauge("transmit_buffers_free", "transmit buffers free now", pool.available)
        totals = m.totals()
        for name, (key, text) in SESSION_COUNTERS.items():
            yield _counter(name, text, totals[key])
        sent = CounterMetricFamily(
            f"{PREFIX}_sent_bytes",
            "bytes the connections sent, by how: zerocopy (the kernel sent the pages without "
            "copying), copied_by_kernel (sent zero-copy, copied by the kernel: loopback, veth), "
            "copied_* (sent by copy, and why), sendfile",
            labels=["how"],
        )
        for how, key in SENT_HOW.items():
            sent.add_metric([how], totals[key])
        yield sent


def _latency(nodes: list[Node]) -> Iterator[Any]:
    """The command and disk latency histograms, as the sessions and disk threads kept them."""
    commands = HistogramMetricFamily(
        f"{PREFIX}_command_seconds",
        "time from a SCSI command's PDU until its status was queued for sending, by target, "
        "LUN and op (read: READ commands, write: WRITE and VERIFY, other: the rest)",
        labels=["target", "lun", "op"],
    )
    disk = HistogramMetricFamily(
        f"{PREFIX}_disk_seconds",
        "time each store operation took (read: from the image, write: to it, flush: a sync), "
        "by target and LUN",
        labels=["target", "lun", "op"],
    )
    for node in nodes:
        for number, lat in sorted(node.latency.items()):
            lun = str(number)
            for op, hist in zip(FAMILIES, lat.commands, strict=True):
                commands.add_metric([node.iqn, lun, op], hist.cumulative(), hist.total)
            with lat.lock:  # (observed in the disk threads)
                taken = [(op, h.cumulative(), h.total) for op, h in lat.disk.items()]
            for op, buckets, total in taken:
                disk.add_metric([node.iqn, lun, op], buckets, total)
    yield commands
    yield disk


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", text, value=value)


def _counter(name: str, text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", text, value=value)
