"""SIGHUP: the config read again and applied to the running target.

What a reload changes: the LUNs, the allow-list and CHAP (``RELOADABLE``). The new settings are
read and every new LUN opened first; anything wrong (a file that is not TOML, an unknown key, an
image that cannot be opened) refuses the whole reload with a logged error, and the target keeps
running on the settings it had. Other settings (listen address, buffers, backend ...) take
effect at the next start; a reload that changes them says so.

A session is left alone unless the change touches it. It ends, with an Async Message that tells
the initiator the target drops the session, when:
- it addressed a LUN that the reload removes or replaces (LUNs are numbered by position: a LUN
  whose path or options change is a different LUN),
- the new allow-list does not admit its initiator,
- CHAP changed and it logged in without the new credentials (without CHAP, or under old ones),
- it had not finished its login and the allow-list or CHAP changed (it logs in again under the
  new rules).
A removed LUN's image is synced and closed once the sessions that used it have ended; disk
work still under way on it (a queued write of an ended session, an EXTENDED COPY of another
session) finishes first, and what would start later fails. Opening the new images and syncing
the removed ones may wait for a device: both run in threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..scsi.unit import LogicalUnit
from ..storage.opening import open_store
from ..storage.store import Store, StoreError
from ..wire import pdu as P
from .config import SETTINGS, LunSpec, TargetConfig, load_config, numbered

if TYPE_CHECKING:
    from ..session.connection import Session
    from .target import Target

log = logging.getLogger("zerosend.iscsi")

RELOADABLE = ("luns", "chap", "mutual_chap", "allow", "acls", "discovery_chap")
# How long the sessions a reload ends may take to drain before their LUNs' images are closed.
DRAIN_TIMEOUT = 15.0
# What the Async Message tells the initiator (RFC 7143 11.9.1): wait this long before logging in
# again; nothing of the session is kept for it (ErrorRecoveryLevel 0).
TIME2WAIT = 2


@dataclass
class LunChanges:
    """The LUN numbers a reload takes away (removed or replaced) and the units it adds."""

    gone: dict[int, LogicalUnit]
    added: dict[int, LogicalUnit]


def _lun_changes(target: Target, new: list[LunSpec]) -> LunChanges:
    """Opens the new LUNs' images (closing them again if one fails). Called in a thread: an
    open may wait for a device (the running config cannot change meanwhile: one reload at a
    time)."""
    old, by_number = numbered(target.config.luns), numbered(new)
    gone = {n: target.luns[n] for n, spec in old.items() if by_number.get(n) != spec}
    added: dict[int, LogicalUnit] = {}
    try:
        for n, spec in by_number.items():
            if old.get(n) != spec:
                store = open_store(spec.path, spec.readonly, spec.mapped)
                added[n] = LogicalUnit(n, store, target.iqn, serial_text=spec.serial, wwn=spec.wwn)
    except (StoreError, OSError, ValueError):
        for lu in added.values():
            lu.store.close()
        raise
    return LunChanges(gone, added)


def _why_ended(
    session: Session, old: TargetConfig, new: TargetConfig, gone: Mapping[int, LogicalUnit]
) -> str | None:
    """Why the new settings end ``session``, or None if they leave it alone."""
    policy_changed = _policy(new) != _policy(old)
    if not session.logged_in:
        return "login in progress under the old allow-list or CHAP" if policy_changed else None
    if new.allow and session.initiator not in new.allow:
        return f"initiator {session.initiator} is no longer on the allow-list"
    if new.chap is not None and new.chap != old.chap:
        return "CHAP credentials changed"
    if new.acl_for(session.initiator) != old.acl_for(session.initiator):
        return "its ACL changed"  # (its LUNs, their access, its address or CHAP)
    if session.discovery and new.discovery_chap != old.discovery_chap:
        return "discovery CHAP changed"
    if not session.discovery:
        used = sorted(session.luns_in_use() & gone.keys())
        if used:
            return f"LUN {', '.join(map(str, used))} removed or replaced"
    return None


def _policy(cfg: TargetConfig) -> tuple[Any, ...]:
    """What logins are judged by."""
    return cfg.allow, cfg.chap, cfg.acls, cfg.discovery_chap


def _tell_dropped(session: Session) -> None:
    """Queue an Async Message "the target drops all connections of this session"; the
    connection's close then sends it ahead of the FIN."""
    if session.logged_in and not session.closing:
        session.responder.send_pdu(P.async_drop_session(TIME2WAIT, 0))


class Reloader:
    """Re-reads the settings on request (``request()``, from the SIGHUP handler); one reload at
    a time, in order."""

    def __init__(self, target: Target, options: Mapping[str, Any], path: str | None) -> None:
        self.target = target
        self.options = options
        self.path = path
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[bool]] = set()

    def request(self) -> asyncio.Task[bool]:
        task = asyncio.get_running_loop().create_task(self.reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def reload(self) -> bool:
        """Apply the settings as they are now; False if refused (the old ones stay)."""
        async with self._lock:
            if self.target.stopping:
                return False
            where = self.path or "the command line"
            log.info("reload: reading %s", where)
            loop = asyncio.get_running_loop()
            try:
                new = await loop.run_in_executor(None, load_config, self.options, self.path)
                changes = await loop.run_in_executor(None, _lun_changes, self.target, new.luns)
            except (ValueError, StoreError, OSError) as e:
                log.error("reload refused, the running config is kept: %s", e)
                return False
            if self.target.stopping:  # (it began while the images were being opened)
                for lu in changes.added.values():
                    lu.store.close()
                return False
            await self._apply(new, changes)
            return True

    async def _apply(self, new: TargetConfig, changes: LunChanges) -> None:
        target = self.target
        old = target.config
        for s in SETTINGS:
            if s.key not in RELOADABLE and getattr(new, s.key) != getattr(old, s.key):
                log.warning("reload: %s changed; it takes effect at the next start", s.flag)
        ending = {}
        for session in target.sessions():
            why = _why_ended(session, old, new, changes.gone)
            if why is not None:
                ending[session] = why
        policy_changed = _policy(new) != _policy(old)
        # The config object is the sessions' login policy: new logins see the new values.
        for key in RELOADABLE:
            setattr(old, key, getattr(new, key))
        for n in changes.gone:
            del target.luns[n]
        target.luns.update(changes.added)
        # Reservations belong to the image served: a new or replaced LUN starts afresh.
        target.commands.reservations.luns_changed(changes.gone, changes.added)
        if changes.gone.keys() != changes.added.keys():  # the LUN inventory changed (SAM-5)
            target.commands.reservations.inventory_changed(
                [s.nexus for s in target.sessions() if s.logged_in and not s.discovery]
            )
        for n, lu in sorted(changes.added.items()):
            target.add_store(lu.store)
            log.info("reload: LUN %d is now %s (%s, %d bytes)", n, lu.store.name, lu.store.kind,
                     lu.store.size)  # fmt: skip
        for n, lu in sorted(changes.gone.items()):
            if n not in changes.added:
                log.info("reload: LUN %d (%s) removed", n, lu.store.name)
        if policy_changed:
            log.info("reload: new logins see the new allow-list and CHAP settings")
        for session, why in ending.items():
            log.info("%s: ending session: %s", session.name, why)
            _tell_dropped(session)
            session.abort_connection()
        log.info("reload done: %d LUNs, %d sessions ended, %d kept", len(target.luns),
                 len(ending), len(target.sessions()) - len(ending))  # fmt: skip
        await self._close_when_unused(list(ending), [lu.store for lu in changes.gone.values()])

    async def _close_when_unused(self, ended: list[Session], stores: list[Store]) -> None:
        """Close the removed LUNs' images once the sessions that used them are gone (their
        in-flight sends may still point into a mapped image)."""
        if not stores:
            return
        waits = [t for s in ended if (t := self.target.connection_task(s)) is not None]
        if waits:
            _, late = await asyncio.wait(waits, timeout=DRAIN_TIMEOUT)
            if late:
                log.warning("reload: %d ended sessions still draining; the removed LUNs' images "
                            "stay open until shutdown", len(late))  # fmt: skip
                return
        loop = asyncio.get_running_loop()
        for store in stores:
            # The last sync of the image, in a thread: the device may be slow or stuck
            sync = loop.run_in_executor(None, _sync, store)
            done, _ = await asyncio.wait([sync], timeout=DRAIN_TIMEOUT)
            if not done:
                log.warning("reload: the sync of removed LUN image %s still waits for its device; "
                            "it stays open until shutdown", store.name)  # fmt: skip
                continue
            self.target.remove_store(store)
            log.info("reload: %s closes once its I/O under way is done", store.name)


def _sync(store: Store) -> None:
    try:
        store.flush()
    except OSError as e:
        log.error("reload: the sync of removed LUN image %s failed: %s", store.name, e)
