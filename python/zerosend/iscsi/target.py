"""The target: listening socket, sessions, LUNs, shared transmit buffer pool, clean shutdown."""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass, field
from typing import Any

import zerosend
from zerosend._native import crc32c

from .bufpool import make_pool
from .chap import Credentials
from .scsi import CommandSet, LogicalUnit
from .session import Session
from .stores import Store, open_store

log = logging.getLogger("zerosend.iscsi")

DEFAULT_IQN = "iqn.2024-01.org.zerosend:target"
DEFAULT_LISTEN = "127.0.0.1:3260"


_LUN_OPTIONS = {"ro", "rw", "mmap"}


@dataclass
class LunSpec:
    path: str
    readonly: bool = False
    mapped: bool = False

    @classmethod
    def parse(cls, text: str) -> LunSpec:
        """``PATH`` with optional ``:ro``, ``:rw``, ``:mmap`` or ``:ro,mmap``; also ``mem:SIZE``
        and ``null:SIZE``."""
        head, sep, tail = text.rpartition(":")
        opts = set(tail.split(","))
        if sep and head and opts <= _LUN_OPTIONS:
            return cls(head, "ro" in opts, "mmap" in opts)
        return cls(text)


@dataclass
class TargetConfig:
    listen: str = DEFAULT_LISTEN
    iqn: str = DEFAULT_IQN
    luns: list[LunSpec] = field(default_factory=list)
    chap: Credentials | None = None
    mutual_chap: Credentials | None = None
    allow: frozenset[str] = frozenset()
    max_connections: int = 256
    max_pending_logins: int = 64
    buffers: int = 256
    buffer_size: int = 256 * 1024


def split_hostport(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT``, ``HOST`` (port 3260)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else "3260"
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, "3260"
    try:
        return host or "0.0.0.0", int(port)
    except ValueError as e:
        raise ValueError(f"bad listen address {text!r}: port is not a number") from e


class Target:
    """An iSCSI target serving ``config.luns``; ``await serve()`` runs until ``stop()``."""

    def __init__(self, config: TargetConfig) -> None:
        if not config.luns:
            raise ValueError("at least one --lun is required")
        self.config = config
        self.iqn = config.iqn
        self.chap = config.chap
        self.mutual_chap = config.mutual_chap
        self.allow = config.allow
        self.luns: dict[int, LogicalUnit] = {}
        self._stores: list[Store] = []
        for number, spec in enumerate(config.luns):
            store = open_store(spec.path, spec.readonly, spec.mapped)
            self._stores.append(store)
            self.luns[number] = LogicalUnit(number, store, self.iqn)
        self.commands = CommandSet(self.luns)
        self.pool = make_pool(config.buffers, config.buffer_size)
        self.sessions: dict[int, Session] = {}
        self.connections: set[Session] = set()
        self._logging_in: dict[Session, None] = {}  # insertion-ordered: oldest first
        self._by_nexus: dict[tuple[str, bytes], Session] = {}
        self._next_tsih = 1
        self.stopping = False
        self._server: socket.socket | None = None
        self._stopped = asyncio.Event()
        self.address: tuple[str, int] | None = None
        self.crc32c = crc32c

    def wrap(self, sock: socket.socket) -> Any:
        return zerosend.wrap(sock)

    # -- sessions

    def session_started(self, session: Session, initiator: str, isid: bytes) -> int:
        self._logging_in.pop(session, None)
        nexus = (initiator, isid)
        old = self._by_nexus.get(nexus)
        if old is not None and old is not session:
            log.info("%s: session reinstated by a new login; closing the old one", old.name)
            old.abort_connection()
            self.sessions.pop(old.tsih, None)
        while self._next_tsih in self.sessions or self._next_tsih == 0:
            self._next_tsih = (self._next_tsih + 1) & 0xFFFF
        tsih = self._next_tsih
        self._next_tsih = (self._next_tsih + 1) & 0xFFFF
        self.sessions[tsih] = session
        self._by_nexus[nexus] = session
        return tsih

    def session_ended(self, session: Session) -> None:
        self.connections.discard(session)
        self._logging_in.pop(session, None)
        if session.tsih and self.sessions.get(session.tsih) is session:
            del self.sessions[session.tsih]
            nexus = (session.initiator, session.isid)
            if self._by_nexus.get(nexus) is session:
                del self._by_nexus[nexus]
            st = session.stats
            log.info(
                "%s: session ended (commands=%d read=%d bytes write=%d bytes data-in sends=%d)",
                session.name, st["commands"], st["read_bytes"], st["write_bytes"], st["zc_sends"],
            )  # fmt: skip

    def abort_tasks(self, lun: int | None, only: Session | None) -> None:
        for s in list(self.sessions.values()):
            if only is None or s is only:
                s.abort_tasks(lun)

    def log_state(self) -> None:
        """One log line per connection with its windows and in-flight counts (SIGUSR1)."""
        log.info("state: %d connections, %d/%d transmit buffers free", len(self.connections),
                 self.pool.available, self.pool.count)  # fmt: skip
        for s in list(self.connections):
            log.info(
                "state: %s ExpCmdSN=%d MaxCmdSN=%d active=%d writes=%d reads=%d inflight=%s",
                s.name, s.expcmdsn, s.maxcmdsn, s.active, len(s.writes), len(s.reads),
                getattr(s.zs, "inflight", "?"),
            )  # fmt: skip

    def drop_all_sessions(self) -> None:
        for s in list(self.connections):
            s.abort_connection()

    def send_targets(
        self, value: str, discovery: bool, sock: socket.socket
    ) -> list[tuple[str, str]]:
        # "All" (any session), our name, or empty (the current target, normal sessions only)
        if value not in ("All", self.iqn) and not (value == "" and not discovery):
            return []
        host, port = sock.getsockname()[:2]
        if ":" in host:
            host = f"[{host}]"
        return [("TargetName", self.iqn), ("TargetAddress", f"{host}:{port},1")]

    # -- serving

    async def start(self) -> tuple[str, int]:
        host, port = split_hostport(self.config.listen)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        srv = socket.socket(family, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            srv.bind(addr)
        except OSError as e:
            srv.close()
            raise OSError(e.errno, f"cannot listen on {self.config.listen}: {e.strerror}") from e
        srv.listen(128)
        srv.setblocking(False)
        self._server = srv
        self.address = srv.getsockname()[:2]
        luns = ", ".join(
            f"{n}={lu.store.name} ({lu.store.kind}, {lu.store.size} bytes"
            f"{', ro' if lu.readonly else ''})"
            for n, lu in self.luns.items()
        )
        log.info(
            "listening on %s:%d as %s; LUNs: %s", self.address[0], self.address[1], self.iqn, luns
        )
        return self.address

    async def serve(self) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None
        loop = asyncio.get_running_loop()
        accept = loop.create_task(self._accept_loop(self._server))
        await self._stopped.wait()
        accept.cancel()
        self._server.close()
        # Drain: sessions stop reading, finish what is queued, wait for every release.
        for s in list(self.connections):
            s.closing = True
            if s.task is not None:
                s.task.cancel()
        tasks = [s.task for s in list(self.connections) if s.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=15)
        for store in self._stores:
            try:
                store.flush()
            except OSError as e:
                log.error("flush of %s failed at shutdown: %s", store.name, e)
            store.close()
        log.info("stopped")

    def stop(self) -> None:
        if not self.stopping:
            log.info("shutting down: draining in-flight sends")
            self.stopping = True
            self._stopped.set()

    async def _accept_loop(self, srv: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(srv)
            except OSError as e:
                log.warning("accept failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            peer = f"{addr[0]}:{addr[1]}"
            if len(self._logging_in) >= self.config.max_pending_logins:
                # A flood of idle or slow connections: the oldest not-yet-logged-in one makes room.
                oldest = next(iter(self._logging_in))
                log.warning(
                    "%s: evicted: %d connections still in login", oldest.peer, len(self._logging_in)
                )
                self._logging_in.pop(oldest, None)
                oldest.abort_connection()
            if len(self.connections) >= self.config.max_connections:
                log.warning("%s: refused: %d connections already open", peer, len(self.connections))
                conn.close()
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                session = Session(self, conn, peer)
            except OSError as e:
                log.warning("%s: cannot set up connection: %s", peer, e)
                conn.close()
                continue
            log.info("%s: connection accepted", peer)
            self.connections.add(session)
            self._logging_in[session] = None
            session.task = loop.create_task(session.run())
