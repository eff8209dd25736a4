"""The measuring rig: a receiver in its own network namespace behind a veth pair.

On one machine, loopback delivers a zero-copy send by copying it at once, on the sending CPU.
Behind a veth pair with RPS steering the receive work to another CPU, the deferred copy happens
later and elsewhere, as a NIC would release pages later: a buffer reused before its release
shows up as corrupt bytes at the receiver, and the sender's CPU cost per byte becomes visible.

More topologies built on it (needs nftables and tc; measured on Linux 6.18):

* the *ingress-drop window* (``Rig.ingress_drop()``): an nftables netdev ingress drop on the
  peer's interface inside its namespace. A TCP send is then fully accepted (``TIOCOUTQ`` equals
  its length) yet never acknowledged, so never released, for as long as the rule stands: the
  window that tells "resolved at release" from "resolved at acceptance". UDP datagrams that fit
  the MTU (or use ``UDP_SEGMENT``) are freed there without a copy.
* *true zero-copy* (``IfbSink``): UDP out of an ``ifb`` device with MTU 65535. The device frees
  every packet it is handed, so the kernel never copies: ``zerocopy=True`` comes back.
* *releases out of order* (``Rig.hold_egress()``): a token bucket on the host's end holds a
  few datagrams and drops the rest at once, so later sends are released before earlier ones.

Needs root and iproute2. Addresses are 10.x on devices this module creates and removes.
A receiver inside the namespace: ``bench.harness.receiver.start_receiver(rig.peer_addr, port,
namespace=rig.ns)``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from types import TracebackType
from typing import Self

#: ``setsockopt(IPPROTO_UDP, UDP_SEGMENT, size)``: one send leaves as datagrams of ``size``.
UDP_SEGMENT = 103


def rig_unavailable_reason() -> str | None:
    """Why the rig cannot be built here, or None if it can."""
    if os.geteuid() != 0:
        return "the rig needs root (network namespaces and veth)"
    if shutil.which("ip") is None:
        return "the rig needs iproute2's ip command"
    probe = f"zsprobe{os.getpid()}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return f"cannot create a network namespace: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")


def in_namespace(ns: str | None, argv: list[str]) -> list[str]:
    """``argv`` prefixed to run inside network namespace ``ns`` (as it is if ``ns`` is None)."""
    return ["ip", "netns", "exec", ns, *argv] if ns else argv


def _nft(script: str, ns: str | None = None) -> None:
    if shutil.which("nft") is None:
        raise RuntimeError("nftables' nft command is missing (scripts/install-system-deps.sh)")
    argv = in_namespace(ns, ["nft", "-f", "-"])
    done = subprocess.run(argv, input=script, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"nft failed: {done.stderr.strip()}")


def _nft_packets(family: str, table: str, ns: str | None = None) -> int:
    """Packets counted by the ``counter`` statements of an nftables table."""
    done = subprocess.run(
        in_namespace(ns, ["nft", "-j", "list", "table", family, table]),
        capture_output=True,
        text=True,
        check=True,
    )
    total = 0
    for item in json.loads(done.stdout)["nftables"]:
        for statement in item.get("rule", {}).get("expr", []):
            if "counter" in statement:
                total += statement["counter"]["packets"]
    return total


def _free_subnet(prefix: str) -> int:
    """A random ``prefix.N.0/24`` (N in 1..249) that no address of this namespace is in: a rig
    left behind by a killed run, or another run's, keeps its subnet, and a second veth in the
    same subnet would take the first one's packets."""
    done = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True)
    used = set()
    for word in done.stdout.split():
        if word.startswith(prefix + "."):
            used.add(int(word.split(".")[2]))
    free = [n for n in range(1, 250) if n not in used]
    if not free:
        raise RuntimeError(f"every {prefix}.N.0/24 subnet is in use (rigs left behind?)")
    return random.choice(free)


def _mac(netns: list[str], interface: str) -> str:
    done = subprocess.run(
        ["ip", *netns, "-o", "link", "show", interface], capture_output=True, text=True, check=True
    )
    fields = done.stdout.split()
    return fields[fields.index("link/ether") + 1]


class _Built:
    """System state built on entering a ``with`` block and torn down (``close()``) on leaving
    it, also when building failed half-way."""

    def _build(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class IngressDrop(_Built):
    """An nftables netdev ingress drop on ``interface`` inside namespace ``ns`` (a context
    manager). Lifting it (leaving the block) lets TCP's next retransmission through.
    ``dropped`` holds the number of packets the rule dropped, read as it was lifted."""

    def __init__(self, ns: str, interface: str) -> None:
        self._ns = ns
        self._table = f"zerosend_drop_{interface}"
        self._interface = interface
        self.dropped = 0
        self._active = False

    def _build(self) -> None:
        hook = f'type filter hook ingress device "{self._interface}" priority 0;'
        _nft(
            f"table netdev {self._table} {{\n  chain ingress {{\n    {hook}\n"
            "    counter drop\n  }\n}\n",
            self._ns,
        )
        self._active = True

    def packets(self) -> int:
        """Packets dropped so far."""
        return _nft_packets("netdev", self._table, self._ns) if self._active else self.dropped

    def close(self) -> None:
        """Lift the rule (idempotent): packets reach the peer again."""
        if not self._active:
            return
        try:
            self.dropped = self.packets()
        finally:
            self._active = False
            _nft(f"delete table netdev {self._table}\n", self._ns)


class IfbSink(_Built):
    """True zero-copy for UDP: an ``ifb`` device, MTU 65535, that frees whatever is sent out of
    it without copying (an ifb only forwards what tc redirected to it). Send datagrams (up to
    65507 bytes) to ``sink_addr``; ``dropped()`` counts the packets the device discarded."""

    def __init__(self) -> None:
        self.interface = f"zsifb{os.getpid() % 100000}{random.randrange(100)}"
        subnet = _free_subnet("10.232")
        self.local_addr = f"10.232.{subnet}.1"
        self.sink_addr = f"10.232.{subnet}.2"

    def _build(self) -> None:
        _ip("link", "add", self.interface, "type", "ifb")
        _ip("link", "set", self.interface, "mtu", "65535", "up")
        _ip("addr", "add", f"{self.local_addr}/24", "dev", self.interface)

    def dropped(self) -> int:
        """Packets the device received for sending and discarded."""
        path = f"/sys/class/net/{self.interface}/statistics/rx_dropped"
        with open(path) as counter:
            return int(counter.read())

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", self.interface], capture_output=True)


class Rig(_Built):
    """A namespace ``ns`` reachable at ``peer_addr`` from ``host_addr`` over a veth pair."""

    def __init__(self, rps_cpu: int = 1) -> None:
        tag = f"{os.getpid() % 100000}{random.randrange(100)}"
        self.ns = f"zsrig{tag}"
        self.host_if = f"zsh{tag}"
        self.peer_if = f"zsp{tag}"
        subnet = _free_subnet("10.231")
        self.host_addr = f"10.231.{subnet}.1"
        self.peer_addr = f"10.231.{subnet}.2"
        self.rps_cpu = rps_cpu
        self.nft_table: str | None = None

    def _build(self) -> None:
        _ip("netns", "add", self.ns)
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if)
        _ip("link", "set", self.peer_if, "netns", self.ns)
        _ip("addr", "add", f"{self.host_addr}/24", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        _ip("-n", self.ns, "addr", "add", f"{self.peer_addr}/24", "dev", self.peer_if)
        _ip("-n", self.ns, "link", "set", self.peer_if, "up")
        _ip("-n", self.ns, "link", "set", "lo", "up")
        # Static neighbours: no ARP round trip to delay the first packets of a test.
        host_mac = _mac([], self.host_if)
        peer_mac = _mac(["-n", self.ns], self.peer_if)
        _ip("neigh", "replace", self.peer_addr, "lladdr", peer_mac, "dev", self.host_if,
            "nud", "permanent")  # fmt: skip
        _ip("-n", self.ns, "neigh", "replace", self.host_addr, "lladdr", host_mac,
            "dev", self.peer_if, "nud", "permanent")  # fmt: skip
        if os.cpu_count() and os.cpu_count() > self.rps_cpu:  # type: ignore[operator]
            mask = format(1 << self.rps_cpu, "x")
            path = f"/sys/class/net/{self.peer_if}/queues/rx-0/rps_cpus"
            subprocess.run(
                ["ip", "netns", "exec", self.ns, "sh", "-c", f"echo {mask} > {path}"],
                check=True,
                capture_output=True,
            )

    def drop_packets(self, percent: int) -> None:
        """Drop ``percent``% of the packets the host sends into the rig, so TCP retransmits:
        release notifications then come late (and MSG_ZEROCOPY's ranges coalesced)."""
        self.add_output_rule(f"numgen random mod 100 < {percent} drop")

    def hold_egress(self, rate: str = "100kbit", queue_bytes: int = 3000) -> None:
        """A token-bucket qdisc on the host's end of the pair: packets leave at ``rate``, at
        most ``queue_bytes`` wait, the rest are dropped at once. A dropped datagram is freed
        while earlier ones still wait, so its release comes first: out of order."""
        done = subprocess.run(
            ["tc", "qdisc", "add", "dev", self.host_if, "root", "tbf", "rate", rate,
             "burst", "1600", "limit", str(queue_bytes)],
            capture_output=True,
            text=True,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"tc qdisc add ... tbf failed: {done.stderr.strip()}")

    def add_output_rule(self, rule: str) -> None:
        """Add an nftables rule (e.g. ``udp length 1008 drop``) for packets the host sends into
        the rig; removed with the rig. A ``counter`` goes before the verdict, so
        ``output_rule_packets()`` tells how many packets the rules matched."""
        table = f"zerosend_{self.ns}"
        if self.nft_table is None:
            chain = "type filter hook output priority 0; policy accept;"
            _nft(f"table inet {table} {{\n  chain out {{\n    {chain}\n  }}\n}}\n")
            self.nft_table = table
        *match, verdict = rule.split()
        body = " ".join([*match, "counter", verdict])
        _nft(f'add rule inet {table} out oifname "{self.host_if}" {body}\n')

    def output_rule_packets(self) -> int:
        """Packets matched so far by the rules of ``add_output_rule``/``drop_packets``."""
        if self.nft_table is None:
            return 0
        return _nft_packets("inet", self.nft_table)

    def ingress_drop(self) -> IngressDrop:
        """The ingress-drop window: while the returned context is entered, every packet that
        reaches the peer's interface is dropped before the peer's stack sees it."""
        return IngressDrop(self.ns, self.peer_if)

    def close(self) -> None:
        if self.nft_table is not None:
            subprocess.run(["nft", "delete", "table", "inet", self.nft_table], capture_output=True)
            self.nft_table = None
        # The namespace goes with its netdev tables (the ingress drop) and the veth pair.
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` prefixed to run inside the namespace."""
        return in_namespace(self.ns, argv)
