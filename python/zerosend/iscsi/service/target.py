"""The target: listening socket, sessions, LUNs, shared transmit buffer pool, clean shutdown.

Sessions see it through ``session.connection.SessionHost``; it sees them through their public
methods.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Protocol

import zerosend

from ..scsi.commands import CommandSet
from ..scsi.families import command_set
from ..scsi.nexus import Nexus
from ..scsi.reservations import Reservations
from ..scsi.unit import LogicalUnit
from ..session.connection import Session
from ..session.latency import LunLatency, time_disk
from ..session.liveness import tune_socket
from ..session.login import LoginPolicy, admits
from ..storage.opening import open_store
from ..storage.store import Store
from ..wire.bufpool import MmapPool
from .config import TargetConfig, TargetSpec, numbered, split_hostport

log = logging.getLogger("zerosend.iscsi")


class SessionWatcher(Protocol):
    """What follows the target's sessions as they come and go (the metrics exporter)."""

    def attach(self, session: Session) -> None: ...
    def detach(self, session: Session) -> None: ...


def _check_backend(backend: str) -> None:
    """A forced backend the kernel lacks fails at start-up, not at every connection."""
    caps = zerosend.capabilities()
    reason = {
        "io_uring": None if caps.io_uring_send_zc else caps.io_uring_send_zc_reason,
        "msg_zerocopy": None if caps.msg_zerocopy else caps.msg_zerocopy_reason,
    }.get(backend)
    if reason is not None:
        raise ValueError(f"--backend {backend} is unavailable here: {reason}; use auto or copy")


def open_units(spec: TargetSpec) -> dict[int, LogicalUnit]:
    """The LUNs of ``spec``, their images opened (and closed again if one fails). An open may
    wait for a device: a reload calls this in a thread."""
    luns: dict[int, LogicalUnit] = {}
    try:
        for number, lun in numbered(spec.luns).items():
            store = open_store(lun.path, lun.readonly, lun.mapped)
            luns[number] = LogicalUnit(number, store, spec.iqn, serial_text=lun.serial, wwn=lun.wwn)
    except BaseException:
        for lu in luns.values():
            lu.store.close()
        raise
    return luns


def reservation_file(config: TargetConfig, iqn: str) -> str | None:
    """Where ``iqn``'s persistent reservations are kept: ``reservation_state`` in the
    single-target form; with [[target]] tables, one file per target, its IQN in the name
    (``NAME.reservations.IQN.json``), so that reordering the tables moves nothing."""
    path = config.reservation_state
    if not path:
        return None
    if config.target and not (len(config.target) == 1 and config.target[0].luns is config.luns):
        stem, ext = os.path.splitext(path)
        return f"{stem}.{iqn}{ext or '.json'}"
    return path


class Node:
    """One target (IQN) of the daemon, as the sessions logged in to it see it (their
    ``SessionHost``): its LUNs, its SCSI commands and reservations, its login policy. The
    connection registry and the transmit buffers are the daemon's (``Target``)."""

    def __init__(self, daemon: Target, spec: TargetSpec, luns: dict[int, LogicalUnit]) -> None:
        self.daemon = daemon
        self.spec = spec
        self.iqn = spec.iqn
        self.luns = luns
        reservations = Reservations(
            self.luns, reservation_file(daemon.config, spec.iqn), self._abort_nexus_tasks
        )
        self.commands = command_set(self.luns, reservations)
        self.commands.acl_of = spec.acl_for  # LUN masking by the initiator's ACL
        self.removed = False  # a reload took it away: no new logins
        # Command and disk latency by LUN number, measured only when metrics are served
        self.latency: dict[int, LunLatency] = {}
        self.measure(luns)

    def measure(self, luns: dict[int, LogicalUnit]) -> None:
        """Time the commands and disk operations of ``luns`` (new or replacing ones keep their
        number's histograms: a Prometheus histogram only grows)."""
        if self.daemon.config.metrics:
            for number, lu in luns.items():
                time_disk(lu.store, self.latency.setdefault(number, LunLatency()))

    @property
    def config(self) -> TargetConfig:
        return self.daemon.config

    @property
    def policy(self) -> LoginPolicy:
        return self.spec

    @property
    def pool(self) -> MmapPool:
        return self.daemon.pool

    @property
    def stopping(self) -> bool:
        return self.daemon.stopping

    def policies(self) -> list[LoginPolicy]:
        return self.daemon.policies()

    def for_target(self, iqn: str) -> Node:
        return self.daemon.for_target(iqn)

    def visible_targets(self, initiator: str, address: str) -> list[str]:
        return self.daemon.visible_targets(initiator, address)

    def sessions(self) -> list[Session]:
        """The sessions logged in to this target."""
        return [s for s in self.daemon.sessions() if s.host is self]

    def session_of(self, initiator: str, isid: bytes) -> Session | None:
        return self.daemon.registered(self.iqn, initiator, isid)

    def session_started(self, session: Session, initiator: str, isid: bytes) -> int:
        return self.daemon.register(session, self.iqn, initiator, isid)

    def session_ended(self, session: Session) -> None:
        self.daemon.session_ended(session)

    def abort_tasks(self, lun: int | None, only: Session | None) -> None:
        for s in self.sessions():
            if only is None or s is only:
                s.abort_tasks(lun)

    def _abort_nexus_tasks(self, nexus: Nexus, lun: int) -> None:
        session = self.session_of(nexus.initiator, nexus.isid)
        if session is not None:
            session.abort_tasks(lun)

    def reset_logical_units(self, lun: int | None) -> None:
        nexuses = [s.nexus for s in self.sessions() if s.logged_in]
        self.commands.reservations.reset(lun, nexuses)

    def reset(self) -> None:
        """TARGET COLD RESET: this target's connections drop, not other targets'."""
        for s in self.sessions():
            s.abort_connection()

    def others_logged_in(self, session: Session) -> bool:
        return any(s is not session and s.logged_in for s in self.sessions())


class Target:
    """An iSCSI target daemon serving one target (IQN) or several (``config.targets()``);
    ``await serve()`` runs until ``stop()``. ``luns``, ``commands``, ``iqn`` and ``policy``
    are the first target's."""

    def __init__(self, config: TargetConfig) -> None:
        specs = config.targets()
        if not specs or not all(spec.luns for spec in specs):
            raise ValueError("at least one --lun is required")
        self.config = config
        _check_backend(config.backend)
        self.nodes: dict[str, Node] = {}
        self._stores: list[Store] = []
        try:
            for spec in specs:
                luns = open_units(spec)
                self._stores += [lu.store for lu in luns.values()]
                self.nodes[spec.iqn] = Node(self, spec, luns)
        except BaseException:
            for store in self._stores:
                store.close()
            raise
        self.pool = MmapPool(config.buffers, config.buffer_size)
        self.stopping = False
        self.address: tuple[str, int] | None = None
        self._connections: dict[Session, asyncio.Task[None]] = {}
        self._logging_in: dict[Session, None] = {}  # insertion-ordered: oldest first
        self._sessions: dict[int, Session] = {}  # by TSIH
        # TSIH and (target, initiator, ISID): a nexus is per target (discovery: target "")
        self._registered: dict[Session, tuple[int, tuple[str, str, bytes]]] = {}
        self._by_nexus: dict[tuple[str, str, bytes], Session] = {}
        self._next_tsih = 1
        self._server: socket.socket | None = None
        self._stopped = asyncio.Event()
        self.metrics: SessionWatcher | None = None  # set when --metrics serves them

    # -- the first target's, as before there were several

    @property
    def first(self) -> Node:
        return next(iter(self.nodes.values()))

    @property
    def iqn(self) -> str:
        return self.first.iqn

    @property
    def luns(self) -> dict[int, LogicalUnit]:
        return self.first.luns

    @property
    def commands(self) -> CommandSet:
        return self.first.commands

    @property
    def policy(self) -> LoginPolicy:
        return self.first.spec

    @property
    def latency(self) -> dict[int, LunLatency]:
        return {}  # (before a login picked its target: no commands)

    # -- sessions (the SessionHost protocol; a session's host is its Node once logged in)

    def policies(self) -> list[LoginPolicy]:
        """Every target's login policy, in config order (a login picks one by its name)."""
        return [node.spec for node in self.nodes.values() if not node.removed]

    def for_target(self, iqn: str) -> Node:
        return self.nodes[iqn]

    def visible_targets(self, initiator: str, address: str) -> list[str]:
        """The targets ``initiator`` may log in to from ``address`` (SendTargets)."""
        return [
            iqn for iqn, node in self.nodes.items()
            if not node.removed and admits(node.spec, initiator, address)
        ]  # fmt: skip

    def session_of(self, initiator: str, isid: bytes) -> Session | None:
        return self.registered("", initiator, isid)

    def registered(self, iqn: str, initiator: str, isid: bytes) -> Session | None:
        return self._by_nexus.get((iqn, initiator, isid))

    def session_started(self, session: Session, initiator: str, isid: bytes) -> int:
        return self.register(session, "", initiator, isid)

    def register(self, session: Session, iqn: str, initiator: str, isid: bytes) -> int:
        """A login to target ``iqn`` ("": discovery) reached full feature phase: register it,
        reinstating an older session of the same nexus, and return its TSIH."""
        self._logging_in.pop(session, None)
        nexus = (iqn, initiator, isid)
        old = self._by_nexus.get(nexus)
        if old is not None and old is not session:
            log.info("%s: session reinstated by a new login; closing the old one", old.name)
            old.abort_connection()
            old.host.commands.reservations.nexus_lost(old.nexus)  # the old I_T nexus ended
            registered = self._registered.pop(old, None)
            if registered is not None:
                self._sessions.pop(registered[0], None)
        while self._next_tsih in self._sessions or self._next_tsih == 0:
            self._next_tsih = (self._next_tsih + 1) & 0xFFFF
        tsih = self._next_tsih
        self._next_tsih = (self._next_tsih + 1) & 0xFFFF
        self._sessions[tsih] = session
        self._registered[session] = (tsih, nexus)
        self._by_nexus[nexus] = session
        return tsih

    def session_ended(self, session: Session) -> None:
        if self.metrics is not None:
            self.metrics.detach(session)
        self._connections.pop(session, None)
        self._logging_in.pop(session, None)
        registered = self._registered.pop(session, None)
        if registered is None:
            return
        tsih, nexus = registered
        del self._sessions[tsih]
        if self._by_nexus.get(nexus) is session:
            del self._by_nexus[nexus]
            session.host.commands.reservations.nexus_lost(session.nexus)
        log.info("%s: session ended (%s)", session.name, session.summary())

    # (task management reaches a session's Node; a discovery session never asks)
    def abort_tasks(self, lun: int | None, only: Session | None) -> None:
        for node in self.nodes.values():
            node.abort_tasks(lun, only)

    def reset_logical_units(self, lun: int | None) -> None:
        for node in self.nodes.values():
            node.reset_logical_units(lun)

    def reset(self) -> None:
        for s in list(self._connections):
            s.abort_connection()

    def others_logged_in(self, session: Session) -> bool:
        return any(s is not session and not s.discovery for s in self._sessions.values())

    def log_state(self) -> None:
        """One log line per connection with its windows and in-flight counts (SIGUSR1)."""
        log.info("state: %d connections, %d/%d transmit buffers free", len(self._connections),
                 self.pool.available, self.pool.count)  # fmt: skip
        for s in list(self._connections):
            log.info("state: %s", s.state_line())
        several = len(self.nodes) > 1
        for node in self.nodes.values():
            for lu in node.luns.values():
                span = lu.store.unsynced  # written since the last SYNCHRONIZE CACHE / FUA
                unsynced = "none" if span is None else f"bytes {span[0]}..{span[1]}"
                # ("state: LUN N ..." as before there were targets; with several, which one)
                log.info("state: LUN %d%s %s unsynced: %s", lu.number,
                         f" of {node.iqn}" if several else "", lu.store.name, unsynced)  # fmt: skip

    # -- for reload (SIGHUP) and metrics

    def sessions(self) -> list[Session]:
        """The session of every open connection, logged in or not."""
        return list(self._connections)

    def connection_task(self, session: Session) -> asyncio.Task[None] | None:
        """The task running ``session``'s connection (None once it ended)."""
        return self._connections.get(session)

    def add_store(self, store: Store) -> None:
        """A LUN's image opened after start: closed at shutdown with the others."""
        self._stores.append(store)

    def remove_store(self, store: Store) -> None:
        """Close the image of a LUN no session uses any more (the caller synced it, in a
        thread: a sync may wait for the device)."""
        self._stores.remove(store)
        store.close()

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
        bound = srv.getsockname()
        self.address = (bound[0], bound[1])
        for node in self.nodes.values():
            luns = ", ".join(
                f"{n}={lu.store.name} ({lu.store.kind}, {lu.store.size} bytes"
                f"{', ro' if lu.readonly else ''})"
                for n, lu in node.luns.items()
            )
            log.info(
                "listening on %s:%d as %s; LUNs: %s; backend %s, zero-copy probe %s",
                self.address[0], self.address[1], node.iqn, luns, self.config.backend,
                "on" if self.config.zerocopy_probe else "off",
            )  # fmt: skip
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
        tasks = list(self._connections.values())
        for s in list(self._connections):
            s.stop()
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
            if len(self._connections) >= self.config.max_connections:
                log.warning(
                    "%s: refused: %d connections already open", peer, len(self._connections)
                )
                conn.close()
                continue
            conn.setblocking(False)
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                tune_socket(conn, self.config.user_timeout)
                session = Session(self, conn, peer)
            except OSError as e:
                log.warning("%s: cannot set up connection: %s", peer, e)
                conn.close()
                continue
            log.info("%s: connection accepted", peer)
            if self.metrics is not None:
                self.metrics.attach(session)
            self._logging_in[session] = None
            self._connections[session] = session.start()
