"""The record, filled by many threads, and the invariants checked on it afterwards."""

from __future__ import annotations

import bisect
import itertools
import math
import threading
import time
from collections import defaultdict
from collections.abc import Iterable

from .record import Epoch, Op, PrState
from .values import GOOD, HUNG, RESERVATION_CONFLICT, UNKNOWN, ZERO, Value, show


class History:
    """The record, filled by many threads; ``check()`` returns the violations found."""

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.epochs: list[Epoch] = []
        self.pr: list[PrState] = []
        self.events: list[tuple[float, str]] = []
        # (epoch, when, what a device held as durable then, after what)
        self.snapshots: list[tuple[int, float, dict[tuple[int, int], Value], str]] = []
        self.lock = threading.Lock()
        self._seq = itertools.count(1)
        self.disks: dict[int, str] = {}  # disk number -> its description
        self.volatile: set[int] = set()  # disks that start empty in every epoch (mem:)
        # What the checks looked at (a check that looked at nothing proves nothing)
        self.checked = {"blocks read": 0, "blocks after a kill": 0, "synced writes": 0,
                        "commands under a known reservation state": 0,
                        "blocks of a device after a sync": 0}  # fmt: skip

    def begin(self, initiator: str, name: str, lun: int, epoch: int, **kw: object) -> Op:
        op = Op(initiator, next(self._seq), name, lun, epoch=epoch, **kw)  # type: ignore[arg-type]
        op.invoked = time.monotonic()
        with self.lock:
            self.ops.append(op)
        return op

    def event(self, what: str) -> None:
        with self.lock:
            self.events.append((time.monotonic(), what))

    # -- the checks

    def check(self) -> list[str]:
        out: list[str] = []
        out += self.check_reads()
        out += self.check_no_return()
        out += self.check_durability()
        out += self.check_compare_and_write()
        out += self.check_reservations()
        out += self.check_liveness()
        return out

    def _index(self) -> None:
        """Per block, its writes; and for the supersede test, the GOOD writes (all of them,
        and the durable ones) sorted by completion with the running maximum of their issue."""
        self._by_block: dict[int, dict[tuple[int, int], list[Op]]] = defaultdict(
            lambda: defaultdict(list)
        )
        # Per block, the writes that may have left a given value there (copies may have left
        # any): a read is explained by looking at those only, not at every write of its block
        # (a long soak has thousands per block).
        self._producers: dict[tuple[int, int, int], dict[Value, list[Op]]] = defaultdict(
            lambda: defaultdict(list)
        )
        self._copies: dict[tuple[int, int, int], list[Op]] = defaultdict(list)
        last_sync: dict[tuple[int, int], float] = {}
        for op in self.ops:
            if op.name.startswith("SYNC") and op.good:
                at = (op.epoch, op.writes_disks[0])
                last_sync[at] = max(last_sync.get(at, -math.inf), op.invoked)
            for key, value in op.writes.items():
                self._by_block[op.epoch][key].append(op)
                if value is None:
                    self._copies[(op.epoch, *key)].append(op)
                else:
                    self._producers[(op.epoch, *key)][value].append(op)
        self._durable_ops = {
            id(w) for w in self.ops if w.good and (
                w.fua or any(last_sync.get((w.epoch, d), -math.inf) > w.completed
                             for d in {d for d, _ in w.writes}))
        }  # fmt: skip
        self._goods: dict[tuple[int, int, int, bool], tuple[list[float], list[float]]] = {}
        for epoch, blocks in self._by_block.items():
            for key, writes in blocks.items():
                for durable in (False, True):
                    goods = sorted(
                        (w for w in writes
                         if w.good and (not durable or id(w) in self._durable_ops)),
                        key=lambda w: w.completed,
                    )  # fmt: skip
                    running, peak = [], -math.inf
                    for w in goods:
                        peak = max(peak, w.invoked)
                        running.append(peak)
                    self._goods[(epoch, *key, durable)] = ([w.completed for w in goods], running)

    def _latest_issue(
        self, epoch: int, key: tuple[int, int], before: float, durable: bool
    ) -> float:
        """The latest issue time of a GOOD (durable) write of ``key`` answered before ``before``."""
        done, running = self._goods.get((epoch, *key, durable), ([], []))
        n = bisect.bisect_left(done, before)
        return running[n - 1] if n else -math.inf

    def _may_produce(self, op: Op, key: tuple[int, int], value: Value) -> bool:
        """Whether ``op``, writing ``key``, could have left ``value`` there."""
        want = op.writes[key]
        if want is not None:
            return want == value
        return value == ZERO or value[0] == "tag"  # a copy: of whatever the source held

    def _explain(
        self, epoch: Epoch, key: tuple[int, int], value: Value, start: float, end: float,
        durable_only: bool = False,
    ) -> tuple[bool, list[Op]]:  # fmt: skip
        """Whether ``value`` may be read at ``key`` by a read over [start, end]: some write of
        it was issued before the read ended, and no GOOD write was issued after that write's
        effect ended and answered before the read began. Else the writes for the report."""
        latest = self._latest_issue(epoch.number, key, start, durable_only)
        if epoch.initial.get(key, ZERO) == value and latest == -math.inf:
            return True, []
        at = (epoch.number, *key)
        candidates = self._producers[at].get(value, []) + self._copies.get(at, [])
        for w in candidates:
            if w.invoked < end and (w.outcome in (GOOD, UNKNOWN, HUNG, None) or w.ambiguous):
                if self._may_produce(w, key, value) and not latest > w.effect_end:
                    return True, []
        writes = self._by_block[epoch.number].get(key, [])
        involved = [w for w in writes if w.writes[key] in (value, None)]
        involved += [s for s in writes if s.good and s.completed < start][-3:]
        return False, involved

    def check_reads(self) -> list[str]:
        self._index()
        out = []
        epochs = {e.number: e for e in self.epochs}
        for op in self.ops:
            if not op.good or not op.reads:
                continue
            epoch = epochs[op.epoch]
            for key, value in sorted(op.reads.items()):
                if value[0] == "torn":
                    out.append(f"torn block at disk {key[0]} lba {key[1]}: {show(value)}\n  {op}")
                    continue
                self.checked["blocks read"] += 1
                ok, involved = self._explain(epoch, key, value, op.invoked, op.completed)
                if not ok:
                    lines = "\n  ".join(str(w) for w in involved) or "(no write of it)"
                    out.append(
                        f"not linearizable: disk {key[0]} lba {key[1]} read {show(value)}"
                        f"\n  read: {op}\n  writes:\n  {lines}"
                    )
        return out

    def check_no_return(self) -> list[str]:
        """A value, once a read that began after its write's effect ended saw another one,
        never comes back: names are unique, so its coming back means the write landed late
        (after its fence, or after a newer write). Blocks a copy wrote are left out (a copy
        may bring a value back)."""
        out = []
        reads: dict[tuple[int, tuple[int, int]], list[tuple[float, float, Value, Op]]] = (
            defaultdict(list)
        )
        for op in self.ops:
            if op.good:
                for key, value in op.reads.items():
                    if value[0] == "tag":
                        reads[op.epoch, key].append((op.invoked, op.completed, value, op))
        epochs = {e.number: e for e in self.epochs}
        for (epoch, key), seen in reads.items():
            writes = self._by_block[epoch].get(key, [])
            if any(w.copy_from for w in writes):
                continue
            producer: dict[Value, float] = {}
            if epochs[epoch].initial.get(key) is not None:
                producer[epochs[epoch].initial[key]] = -math.inf
            for w in writes:
                if w.ambiguous or w.writes[key] is None:
                    continue
                producer[w.writes[key]] = w.effect_end  # type: ignore[index]
            seen.sort(key=lambda r: r[0])
            starts = [r[0] for r in seen]
            # from each position on: the earliest-answered read, and the earliest of another value
            best: list[tuple[tuple[float, Value, Op] | None, tuple[float, Value, Op] | None]] = []
            b1 = b2 = None
            for _, completed, value, op in reversed(seen):
                cand = (completed, value, op)
                if b1 is None or completed < b1[0]:
                    if b1 is not None and b1[1] != value:
                        b2 = b1
                    b1 = cand
                elif value != b1[1] and (b2 is None or completed < b2[0]):
                    b2 = cand
                best.append((b1, b2))
            best.reverse()
            last_read: dict[Value, tuple[float, Op]] = {}
            for invoked, _, value, op in seen:
                if value not in last_read or invoked > last_read[value][0]:
                    last_read[value] = (invoked, op)
            for value, effect_end in producer.items():
                if value not in last_read or effect_end == math.inf:
                    continue
                n = bisect.bisect_right(starts, effect_end)
                if n >= len(seen):
                    continue
                b1, b2 = best[n]
                other = b1 if b1 is not None and b1[1] != value else b2
                if other is not None and last_read[value][0] > other[0]:
                    makers = [str(w) for w in writes if w.writes[key] in (value, other[1])]
                    out.append(
                        f"a value came back: disk {key[0]} lba {key[1]} read {show(other[1])},"
                        f" then {show(value)} again\n  {other[2]}\n  {last_read[value][1]}\n"
                        f"  writes:\n  " + "\n  ".join(makers)
                    )
        return out

    def check_durability(self) -> list[str]:
        out = []
        self.checked["synced writes"] = len(self._durable_ops)
        for epoch in self.epochs:
            for key, value in sorted(epoch.final.items()):
                if key[0] in self.volatile:
                    continue
                if value[0] == "torn":
                    out.append(f"after the kill of e{epoch.number}: torn block {key}: {value}")
                    continue
                self.checked["blocks after a kill"] += 1
                ok, involved = self._explain(
                    epoch, key, value, epoch.killed, epoch.killed, durable_only=True
                )
                if not ok:
                    lines = "\n  ".join(str(w) for w in involved)
                    out.append(
                        f"lost after SIGKILL of e{epoch.number}: disk {key[0]} lba {key[1]}"
                        f" holds {show(value)}, but synced writes say otherwise:\n  {lines}"
                    )
        out += self._check_snapshots()
        return out

    def _durable_at(self) -> dict[int, float]:
        """When each GOOD write became durable: its own answer if FUA, else the earliest answer
        of a GOOD SYNCHRONIZE CACHE of its disk issued after it was answered."""
        syncs: dict[tuple[int, int], list[Op]] = defaultdict(list)
        for op in self.ops:
            if op.name.startswith("SYNC") and op.good:
                syncs[op.epoch, op.writes_disks[0]].append(op)
        earliest: dict[tuple[int, int], tuple[list[float], list[float]]] = {}
        for at, found in syncs.items():
            found.sort(key=lambda o: o.invoked)
            suffix, best = [], math.inf
            for o in reversed(found):
                best = min(best, o.completed)
                suffix.append(best)
            earliest[at] = ([o.invoked for o in found], suffix[::-1])
        out = {}
        for w in self.ops:
            if not w.good or not w.writes:
                continue
            when = w.completed if w.fua else math.inf
            for disk in {d for d, _ in w.writes}:
                issued, suffix = earliest.get((w.epoch, disk), ([], []))
                n = bisect.bisect_right(issued, w.completed)
                if n < len(issued):
                    when = min(when, suffix[n])
            out[id(w)] = when
        return out

    def _check_snapshots(self) -> list[str]:
        """What a device held as durable at a moment (right after a SYNCHRONIZE CACHE was
        answered): every write durable by then is there, or something newer."""
        out: list[str] = []
        if not self.snapshots:
            return out
        durable_at = self._durable_at()
        epochs = {e.number: e for e in self.epochs}
        # Per block: its writes' durable times, sorted, with the running latest issue time, so
        # "the latest write durable by then" is one bisection per snapshot and block
        became: dict[tuple[int, int, int], tuple[list[float], list[float]]] = {}
        for epoch_number, blocks in self._by_block.items():
            for key, writes in blocks.items():
                timed = sorted((durable_at.get(id(w), math.inf), w.invoked) for w in writes)
                running, peak = [], -math.inf
                for _, invoked in timed:
                    peak = max(peak, invoked)
                    running.append(peak)
                became[(epoch_number, *key)] = ([t for t, _ in timed], running)
        for epoch_number, when, values, why in self.snapshots:
            epoch = epochs[epoch_number]
            for key, value in sorted(values.items()):
                self.checked["blocks of a device after a sync"] += 1
                at = (epoch_number, *key)
                times, running = became.get(at, ([], []))
                n = bisect.bisect_right(times, when)
                latest = running[n - 1] if n else -math.inf
                ok = epoch.initial.get(key, ZERO) == value and latest == -math.inf
                for w in self._producers[at].get(value, []) + self._copies.get(at, []):
                    if ok:
                        break
                    if w.invoked < when and (w.outcome in (GOOD, UNKNOWN, HUNG) or w.ambiguous):
                        ok = self._may_produce(w, key, value) and not latest > w.effect_end
                if not ok:
                    writes = self._by_block[epoch_number].get(key, [])
                    lines = "\n  ".join(str(w) for w in writes if w.writes[key] == value or
                                        durable_at.get(id(w), math.inf) <= when)  # fmt: skip
                    out.append(
                        f"not durable after a sync: disk {key[0]} lba {key[1]} holds"
                        f" {show(value)} at {when:.4f} ({why}); durable by then:\n  {lines}"
                    )
        return out

    def check_compare_and_write(self) -> list[str]:
        out = []
        seen: dict[tuple[int, int, Value], Op] = {}
        for op in self.ops:
            if op.name != "COMPARE AND WRITE" or not op.good or op.compare is None:
                continue
            if op.compare[0] != "tag":
                continue  # zeros come back with every UNMAP: not unique
            key = next(iter(op.writes))
            copied = any(w.copy_from for w in self._by_block[op.epoch].get(key, []))
            if copied:
                continue
            prior = seen.get((op.epoch, *key, op.compare))  # type: ignore[arg-type]
            if prior is not None:
                out.append(
                    f"COMPARE AND WRITE not atomic: two succeeded on disk {key[0]} lba {key[1]}"
                    f" against the same {show(op.compare)}\n  {prior}\n  {op}"
                )
            seen[(op.epoch, *key, op.compare)] = op  # type: ignore[index]
        return out

    def check_reservations(self) -> list[str]:
        out = []
        self._index_pr()
        for op in self.ops:
            if op.outcome not in (GOOD, RESERVATION_CONFLICT) or not op.nexus or op.ambiguous:
                continue
            if not (op.reads_disks or op.writes_disks):
                continue
            verdicts = []
            for disk, write in [(d, False) for d in op.reads_disks] + [
                (d, True) for d in op.writes_disks
            ]:
                state = self._pr_during(disk, op.invoked, op.completed)
                if state is None:
                    verdicts.append(None)
                    continue
                verdicts.append((state, write, state.allows(op.nexus, write)))
            if any(v is None for v in verdicts):
                continue
            self.checked["commands under a known reservation state"] += 1
            allowed = all(v[2] for v in verdicts)  # type: ignore[index]
            if op.good and not allowed:
                why = [v for v in verdicts if not v[2]]  # type: ignore[index]
                out.append(
                    f"reservation bypassed: {op}\n  forbidden by "
                    + "; ".join(self._show_pr(s, w) for s, w, _ in why)  # type: ignore[misc]
                )
            if op.outcome == RESERVATION_CONFLICT and allowed:
                out.append(
                    f"RESERVATION CONFLICT where none applies: {op}\n  state "
                    + "; ".join(self._show_pr(s, w) for s, w, _ in verdicts)  # type: ignore[misc]
                )
        return out

    def remap(self, epoch: int, lun: int, old: int, new: int, start: float, end: float) -> None:
        """A reload over [start, end] made ``lun`` another image (disk ``old`` -> ``new``):
        operations naming it meanwhile may have reached either."""
        with self.lock:
            for op in self.ops:
                if op.epoch != epoch or lun not in op.touches:
                    continue
                if op.invoked < end and op.completed > start:
                    op.ambiguous = True
                    op.note += f" overlapped the reload of lun {lun}"
                    for (disk, lba), value in list(op.writes.items()):
                        if disk in (old, new):
                            op.writes[old, lba] = op.writes[new, lba] = value

    def _show_pr(self, s: PrState, write: bool) -> str:
        what = "write" if write else "read"
        return (
            f"disk {s.disk} ({what}) type {s.kind} holders {sorted(s.holders)} registered"
            f" {sorted(s.registered)} from {s.since:.4f} ({s.source}) to {s.until:.4f}"
        )

    def _index_pr(self) -> None:
        """Per disk, its known states by ``since``, when they do not overlap (a state ends at or
        before the next one starts): then the state over an interval is found by bisection."""
        by_disk: dict[int, list[PrState]] = defaultdict(list)
        for state in self.pr:
            by_disk[state.disk].append(state)
        self._pr_sorted: dict[int, tuple[list[float], list[PrState]]] = {}
        for disk, states in by_disk.items():
            states.sort(key=lambda st: st.since)
            if all(a.until <= b.since for a, b in itertools.pairwise(states)):
                self._pr_sorted[disk] = ([st.since for st in states], states)

    def _pr_during(self, disk: int, start: float, end: float) -> PrState | None:
        indexed = getattr(self, "_pr_sorted", {}).get(disk)
        if indexed is not None:
            # Without overlaps only the last state known from before ``start`` can span it.
            sinces, states = indexed
            n = bisect.bisect_left(sinces, start)
            state = states[n - 1] if n else None
            return state if state is not None and end < state.until else None
        for s in self.pr:
            if s.disk == disk and s.since < start and end < s.until:
                return s
        return None

    def check_liveness(self) -> list[str]:
        return [f"no status and no end of the connection within the bound: {op}"
                for op in self.ops if op.outcome == HUNG]  # fmt: skip

    def set_pr_until(self, disks: Iterable[int], when: float) -> None:
        """The known states of ``disks`` end at ``when`` (a PR OUT issued, a kill, a reload)."""
        with self.lock:
            for s in self.pr:
                if s.disk in disks and s.until == math.inf:
                    s.until = when
