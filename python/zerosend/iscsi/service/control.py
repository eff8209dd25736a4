"""The control socket: a local AF_UNIX stream socket (mode 0600: its owner, and root, only)
that answers ``show`` with the target's live state as JSON, for ``zerosend-iscsi show`` (as
``tgtadm --op show`` and ``targetcli ls``). Served on the target's event loop, so the state is
read between two steps of the loop, never while one changes it. Read-only: it changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
from typing import TYPE_CHECKING, Any

import zerosend

from .config import numbered

if TYPE_CHECKING:
    from .target import Node, Target

log = logging.getLogger("zerosend.iscsi")

REQUEST_TIMEOUT = 10.0
MAX_CLIENTS = 4


def _node_state(node: Node) -> dict[str, Any]:
    """One target's LUNs and ACLs."""
    specs = numbered(node.spec.luns)
    units = node.commands.reservations.units
    luns = []
    for number, lu in sorted(node.luns.items()):
        spec = specs.get(number)
        unit = units.get(number)
        luns.append({
            "lun": number, "path": lu.store.name, "kind": lu.store.kind,
            "size": lu.store.size, "readonly": lu.readonly,
            "serial": lu.serial.decode(errors="replace"), "naa": lu.naa.hex(),
            "mapped": bool(spec and spec.mapped),
            "reservations": unit.describe() if unit is not None else "",
        })  # fmt: skip
    return {
        "iqn": node.iqn,
        "alias": node.spec.alias,
        "luns": luns,
        "acls": [
            {
                "initiator": a.initiator,
                "luns": sorted(a.luns) if a.luns is not None else "all",
                "readonly_luns": sorted(a.readonly_luns),
                "readonly": a.readonly,
                "addresses": [str(n) for n in a.addresses],
                "chap_user": a.chap.user if a.chap else None,
            }  # never the secret
            for a in node.spec.acls
        ],
    }


def state(target: Target) -> dict[str, Any]:
    """The target's live state as plain data: every target (IQN) with its LUNs and ACLs, and
    the first one's also at the top level (as when there was one)."""
    cfg = target.config
    sessions = []
    for s in target.sessions():
        acl = s.luns.acl
        normal = s.logged_in and not s.discovery
        sessions.append({
            "name": s.name, "peer": s.peer, "initiator": s.initiator,
            "target": s.host.policy.iqn if normal else "",
            "isid": s.nexus.isid.hex() if s.logged_in else "",
            "type": ("discovery" if s.discovery else "normal") if s.logged_in else "login",
            "luns": sorted(s.luns) if acl is not None else "all",
            "luns_in_use": sorted(s.luns_in_use()),
            "commands_in_flight": len(s.reads) + len(s.writes),
            "state": s.state_line(), "counters": s.summary(),
        })  # fmt: skip
    targets = [_node_state(node) for node in target.nodes.values()]
    return {
        "version": zerosend.__version__,
        "iqn": targets[0]["iqn"],
        "listen": f"{target.address[0]}:{target.address[1]}" if target.address else cfg.listen,
        "connections": len(sessions),
        "transmit_buffers": {"count": target.pool.count, "free": target.pool.available},
        "luns": targets[0]["luns"],
        "acls": targets[0]["acls"],
        "targets": targets,
        "sessions": sessions,
    }


class ControlServer:
    def __init__(self, target: Target) -> None:
        self.target = target
        self.path = ""
        self._server: asyncio.AbstractServer | None = None
        self._clients = 0

    async def start(self, path: str) -> None:
        _remove_stale(path)
        old = os.umask(0o177)  # created 0600: no window in which others could connect
        try:
            self._server = await asyncio.start_unix_server(self._handle, path)
        except OSError as e:
            raise OSError(e.errno, f"cannot create control socket {path}: {e.strerror}") from e
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.path = path
        log.info("control socket %s (zerosend-iscsi show --control-socket %s)", path, path)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            try:
                os.unlink(self.path)
            except OSError:
                pass

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self._clients >= MAX_CLIENTS:
                writer.write(b'{"error": "busy"}\n')
                return
            self._clients += 1
            try:
                line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT)
                command = line.decode(errors="replace").strip()
                if command == "show":
                    answer: dict[str, Any] = state(self.target)
                else:
                    answer = {"error": f"unknown command {command[:40]!r}; known: show"}
                writer.write(json.dumps(answer).encode() + b"\n")
                await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
            finally:
                self._clients -= 1
        except (TimeoutError, OSError, ValueError):
            pass  # a client that went away or never asked
        except asyncio.CancelledError:
            pass  # the target is stopping
        finally:
            writer.close()


def _remove_stale(path: str) -> None:
    """A socket left by a target that is gone is removed; anything else at ``path`` (a live
    target's socket, a file) is an error, not something to delete."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ValueError(f"control socket {path}: a file that is not a socket is in the way")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: stale
        return
    finally:
        probe.close()
    raise ValueError(f"control socket {path}: another target is serving it")


def request(path: str, command: str = "show", timeout: float = REQUEST_TIMEOUT) -> dict[str, Any]:
    """Ask the target at ``path``; its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(command.encode() + b"\n")
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    answer: dict[str, Any] = json.loads(data)
    return answer


def _render_target(t: dict[str, Any], out: list[str], indent: str) -> None:
    out.append(f"{indent}LUNs: {len(t['luns'])}")
    for lu in t["luns"]:
        access = "ro" if lu["readonly"] else "rw"
        out.append(f"{indent}  LUN {lu['lun']}: {lu['path']} ({lu['kind']}, {lu['size']} bytes, "
                   f"{access}) serial {lu['serial']} naa.{lu['naa']}")  # fmt: skip
        out.append(f"{indent}    reservations: {lu['reservations']}")
    if t["acls"]:
        out.append(f"{indent}ACLs: {len(t['acls'])}")
        for a in t["acls"]:
            out.append(f"{indent}  {a['initiator']}: LUNs {a['luns']}, read-only "
                       f"{a['readonly_luns']}{' (all)' if a['readonly'] else ''}, from "
                       f"{a['addresses'] or 'anywhere'}, CHAP user "
                       f"{a['chap_user'] or '(target-wide)'}")  # fmt: skip


def render(st: dict[str, Any]) -> str:
    """The state as ``zerosend-iscsi show`` prints it."""
    targets = st.get("targets") or [st]
    head = st["iqn"] if len(targets) == 1 else f"daemon with {len(targets)} targets"
    out = [
        f"Target {head} on {st['listen']} (zerosend {st['version']})",
        f"  transmit buffers: {st['transmit_buffers']['free']}/{st['transmit_buffers']['count']}"
        " free",
    ]
    if len(targets) == 1:
        _render_target(targets[0], out, "  ")
    else:
        for t in targets:
            alias = f" ({t['alias']})" if t["alias"] else ""
            out.append(f"  Target {t['iqn']}{alias}")
            _render_target(t, out, "    ")
    out.append(f"  Connections: {st['connections']}")
    for s in st["sessions"]:
        to = f" to {s['target']}" if s.get("target") and len(targets) > 1 else ""
        out.append(f"    {s['name']} ({s['type']}){to} ISID {s['isid'] or '-'} LUNs {s['luns']}, "
                   f"in use {s['luns_in_use']}, "
                   f"commands in flight {s['commands_in_flight']}")  # fmt: skip
        out.append(f"      {s['counters']}")
    return "\n".join(out) + "\n"
