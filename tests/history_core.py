"""History checking for the send engine: what a random mix of sends and faults did, and whether
it kept the contract.

A workload (tests/test_history_core.py) records into a :class:`History` every send it submits
(which connection, where in that connection's stream it starts, how long, from which kind of
buffer), how each ended (resolved, failed, cancelled, never), every fault it injected, and what
each receiver read. :func:`check` then holds the record against the invariants:

* each receiver got exactly a prefix of what was submitted on its connection, in order: every
  8-byte word of a stream carries its connection and its own position (:func:`numbered`), so a
  send lost, reordered, duplicated or overwritten shows as the first word out of place;
* nothing after a failure: once a send on a connection failed, no later send there resolved;
* failures only where the workload caused one (a peer that reset); elsewhere every byte arrives;
* every send resolves or fails (the workload waits a generous bound, then records what hangs);
* buffers are not reused before their release: the workload overwrites a plain buffer with
  :data:`POISON_WORD` the moment its send resolves, and refills a pool buffer when the pool hands
  it out again; a receiver that reads poison or another send's bytes saw a reuse before release;
* progress: the workload records a violation when a healthy connection's send does not resolve
  while other peers stall.
"""

from __future__ import annotations

import array
import time
from dataclasses import dataclass, field

WORD = 8
#: A word holds (connection << CONN_SHIFT) + its position in the stream, counted in words.
CONN_SHIFT = 40
#: What a plain buffer is overwritten with once its send resolved.
POISON_WORD = 0xEEEE_EEEE_EEEE_EEEE
#: Events of a connection shown with a violation: those up to its first failure...
SHOWN_EVENTS = 25
#: ... and those after its first failure.
AFTER_EVENTS = 5


def numbered(conn: int, first_word: int, words: int) -> bytes:
    """``words`` words of connection ``conn``'s stream, starting at word ``first_word``."""
    base = (conn << CONN_SHIFT) + first_word
    return array.array("Q", range(base, base + words)).tobytes()


def poison(nbytes: int) -> bytes:
    return array.array("Q", [POISON_WORD]).tobytes() * (nbytes // WORD)


def describe_word(conn: int, value: int) -> str:
    reused = "a buffer overwritten after its send resolved: reused before release"
    if value == POISON_WORD:
        return f"poison ({reused})"
    if POISON_WORD & 0xFFFF_FFFF in (value >> 32, value & 0xFFFF_FFFF):
        return f"a word half poison {value:#018x} ({reused})"
    if value >> CONN_SHIFT == conn:
        return f"the word of stream offset {(value & ((1 << CONN_SHIFT) - 1)) * WORD}"
    if value >> CONN_SHIFT < 1 << 10:
        return f"a word of connection {value >> CONN_SHIFT}'s stream"
    return f"an unknown word {value:#018x}"


class StreamVerifier:
    """Checks a connection's received bytes as they arrive, word by word."""

    def __init__(self, conn: int) -> None:
        self.conn = conn
        self.received = 0
        self.eof = False
        #: (stream offset, word found there) of the first word out of place, if any.
        self.first_bad: tuple[int, int] | None = None
        self._words = 0
        self._tail = b""

    def feed(self, data: bytes | memoryview) -> None:
        self.received += len(data)
        if self.first_bad is not None:
            return
        buf = self._tail + bytes(data)
        whole = len(buf) // WORD
        got = array.array("Q")
        got.frombytes(buf[: whole * WORD])
        base = (self.conn << CONN_SHIFT) + self._words
        expected = array.array("Q", range(base, base + whole))
        if got != expected:
            at = next(i for i, (g, e) in enumerate(zip(got, expected, strict=True)) if g != e)
            self.first_bad = ((self._words + at) * WORD, got[at])
        self._words += whole
        self._tail = buf[whole * WORD :]


@dataclass
class Send:
    id: int
    conn: int
    offset: int
    nbytes: int
    kind: str
    #: pending, ok, error, cancelled
    outcome: str = "pending"
    detail: str = ""

    def __str__(self) -> str:
        span = f"stream bytes [{self.offset}, {self.offset + self.nbytes})"
        return f"send #{self.id} ({self.kind}, {self.nbytes} B, {span})"


@dataclass
class Conn:
    id: int
    sends: list[Send] = field(default_factory=list)
    next_offset: int = 0
    #: The peer reset the connection at some point: failures from then on are allowed.
    reset: bool = False
    verifier: StreamVerifier | None = None
    #: Counters of the wrapper, read as it was closed (None if it was dropped instead).
    final_stats: dict[str, int] | None = None


class History:
    """The record of one round: sends, outcomes, faults, and violations found while running."""

    def __init__(self, backend: str, seed: int) -> None:
        self.backend = backend
        self.seed = seed
        self.conns: dict[int, Conn] = {}
        self.events: list[tuple[float, int | None, str]] = []
        self.violations: list[tuple[int | None, str]] = []
        self._t0 = time.monotonic()
        self._next_send = 0

    def conn(self, conn: int, verifier: StreamVerifier) -> Conn:
        self.conns[conn] = Conn(conn, verifier=verifier)
        self.log(conn, "connected")
        return self.conns[conn]

    def log(self, conn: int | None, what: str) -> None:
        self.events.append((time.monotonic() - self._t0, conn, what))

    def submit(self, conn: int, nbytes: int, kind: str) -> Send:
        """A send handed to ``send_zc`` (call it once the call returned, so a refused call
        leaves no record and takes no stream offset)."""
        model = self.conns[conn]
        send = Send(self._next_send, conn, model.next_offset, nbytes, kind)
        self._next_send += 1
        model.next_offset += nbytes
        model.sends.append(send)
        self.log(conn, f"submit {send}")
        return send

    def complete(self, send: Send, outcome: str, detail: str = "") -> None:
        send.outcome, send.detail = outcome, detail
        self.log(send.conn, f"{outcome} #{send.id}" + (f": {detail}" if detail else ""))

    def violation(self, conn: int | None, what: str) -> None:
        self.violations.append((conn, what))
        self.log(conn, f"VIOLATION {what}")

    def trace(self, conn: int) -> list[str]:
        """The connection's events (and the global ones) that led to its first failure or
        violation, and a few after it; its latest ones if it has none."""
        mine = [(t, what) for t, c, what in self.events if c in (conn, None)]
        first = next(
            (i for i, (_, what) in enumerate(mine) if what.startswith(("error ", "VIOLATION"))),
            len(mine) - 1,
        )
        shown = mine[max(0, first + 1 - SHOWN_EVENTS) : first + 1 + AFTER_EVENTS]
        return [f"    {t:8.3f}s  {what}" for t, what in shown]


def _send_at(conn: Conn, offset: int) -> str:
    for send in conn.sends:
        if send.offset <= offset < send.offset + send.nbytes:
            return f"inside {send}, outcome {send.outcome}"
    return "past everything submitted"


def check(history: History, zero_copy: bool) -> list[tuple[int | None, str]]:
    """The violations of the recorded round, each with the connection it concerns."""
    found = list(history.violations)
    for conn in history.conns.values():
        c = conn.id
        verifier = conn.verifier
        assert verifier is not None
        if verifier.first_bad is not None:
            offset, value = verifier.first_bad
            found.append(
                (c, f"conn {c}: the receiver read {describe_word(c, value)} at stream offset "
                    f"{offset} ({_send_at(conn, offset)}): not a prefix of what was submitted")
            )  # fmt: skip
        failed = [s for s in conn.sends if s.outcome == "error"]
        hung = [s for s in conn.sends if s.outcome == "pending"]
        for send in hung:
            found.append((c, f"conn {c}: {send} never resolved nor failed"))
        if failed:
            first = failed[0]
            if not conn.reset:
                found.append(
                    (c, f"conn {c}: {first} failed ({first.detail}) though its peer never "
                        "reset: a failure the workload did not cause")
                )  # fmt: skip
            for later in conn.sends[conn.sends.index(first) + 1 :]:
                if later.outcome == "ok":
                    found.append(
                        (c, f"conn {c}: {later} resolved after {first} failed "
                            "(a hole in the stream)")
                    )  # fmt: skip
                    break
            end = first.offset + first.nbytes
            if verifier.received > end:
                found.append(
                    (c, f"conn {c}: the receiver read {verifier.received} B, past the end ({end})"
                        f" of {first}, the first failed send")
                )  # fmt: skip
        elif not conn.reset and not hung:
            if verifier.received != conn.next_offset:
                found.append(
                    (c, f"conn {c}: the receiver read {verifier.received} B of "
                        f"{conn.next_offset} submitted, none failed "
                        f"({_send_at(conn, verifier.received)} is where it stopped)")
                )  # fmt: skip
            if not verifier.eof:
                found.append((c, f"conn {c}: the receiver never saw the end of the stream"))
            stats = conn.final_stats
            if stats is not None and conn.next_offset:
                found.extend((c, f"conn {c}: {p}") for p in stats_problems(stats, conn, zero_copy))
    return found


def stats_problems(stats: dict[str, int], conn: Conn, zero_copy: bool) -> list[str]:
    """Every byte of a connection that ended well went the zero-copy way (the rig's veth copies
    at delivery: ``bytes_copied_by_kernel``), or by the copy backend."""
    total = conn.next_offset
    if not zero_copy:
        if stats["bytes_copied_backend"] != total:
            return [f"copy backend sent {stats['bytes_copied_backend']} B of {total}: {stats}"]
        return []
    went = stats["bytes_zerocopy"] + stats["bytes_copied_by_kernel"]
    problems = []
    if went != total:
        problems.append(f"{went} B of {total} went the zero-copy path: {stats}")
    if stats["bytes_copied_below_threshold"] or stats["bytes_copied_backend"]:
        problems.append(f"bytes copied by zerosend with zerocopy_threshold=0: {stats}")
    return problems


def report(history: History, found: list[tuple[int | None, str]], replay: str) -> str:
    """A readable failure: the violations, the recent history of each connection concerned,
    and the command that replays the round."""
    lines = [
        f"history check failed: backend {history.backend}, round seed {history.seed}, "
        f"{sum(len(c.sends) for c in history.conns.values())} sends on "
        f"{len(history.conns)} connections; {len(found)} violation(s):"
    ]
    lines += [f"  - {what}" for _, what in found]
    for conn in sorted({c for c, _ in found if c is not None}):
        lines.append(f"  history of conn {conn} up to its first failure, with global faults:")
        lines += history.trace(conn)
    lines.append(f"replay: {replay}")
    return "\n".join(lines)
