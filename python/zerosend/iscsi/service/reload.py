"""SIGHUP: the config read again and applied to the running target.

What a reload changes: the targets, their LUNs, allow-lists, ACLs and CHAP (``RELOADABLE``).
The new settings are read and every new LUN opened first; anything wrong (a file that is not
TOML, an unknown key, an image that cannot be opened) refuses the whole reload with a logged
error, and the target keeps running on the settings it had. Other settings (listen address,
buffers, backend ...) take effect at the next start; a reload that changes them says so.

A session is left alone unless the change touches it (a change to one target leaves the
sessions of the others alone). It ends, with an Async Message that tells the initiator the
target drops the session, when:
- its target is removed (a target added serves new logins at once),
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

from ..scsi.acl import peer_address
from ..scsi.unit import LogicalUnit
from ..session.login import admits
from ..storage.opening import open_store
from ..storage.store import Store, StoreError
from ..wire import pdu as P
from .config import SETTINGS, TargetConfig, TargetSpec, load_config, numbered
from .target import Node, open_units

if TYPE_CHECKING:
    from ..session.connection import Session
    from .target import Target

log = logging.getLogger("zerosend.iscsi")

# (a new iqn is another target: the old one's sessions end, logins find the new one)
RELOADABLE = ("iqn", "luns", "chap", "mutual_chap", "allow", "acls", "discovery_chap", "target")
# A target's own settings, changed in place on its running Node (its sessions' login policy).
_TARGET_FIELDS = ("luns", "alias", "chap", "mutual_chap", "allow", "acls", "discovery_chap")
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


@dataclass
class Changes:
    """What a reload does to the targets: the LUN changes of those it keeps (by IQN), the
    units of those it adds, and the IQNs it removes."""

    kept: dict[str, LunChanges]
    added: dict[str, dict[int, LogicalUnit]]
    removed: list[str]

    def close_new(self) -> None:
        for units in [c.added for c in self.kept.values()] + list(self.added.values()):
            for lu in units.values():
                lu.store.close()


def _lun_changes(node: Node, new: TargetSpec) -> LunChanges:
    """Opens the target's new LUNs' images (closing them again if one fails)."""
    old, by_number = numbered(node.spec.luns), numbered(new.luns)
    gone = {n: node.luns[n] for n, spec in old.items() if by_number.get(n) != spec}
    added: dict[int, LogicalUnit] = {}
    try:
        for n, spec in by_number.items():
            if old.get(n) != spec:
                store = open_store(spec.path, spec.readonly, spec.mapped)
                added[n] = LogicalUnit(n, store, node.iqn, serial_text=spec.serial, wwn=spec.wwn)
    except (StoreError, OSError, ValueError):
        for lu in added.values():
            lu.store.close()
        raise
    return LunChanges(gone, added)


def _changes(target: Target, new: TargetConfig) -> Changes:
    """Opens every image the new settings add. Called in a thread: an open may wait for a
    device (the running config cannot change meanwhile: one reload at a time)."""
    changes = Changes({}, {}, [iqn for iqn in target.nodes if iqn not in
                               {spec.iqn for spec in new.targets()}])  # fmt: skip
    try:
        for spec in new.targets():
            node = target.nodes.get(spec.iqn)
            if node is not None:
                changes.kept[spec.iqn] = _lun_changes(node, spec)
            else:
                changes.added[spec.iqn] = open_units(spec)
    except (StoreError, OSError, ValueError):
        changes.close_new()
        raise
    return changes


def _why_ended(
    session: Session, old: TargetSpec, new: TargetSpec, gone: Mapping[int, LogicalUnit]
) -> str | None:
    """Why the new settings of the session's target end ``session``, or None if they leave it
    alone."""
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


def _admitting(specs: list[TargetSpec], session: Session) -> TargetSpec | None:
    """The target a discovery session authenticated as (the first that admits it)."""
    address = peer_address(session.peer)
    return next((t for t in specs if admits(t, session.initiator, address)), None)


def _why_session_ends(
    session: Session, target: Target, new: TargetConfig, changes: Changes
) -> str | None:
    old_specs = [node.spec for node in target.nodes.values()]
    new_specs = new.targets()
    if not session.logged_in:
        if _policy(old_specs) != _policy(new_specs):
            return "login in progress under the old allow-list, ACLs or CHAP"
        return None
    if session.discovery:
        before, after = _admitting(old_specs, session), _admitting(new_specs, session)
        if after is None:
            return f"no target admits initiator {session.initiator} any more"
        if before is None or before.iqn != after.iqn:
            return "it authenticated for a target that changed"
        return _why_ended(session, before, after, {})
    iqn = session.host.policy.iqn
    if iqn in changes.removed:
        return f"target {iqn} removed"
    spec = next(t for t in new_specs if t.iqn == iqn)
    return _why_ended(session, target.nodes[iqn].spec, spec, changes.kept[iqn].gone)


def _policy(specs: list[TargetSpec]) -> list[tuple[Any, ...]]:
    """What logins are judged by."""
    return [(t.iqn, t.allow, t.chap, t.mutual_chap, t.acls, t.discovery_chap) for t in specs]


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
                changes = await loop.run_in_executor(None, _changes, self.target, new)
            except (ValueError, StoreError, OSError) as e:
                log.error("reload refused, the running config is kept: %s", e)
                return False
            if self.target.stopping:  # (it began while the images were being opened)
                changes.close_new()
                return False
            await self._apply(new, changes)
            return True

    async def _apply(self, new: TargetConfig, changes: Changes) -> None:
        target = self.target
        old = target.config
        for s in SETTINGS:
            if s.key not in RELOADABLE and getattr(new, s.key) != getattr(old, s.key):
                log.warning("reload: %s changed; it takes effect at the next start", s.flag)
        ending = {}
        for session in target.sessions():
            why = _why_session_ends(session, target, new, changes)
            if why is not None:
                ending[session] = why
        policy_changed = _policy([n.spec for n in target.nodes.values()]) != _policy(new.targets())
        several = len(new.targets()) > 1 or len(target.nodes) > 1
        closing: list[Store] = []
        for iqn in changes.removed:
            gone = target.nodes[iqn]
            gone.removed = True  # no new logins; its sessions end below
            closing += [lu.store for lu in gone.luns.values()]
            log.info("reload: target %s removed", iqn)
        nodes: dict[str, Node] = {}
        for spec in new.targets():
            node = target.nodes.get(spec.iqn)
            if node is None:
                node = Node(target, spec, changes.added[spec.iqn])
                for lu in node.luns.values():
                    target.add_store(lu.store)
                log.info("reload: target %s added with %d LUNs", spec.iqn, len(node.luns))
            else:
                # The spec is the sessions' login policy: new logins see the new values.
                for key in _TARGET_FIELDS:
                    setattr(node.spec, key, getattr(spec, key))
                closing += self._apply_luns(node, changes.kept[spec.iqn], several)
            nodes[spec.iqn] = node
        target.nodes.clear()
        target.nodes.update(nodes)
        for key in RELOADABLE:
            setattr(old, key, getattr(new, key))
        old.target = [node.spec for node in nodes.values()]
        if policy_changed:
            log.info("reload: new logins see the new allow-list, ACLs and CHAP settings")
        for session, why in ending.items():
            log.info("%s: ending session: %s", session.name, why)
            _tell_dropped(session)
            session.abort_connection()
        log.info("reload done: %d targets, %d LUNs, %d sessions ended, %d kept", len(nodes),
                 sum(len(n.luns) for n in nodes.values()), len(ending),
                 len(target.sessions()) - len(ending))  # fmt: skip
        await self._close_when_unused(list(ending), closing)

    def _apply_luns(self, node: Node, changes: LunChanges, several: bool) -> list[Store]:
        """Changes a kept target's LUNs; returns the images to close once unused."""
        where = f"target {node.iqn} " if several else ""
        for n in changes.gone:
            del node.luns[n]
        node.luns.update(changes.added)
        node.measure(changes.added)
        # Reservations belong to the image served: a new or replaced LUN starts afresh.
        node.commands.reservations.luns_changed(changes.gone, changes.added)
        if changes.gone.keys() != changes.added.keys():  # the LUN inventory changed (SAM-5)
            node.commands.reservations.inventory_changed(
                [s.nexus for s in node.sessions() if s.logged_in and not s.discovery]
            )
        for n, lu in sorted(changes.added.items()):
            self.target.add_store(lu.store)
            log.info("reload: %sLUN %d is now %s (%s, %d bytes)", where, n, lu.store.name,
                     lu.store.kind, lu.store.size)  # fmt: skip
        for n, lu in sorted(changes.gone.items()):
            if n not in changes.added:
                log.info("reload: %sLUN %d (%s) removed", where, n, lu.store.name)
        return [lu.store for lu in changes.gone.values()]

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
