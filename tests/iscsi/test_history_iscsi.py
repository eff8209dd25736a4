"""The iSCSI history check: four raw-PDU initiators at once issue random mixes of READ, WRITE
(with and without FUA), SYNCHRONIZE CACHE, UNMAP, WRITE SAME, COMPARE AND WRITE, EXTENDED COPY
across LUNs, PERSISTENT RESERVE OUT (register, reserve, release, clear, preempt, preempt and
abort), ABORT TASK and LOGICAL UNIT RESET, while the target is reloaded (SIGHUP: LUNs added,
removed, replaced) and killed with SIGKILL and restarted; every operation is recorded and
``history`` checks the invariants afterwards.

The LUNs: an image file, ``mem:``, a mapped image (``:mmap``) and, where FUSE mounts, the gated
file as a device with a volatile cache (a kill is a power cut; its gate holds writes and
fsyncs now and then). Where the rig can be built, the target serves from the host with a
zero-copy backend forced and the initiators sit in the rig's namespace.

``ZEROSEND_SOAK_SEED`` (int) picks the run, ``ZEROSEND_SOAK_MINUTES`` (float) its length; a
failing run prints the command that replays it (the same choices; the threads' interleaving
differs from run to run, so a rare violation may need the seed run a few times).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import re
import signal
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import history as H
import pytest
from gatedfs import GatedFile
from iscsi_helpers import (
    IQN,
    MiniInitiator,
    RunningTarget,
    read10,
    start_target,
    wait_for,
    write10,
)
from test_iscsi_reservations import READ_FULL_STATUS
from test_iscsi_rig import connect_from_namespace
from test_iscsi_sbc import (
    naa,
    segment,
    unmap_cdb,
    unmap_list,
    write_same16,
    xcopy_cdb,
    xcopy_params,
)

from bench.harness.rig import Rig
from tests.helpers import RIG_UNAVAILABLE, UNAVAILABLE, ZERO_COPY_BACKENDS

SEED = int(os.environ.get("ZEROSEND_SOAK_SEED", "20"))
MINUTES = float(os.environ.get("ZEROSEND_SOAK_MINUTES", "0.75"))
INITIATORS = 4
SPAN = 96  # blocks of each LUN the workload touches: small, so that operations collide
MAX_BLOCKS = 8
IMAGE_BYTES = 1 << 20
BOUND = 90.0  # seconds: a command without status or connection end by then has hung
SYNC10 = bytes((0x35,)) + bytes(9)
ABORT_TASK, LOGICAL_UNIT_RESET = 1, 5
REGISTER_AND_IGNORE, RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_AND_ABORT = 6, 1, 2, 3, 4, 5
PR_TYPES = (1, 3, 5, 6, 7, 8)
ASYNC_MESSAGE, NOP_IN, R2T, DATA_IN, SCSI_RESPONSE, TMF_RESPONSE = (
    0x32,
    0x20,
    0x31,
    0x25,
    0x21,
    0x22,
)


def replay() -> str:
    return (
        f"make soak SEED={SEED} MINUTES={MINUTES}  (or: ZEROSEND_SOAK_SEED={SEED}"
        f" ZEROSEND_SOAK_MINUTES={MINUTES} python -m pytest tests/iscsi/test_history_iscsi.py)"
    )


class VolatileDevice(GatedFile):
    """The gated FUSE file as a device with a volatile write cache: what was written but not
    fsynced is lost at a power cut. An fsync makes durable the writes that landed before it
    arrived (not those landing while it waits at the gate)."""

    def __init__(self, mountpoint: Path, data: bytes) -> None:
        self.durable = bytearray(data)
        self.log: list[tuple[int, bytes]] = []  # writes not yet durable, in landing order
        self.flushed = 0  # writes of ``log`` made durable
        self.landed = 0
        self.life = 0  # power cuts so far
        self.cut = threading.Lock()
        self.held: list[threading.Event] = []
        self.sync_gate = threading.Event()  # closed: fsyncs alone wait (writes go on)
        self.sync_gate.set()
        self.gate_lock = threading.Lock()  # one user of the gate at a time
        super().__init__(mountpoint, data)

    def _pass_gate(self) -> None:
        """Requests held at the gate go on newest first when it opens (a device reorders):
        a write issued later lands before an older one still held."""
        if self._gate.is_set():
            return
        mine = threading.Event()
        with self._lock:
            self.waiting += 1
            self.held.append(mine)
        if self._gate.is_set():  # opened meanwhile
            self.open_gate()
        mine.wait()
        with self._lock:
            self.waiting -= 1

    def open_gate(self) -> None:
        self._gate.set()
        while True:
            with self._lock:
                if not self.held:
                    return
                newest = self.held.pop()
            newest.set()
            time.sleep(0.002)  # (its write lands before the next one goes)

    def _write(self, unique: int, offset: int, data: bytes) -> None:
        life = self.life
        self._pass_gate()
        with self.cut:
            if life != self.life:  # of a process gone with the power
                return
            size = max(0, min(len(data), len(self.data) - offset))
            self.data[offset : offset + size] = data[:size]
            self.log.append((offset, data[:size]))
            self.landed += 1
        self._reply(unique, struct.pack("<II", size, 0))

    def _fsync(self, unique: int) -> None:
        with self.cut:
            upto, life = self.landed, self.life
        self._pass_gate()
        if not self.sync_gate.is_set():
            with self._lock:
                self.waiting += 1
            self.sync_gate.wait()
            with self._lock:
                self.waiting -= 1
        with self.cut:
            if life != self.life:  # the power went meanwhile: nothing to flush
                upto = self.flushed
            for offset, data in self.log[self.flushed : upto]:
                self.durable[offset : offset + len(data)] = data
            self.flushed = max(self.flushed, upto)
            self.syncs += 1
        self._reply(unique)

    def power_cut(self) -> bytes:
        """What the medium holds after the power went: the durable writes only."""
        with self.cut:
            self.data[:] = self.durable
            del self.log[:]
            self.flushed = self.landed = 0
            self.life += 1
            return bytes(self.durable)


@dataclass
class Lun:
    """A LUN of the target and the disk (image) behind it."""

    disk: int
    spec: str  # the config's entry
    path: Path | None  # None: a mem: LUN, empty at every start
    device: VolatileDevice | None = None  # an image on the gated FUSE file


def mount_device(tmp_path: Path) -> VolatileDevice | None:
    """The gated FUSE file with the initial blocks of disk 3, or None where FUSE cannot mount."""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        return None
    try:
        return VolatileDevice(tmp_path / "gated", image(3))
    except OSError:
        return None


def image(disk: int) -> bytes:
    blocks = b"".join(H.block(H.KIND_INIT, 0, 0, 0, disk, lba) for lba in range(SPAN))
    return blocks + bytes(IMAGE_BYTES - len(blocks))


def fill(path: Path, disk: int) -> None:
    """An image whose touched blocks each carry their own initial name."""
    path.write_bytes(image(disk))


class Cluster:
    """The target under test across its restarts: which process, which epoch."""

    def __init__(self, tmp_path: Path, luns: list[Lun], hist: H.History) -> None:
        self.tmp_path = tmp_path
        self.luns = luns
        self.hist = hist
        self.config = tmp_path / "target.toml"
        self.cond = threading.Condition()
        self.target: RunningTarget | None = None
        self.epoch = -1
        self.generation = 0  # of the LUN list: a reload changes it
        self.next_disk = 10  # new disks of reloads
        self.lost: list[tuple[int, str, str]] = []  # epoch, initiator, op: connections lost
        self.logs: dict[int, str] = {}  # epoch -> the target's log
        self.stop = threading.Event()
        # LOGICAL UNIT RESETs and PREEMPT AND ABORTs answered: (epoch, lun, the initiator
        # whose commands it aborted or "" for all, when answered)
        self.aborts: list[tuple[int, int, str, float]] = []
        self.pr_lock = threading.Lock()
        self.rig: Rig | None = None  # where the initiators are (None: loopback)
        self.host = "127.0.0.1"
        self.args: tuple[str, ...] = ()  # PR OUTs are serialized: the state between them is known
        for lun in luns:
            hist.disks[lun.disk] = lun.spec
            if lun.path is None:
                hist.volatile.add(lun.disk)

    def write_config(self) -> None:
        items = ", ".join(f'"{lun.spec}"' for lun in self.luns)
        # (resets from any session: they end other sessions' commands, a seam worth the run)
        self.config.write_text(f"luns = [{items}]\nnop_interval = 0\ncross_session_resets = true\n")

    def start(self, initial: dict[tuple[int, int], H.Value]) -> None:
        self.write_config()
        started = time.monotonic()
        target = start_target(self.tmp_path, "--config", str(self.config), *self.args,
                              host=self.host)  # fmt: skip
        with self.cond:
            self.epoch += 1
            self.hist.epochs.append(H.Epoch(self.epoch, started, initial=initial))
            for lun in self.luns:  # no APTPL: a new process starts without reservations
                empty = H.PrState(lun.disk, started, math.inf, frozenset(), frozenset(), 0,
                                  f"start of e{self.epoch}")  # fmt: skip
                self.hist.pr.append(empty)
            self.target = target
            self.cond.notify_all()

    def aborted(self, op: H.Op) -> float | None:
        """When a LOGICAL UNIT RESET, or a PREEMPT AND ABORT of its initiator, on ``op``'s
        LUN was answered after ``op`` was issued: such a command may end without status."""
        with self.cond:
            for epoch, lun, whose, answered in self.aborts:
                if (epoch, lun) == (op.epoch, op.lun) and whose in ("", op.initiator):
                    if answered > op.invoked:
                        return answered
        return None

    def current(self, after: int) -> tuple[RunningTarget, int] | None:
        """The target of an epoch later than ``after``, once there is one (None: stopping)."""
        with self.cond:
            while self.epoch <= after or self.target is None:
                if self.stop.is_set():
                    return None
                self.cond.wait(1)
            return self.target, self.epoch

    def new_lun(self, rng: random.Random, instead_of: Lun | None = None) -> Lun:
        """A LUN on a disk never used before: a file (plain or mapped) or memory. Replacing a
        ``mem:`` LUN, not memory again: the same config entry is the same LUN to the target
        (it keeps its contents and reservations), not a new disk."""
        disk = self.next_disk
        self.next_disk += 1
        kinds = ["file", "mmap", "mem"]
        if instead_of is not None and instead_of.path is None:
            kinds.remove("mem")
        kind = rng.choice(kinds)
        if kind == "mem":
            self.hist.volatile.add(disk)
            lun = Lun(disk, "mem:1M", None)
        else:
            path = self.tmp_path / f"disk{disk}.img"
            fill(path, disk)
            lun = Lun(disk, f"{path}:mmap" if kind == "mmap" else str(path), path)
        self.hist.disks[disk] = lun.spec
        epoch = self.hist.epochs[-1]
        for lba in range(SPAN):
            epoch.initial[disk, lba] = (
                H.ZERO if lun.path is None else H.decode(H.block(H.KIND_INIT, 0, 0, 0, disk, lba))
            )
        return lun

    def reload(self, rng: random.Random) -> str:
        """SIGHUP after adding, removing or replacing a LUN in the config file; reservations
        stay on the LUNs it keeps and start empty on the others."""
        target = self.target
        assert target is not None
        with self.pr_lock:  # no PR OUT meanwhile: the states before and after are known
            old = list(self.luns)
            new = list(old)
            action = rng.choice(
                ["add", "remove", "replace"] if len(old) > 3 else ["add", "replace"]
            )
            if action == "add" and len(old) < 5:
                new.append(self.new_lun(rng))
            elif action == "remove" and len(old) > 3:
                new.pop()
            else:
                action = "replace"
                at = rng.randrange(len(new))
                new[at] = self.new_lun(rng, instead_of=new[at])
            before = target.log().count("reload done")
            start = time.monotonic()
            self.hist.set_pr_until([lun.disk for lun in old], start)
            with self.cond:
                self.luns = new
                self.generation += 1
            self.write_config()
            target.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 60  # a hang guard
            while target.log().count("reload done") == before:
                assert target.proc.poll() is None, target.log()[-3000:]
                assert time.monotonic() < deadline, f"no reload done:\n{target.log()[-3000:]}"
                time.sleep(0.02)
            done = time.monotonic()
            epoch = self.hist.epochs[-1].number
            kept = {lun.disk for lun in old}
            for number, lun in enumerate(new):
                if number < len(old) and old[number].disk != lun.disk:
                    self.hist.remap(epoch, number, old[number].disk, lun.disk, start, done)
                known = [s for s in self.hist.pr if s.disk == lun.disk and s.until == start]
                if lun.disk in kept and known:  # the reload keeps its reservations
                    state = known[-1]
                    self.hist.pr.append(H.PrState(lun.disk, done, math.inf, state.registered,
                                                  state.holders, state.kind,
                                                  f"kept by the reload at {done:.4f}"))  # fmt: skip
                elif lun.disk not in kept:  # a new image: nothing reserved
                    empty = H.PrState(lun.disk, done, math.inf, frozenset(), frozenset(), 0,
                                      f"reload at {done:.4f}")  # fmt: skip
                    self.hist.pr.append(empty)
            self.hist.event(f"reload {action}: {[lun.spec for lun in new]}")
            return action

    def stall(self, rng: random.Random) -> None:
        """Close the device's gate now and then, for a moment: its writes and syncs wait."""
        while not self.stop.is_set():
            time.sleep(rng.uniform(0.05, 0.5))
            with self.cond:
                devices = [lun.device for lun in self.luns if lun.device is not None]
                if self.target is None or not devices:
                    continue
            with devices[0].gate_lock:
                devices[0].close_gate()
                time.sleep(rng.uniform(0.01, 0.3))
                devices[0].open_gate()

    def kill(self) -> dict[tuple[int, int], H.Value]:
        """SIGKILL, then the images as the disks hold them (page cache dropped)."""
        assert self.target is not None
        with self.cond:
            target, self.target = self.target, None
        with self.pr_lock:
            target.proc.send_signal(signal.SIGKILL)
            for lun in self.luns:
                if lun.device is not None:  # its requests must end for the process to go
                    lun.device.open_gate()
                    lun.device.sync_gate.set()
            target.proc.wait(30)
        killed = time.monotonic()
        self.logs[self.epoch] = target.log()
        self.hist.set_pr_until([lun.disk for lun in self.luns], killed)
        epoch = self.hist.epochs[-1]
        epoch.killed = killed
        with self.hist.lock:
            for op in self.hist.ops:
                if op.epoch == epoch.number and op.end == math.inf and not op.good:
                    op.end = killed  # nothing of a dead process lands later
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        except OSError as e:  # not root, or a read-only /proc: the page cache is read instead
            self.hist.event(f"drop_caches: {e}")
        values: dict[tuple[int, int], H.Value] = {}
        for lun in self.luns:
            if lun.path is None:
                continue
            if lun.device is not None:
                wait_for(lambda d=lun.device: d.waiting == 0, "the device's last requests")
                data = lun.device.power_cut()
            else:
                data = lun.path.read_bytes()
            for lba in range(SPAN):
                values[lun.disk, lba] = H.decode(data[lba * H.BLOCK : (lba + 1) * H.BLOCK])
        epoch.final = values
        return values

    def log(self) -> str:
        logs = sorted(self.tmp_path.glob("target-*.log"))
        return "\n".join(p.read_text(errors="replace")[-4000:] for p in logs[-2:])


class ResetAborted(Exception):
    """A command ended without status by another session's LOGICAL UNIT RESET."""


class Client(threading.Thread):
    """One initiator: a raw-PDU session doing random operations, one at a time, reconnecting
    after the target restarts."""

    def __init__(self, cluster: Cluster, number: int, seed: int) -> None:
        super().__init__(daemon=True, name=f"ini{number}")
        self.cluster = cluster
        self.hist = cluster.hist
        self.number = number
        self.rng = random.Random(seed * 1000 + number)
        self.name_ = f"iqn.2024-01.org.zerosend:hist{number}"
        self.isid = bytes((0x80, 0, 0, 0x10, 0, number))
        self.nexus = f"{self.name_},i,0x{self.isid.hex()}"
        self.key = 0x1000 + number
        self.ini: MiniInitiator | None = None
        self.epoch = -1
        self.failed = -1  # the epoch whose target refused a login: wait for the next
        self.generation = -1
        self.naas: dict[int, bytes] = {}
        self.view: list[Lun] = []
        self.error: BaseException | None = None

    # -- the session

    def connect(self) -> bool:
        got = self.cluster.current(self.failed)
        if got is None:
            return False
        target, self.epoch = got
        try:
            sock = None
            if self.cluster.rig is not None:  # the initiators live in the rig's namespace
                sock = connect_from_namespace(self.cluster.rig.ns, (target.host, target.port))
                sock.settimeout(BOUND)
            ini = MiniInitiator(target.port, timeout=BOUND, sock=sock)
            ini.isid = self.isid
            ini.mrdsl = 64 * 1024  # Data-In segments long enough to go zero-copy
            ini.login(IQN, {"InitiatorName": self.name_, "MaxRecvDataSegmentLength": "65536"})
            self.ini = ini
            self.generation = -1
        except (OSError, ConnectionError, AssertionError):
            self.ini = None  # the target died meanwhile: wait for the next one
            self.failed = self.epoch
        return True

    def refresh(self) -> None:
        """The NAA of every LUN (EXTENDED COPY names LUNs by it), again after a reload."""
        assert self.ini is not None
        self.generation = self.cluster.generation
        self.naas = {}
        for i in range(len(self.cluster.luns)):
            try:
                self.naas[i] = naa(self.ini, i)
            except AssertionError:  # a unit attention, a LUN gone: no copies naming it
                pass

    def run(self) -> None:
        try:
            while not self.cluster.stop.is_set():
                if self.ini is None:
                    if not self.connect():
                        return
                    continue
                try:
                    if self.generation != self.cluster.generation:
                        self.refresh()
                    self.one()
                except (OSError, ConnectionError) as e:
                    self.ini.close()
                    self.ini = None
                    if self.cluster.target is not None:
                        self.cluster.lost.append((self.epoch, self.name_, repr(e)))
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            if self.ini is not None:  # the target logs what the session sent, and how
                self.ini.close()

    def response(self, op: H.Op, itt: int, out: bytes = b"") -> tuple[int, bytes, bytes]:
        """Serve R2Ts and collect Data-In until the status of ``itt``: (status, data, sense).
        OSError / ConnectionError end the connection (the op's outcome is then unknown)."""
        assert self.ini is not None
        data = bytearray()
        while True:
            bhs, seg = self.receive(op)
            code = bhs[0] & 0x3F
            if code in (R2T, DATA_IN, SCSI_RESPONSE) and int.from_bytes(bhs[16:20], "big") != itt:
                continue  # of a command a reset ended (its answer may still come)
            if code == R2T:
                ttt, offset, length = struct.unpack_from(">I16xII", bhs, 20)
                for n, pos in enumerate(range(offset, offset + length, 8192)):
                    chunk = out[pos : min(pos + 8192, offset + length)]
                    self.ini.data_out(itt, ttt, n, pos, chunk, pos + len(chunk) == offset + length)
            elif code == DATA_IN:
                offset = struct.unpack_from(">I", bhs, 40)[0]
                data[offset : offset + len(seg)] = seg
                if bhs[1] & 0x01:
                    return bhs[3], bytes(data), b""
            elif code == SCSI_RESPONSE:
                return bhs[3], bytes(data), seg[2:] if seg else b""
            elif code == ASYNC_MESSAGE:
                op.note = f"async message {bhs[36]}"
            elif code == NOP_IN:
                pass
            else:
                raise AssertionError(f"unexpected PDU {bhs.hex()}")

    def receive(self, op: H.Op) -> tuple[bytes, bytes]:
        """The next PDU. A LOGICAL UNIT RESET, or a PREEMPT AND ABORT, of another session may
        end ``op`` without status (SAM-5, TAS=0): then ResetAborted once that was answered
        (and a second passed without a PDU); HUNG after the bound."""
        assert self.ini is not None
        self.ini.sock.settimeout(1.0)
        try:
            while True:
                try:
                    return self.ini.recv()
                except TimeoutError:
                    reset = self.cluster.aborted(op)
                    if reset is not None:
                        op.outcome, op.end = H.UNKNOWN, min(op.end, reset)
                        op.note += " aborted by a reset or a preempt"
                        raise ResetAborted from None
                    if time.monotonic() - op.invoked > BOUND:
                        op.outcome = H.HUNG
                        raise
        finally:
            self.ini.sock.settimeout(BOUND)

    def command(self, op: H.Op, cdb: bytes, out: bytes = b"", want: int = 0) -> bytes:
        """Issue ``op``'s command and record how it ended; the data it read."""
        assert self.ini is not None
        op.invoked = time.monotonic()  # before it leaves: a late stamp could hide a write
        try:
            itt = self.ini.scsi(cdb, len(out) or want, read=want > 0, write=bool(out),
                                data=out[:8192], lun=op.lun)  # fmt: skip
            status, data, sense = self.response(op, itt, out)
        except ResetAborted:
            return b""
        except (OSError, ConnectionError):
            if op.outcome is None:
                op.outcome = H.UNKNOWN
            raise
        op.completed = time.monotonic()
        op.outcome, op.sense = status, sense[:18].hex()
        return data

    # -- operations

    def begin(self, name: str, lun: int, lba: int = 0, blocks: int = 0, **kw: object) -> H.Op:
        kw.setdefault("touches", (lun,))
        return self.hist.begin(self.name_, name, lun, self.epoch, lba=lba, blocks=blocks,
                               nexus=self.nexus, **kw)  # fmt: skip

    def disk(self, lun: int) -> int:
        return self.view[lun].disk

    def tagged(self, op: H.Op, disk: int) -> bytes:
        out = b""
        for lba in range(op.lba, op.lba + op.blocks):
            data = H.block(H.KIND_WRITE, self.number, op.epoch, op.seq, disk, lba)
            op.writes[disk, lba] = H.decode(data)
            out += data
        return out

    def one(self) -> None:
        rng = self.rng
        self.view = self.cluster.luns  # the LUNs as this operation sees them (a reload may follow)
        # The device LUN oftener: there writes and syncs wait in the device's threads
        weights = [4 if lun.device is not None else 1 for lun in self.view]
        lun = rng.choices(range(len(self.view)), weights)[0]
        disk = self.disk(lun)
        blocks = rng.randint(1, MAX_BLOCKS)
        lba = rng.randrange(SPAN - blocks + 1)
        kind = rng.choices(
            ["read", "write", "fua", "sync", "unmap", "same", "caw", "xcopy", "pr", "abort",
             "reset", "long read"],
            [30, 25, 8, 6, 4, 4, 6, 5, 6, 3, 1, 3],
        )[0]  # fmt: skip
        if kind == "long read":  # long enough to go out zero-copy
            blocks, lba = SPAN - 16, rng.randrange(16)
            kind = "read"
        if kind == "read":
            op = self.begin("READ", lun, lba, blocks, reads_disks=(disk,))
            data = self.command(op, read10(lba, blocks), want=blocks * H.BLOCK)
            if op.good:
                for i in range(blocks):
                    op.reads[disk, lba + i] = H.decode(data[i * H.BLOCK : (i + 1) * H.BLOCK])
        elif kind in ("write", "fua"):
            fua = kind == "fua"
            op = self.begin("WRITE FUA" if fua else "WRITE", lun, lba, blocks, fua=fua,
                            writes_disks=(disk,))  # fmt: skip
            self.command(op, write10(lba, blocks, fua=fua), out=self.tagged(op, disk))
        elif kind == "sync":
            self.sync(lun, disk)
        elif kind == "unmap":
            op = self.begin("UNMAP", lun, lba, blocks, writes_disks=(disk,))
            for i in range(blocks):
                op.writes[disk, lba + i] = H.ZERO
            params = unmap_list((lba, blocks))
            self.command(op, unmap_cdb(len(params)), out=params)
        elif kind == "same":
            op = self.begin("WRITE SAME", lun, lba, blocks, writes_disks=(disk,))
            data = H.block(H.KIND_SAME, self.number, op.epoch, op.seq, disk, H.SAME_LBA)
            for i in range(blocks):
                op.writes[disk, lba + i] = H.decode(data)
            self.command(op, write_same16(lba, blocks), out=data)
        elif kind == "caw":
            self.compare_and_write(lun, disk, lba)
        elif kind == "xcopy":
            self.extended_copy(lun, blocks)
        elif kind == "pr":
            self.reserve_out(lun, disk)
        else:
            self.abort(
                lun, disk, lba, blocks, ABORT_TASK if kind == "abort" else LOGICAL_UNIT_RESET
            )

    def sync(self, lun: int, disk: int) -> None:
        """SYNCHRONIZE CACHE. On the device, now and then with its fsync held a moment (other
        sessions' writes and syncs go on meanwhile); then what the device holds as durable
        must include every write a GOOD sync covered by then."""
        device = self.view[lun].device
        held = device is not None and self.rng.random() < 0.3
        if held:
            device.sync_gate.clear()
            threading.Timer(0.5, device.sync_gate.set).start()
        op = self.begin("SYNCHRONIZE CACHE", lun, writes_disks=(disk,))
        self.command(op, SYNC10)
        if device is None or not op.good or not (held or self.rng.random() < 0.2):
            return
        with self.cluster.cond:  # not across a kill
            if self.cluster.target is None or self.cluster.epoch != op.epoch:
                return
            with device.cut:
                durable = bytes(device.durable[: SPAN * H.BLOCK])
            when = time.monotonic()
        values = {(disk, lba): H.decode(durable[lba * H.BLOCK : (lba + 1) * H.BLOCK])
                  for lba in range(SPAN)}  # fmt: skip
        with self.hist.lock:
            self.hist.snapshots.append((op.epoch, when, values, f"after {op}"))

    def compare_and_write(self, lun: int, disk: int, lba: int) -> None:
        read = self.begin("READ", lun, lba, 1, reads_disks=(disk,))
        old = self.command(read, read10(lba, 1), want=H.BLOCK)
        if not read.good:
            return
        read.reads[disk, lba] = H.decode(old)
        op = self.begin("COMPARE AND WRITE", lun, lba, 1, reads_disks=(disk,),
                        writes_disks=(disk,))  # fmt: skip
        op.compare = H.decode(old)
        new = self.tagged(op, disk)
        cdb = struct.pack(">BBQ3xBBB", 0x89, 0, lba, 1, 0, 0)
        self.command(op, cdb, out=old + new)
        if op.good:
            op.reads[disk, lba] = op.compare  # what it compared against was there

    def extended_copy(self, lun: int, blocks: int) -> None:
        """A copy addressed to ``lun`` from one LUN to another (any of them may be the same):
        SPC-4 admits EXTENDED COPY on the LUN addressed as a write, and the copy reads its
        source and writes its destination."""
        src_lun = self.rng.randrange(len(self.view))
        dst_lun = self.rng.randrange(len(self.view))
        if src_lun not in self.naas or dst_lun not in self.naas:
            return
        src, dst = self.disk(src_lun), self.disk(dst_lun)
        src_lba = self.rng.randrange(SPAN - blocks + 1)
        dst_lba = self.rng.randrange(SPAN - blocks + 1)
        op = self.begin("EXTENDED COPY", lun, dst_lba, blocks, reads_disks=(src,),
                        writes_disks=tuple({self.disk(lun), dst}),
                        touches=(lun, src_lun, dst_lun),
                        note=f"from lun {src_lun} lba {src_lba} to lun {dst_lun}")  # fmt: skip
        for i in range(blocks):
            op.writes[dst, dst_lba + i] = None
            op.copy_from[dst, dst_lba + i] = (src, src_lba + i)
        plist = xcopy_params(self.number, [self.naas[src_lun], self.naas[dst_lun]],
                             [segment(0, 1, blocks, src_lba, dst_lba)], hold=False)  # fmt: skip
        self.command(op, xcopy_cdb(len(plist)), out=plist)

    def reserve_out(self, lun: int, disk: int) -> None:
        """One PERSISTENT RESERVE OUT, then the state it left read back, with no other PR OUT
        in between: the admission check knows the state from then to the next one."""
        rng = self.rng
        with self.cluster.pr_lock, contextlib.ExitStack() as held:
            # What to do, from the last state read back: register first; preempt a registrant
            known = [st for st in self.hist.pr if st.disk == disk and st.until == math.inf]
            registered = known[-1].registered if known else frozenset()
            others = [0x1000 + int(port.split(",")[0].rsplit("hist", 1)[1])
                      for port in registered if port != self.nexus]  # fmt: skip
            others = others or [0x1000 + n for n in range(INITIATORS) if n != self.number]
            action = rng.choices([REGISTER_AND_IGNORE, RESERVE, RELEASE, CLEAR, PREEMPT,
                                  PREEMPT_AND_ABORT], [4, 4, 3, 2, 2, 3])[0]  # fmt: skip
            if known and self.nexus not in registered and rng.random() < 0.7:
                action = REGISTER_AND_IGNORE
            kind = rng.choice(PR_TYPES)
            key, service = self.key, 0
            if action == REGISTER_AND_IGNORE:
                key, service = 0, (self.key if rng.random() < 0.8 else 0)
            elif action in (PREEMPT, PREEMPT_AND_ABORT):
                service = rng.choice(others)
            name = {6: "PR REGISTER", 1: "PR RESERVE", 2: "PR RELEASE", 3: "PR CLEAR",
                    4: "PR PREEMPT", 5: "PR PREEMPT AND ABORT"}[action]  # fmt: skip
            params = struct.pack(">QQ4xB3x", key, service, 0)
            cdb = struct.pack(">BBB2xIB", 0x5F, action, kind, len(params), 0)
            device = self.view[lun].device
            if device is not None and action == PREEMPT_AND_ABORT:
                # The preempted nexus's writes held in the device: they must land before
                # the GOOD (the gate opens in a moment, newest request first).
                held.enter_context(device.gate_lock)
                device.close_gate()
                threading.Timer(0.5, device.open_gate).start()
                wait_for(lambda: device.waiting > 0 or device._gate.is_set(), "a request held",
                         timeout=60)  # fmt: skip
                with self.hist.lock:  # a registrant with a write in flight there, if any
                    writing = {o.initiator for o in self.hist.ops[-64:] if o.outcome is None
                               and o.writes_disks == (disk,) and o.writes}  # fmt: skip
                victims = [0x1000 + int(port.split(",")[0].rsplit("hist", 1)[1])
                           for port in registered if port.split(",")[0] in writing]  # fmt: skip
                if victims and victims[0] != self.key:
                    service = victims[0]
                    params = struct.pack(">QQ4xB3x", key, service, 0)
            op = self.begin(name, lun, note=f"type {kind} key {key:#x} service key {service:#x}")
            self.hist.set_pr_until([disk], time.monotonic())
            self.command(op, cdb, out=params)
            if op.good and action == PREEMPT_AND_ABORT:
                whose = f"iqn.2024-01.org.zerosend:hist{service - 0x1000}"
                ranges = self.fence(disk, whose, op.completed)
                with self.cluster.cond:
                    self.cluster.aborts.append((op.epoch, lun, whose, op.completed))
            if op.good and action == PREEMPT_AND_ABORT:
                self.overwrite(lun, disk, ranges)
            state = self.begin("PR IN READ FULL STATUS", lun)
            data = self.command(state, struct.pack(">BB5xHB", 0x5E, READ_FULL_STATUS, 4096, 0),
                                want=4096)  # fmt: skip
            if not state.good:
                return
            registered, holders, reservation = set(), set(), 0
            (length,) = struct.unpack_from(">I", data, 4)
            at = 8
            while at < 8 + length:
                _, flags, scope_type, _, tid_len = struct.unpack_from(">Q4xBB4xHI", data, at)
                tid = data[at + 24 : at + 24 + tid_len]
                (name_len,) = struct.unpack_from(">H", tid, 2)
                port = tid[4 : 4 + name_len].split(b"\0", 1)[0].decode()
                registered.add(port)
                if flags & 0x01:
                    holders.add(port)
                    reservation = scope_type & 0x0F
                at += 24 + tid_len
            self.hist.pr.append(H.PrState(disk, op.completed, math.inf, frozenset(registered),
                                          frozenset(holders), reservation, str(op)))  # fmt: skip

    def fence(self, disk: int, who: str, when: float) -> list[tuple[int, int]]:
        """Writes of the preempted nexus to ``disk`` still without status land before ``when``;
        the (LBA, blocks) they cover."""
        ranges = []
        with self.hist.lock:
            for op in self.hist.ops:
                if who == op.initiator and op.completed == math.inf and op.end > when:
                    if any(d == disk for d, _ in op.writes):
                        op.end = when
                        op.note += " preempted and aborted"
                        ranges.append((op.lba, op.blocks))
        return ranges

    def overwrite(self, lun: int, disk: int, ranges: list[tuple[int, int]]) -> None:
        """FUA writes over what a preempted nexus had in flight: a write of it landing after
        the PREEMPT AND ABORT shows as a lost write at the next kill or read."""
        for lba, blocks in ranges[:4]:
            for _ in range(2):  # the first held with the preempted write, the second after it
                read = self.begin("READ", lun, lba, blocks, reads_disks=(disk,),
                                  note="of a preempted write")  # fmt: skip
                data = self.command(read, read10(lba, blocks), want=blocks * H.BLOCK)
                if read.good:
                    for i in range(blocks):
                        block = data[i * H.BLOCK : (i + 1) * H.BLOCK]
                        read.reads[disk, lba + i] = H.decode(block)
            op = self.begin("WRITE FUA", lun, lba, blocks, fua=True, writes_disks=(disk,),
                            note="over a preempted write")  # fmt: skip
            self.command(op, write10(lba, blocks, fua=True), out=self.tagged(op, disk))

    def abort(self, lun: int, disk: int, lba: int, blocks: int, function: int) -> None:
        """A WRITE and, right behind it, ABORT TASK (or LOGICAL UNIT RESET): the WRITE may
        answer or not; if not, it must have landed (or not) by the TMF's response."""
        assert self.ini is not None
        op = self.begin("WRITE", lun, lba, blocks, writes_disks=(disk,))
        data = self.tagged(op, disk)
        op.invoked = time.monotonic()
        try:
            itt = self.ini.scsi(write10(lba, blocks), len(data), write=True, data=data[:8192],
                                lun=lun)  # fmt: skip
        except OSError:
            op.outcome = H.UNKNOWN
            raise
        tmf_name = "ABORT TASK" if function == ABORT_TASK else "LOGICAL UNIT RESET"
        tmf = self.begin(tmf_name, lun, lba, blocks, note=f"of #{op.seq}")
        bhs = bytearray(48)
        bhs[0], bhs[1], bhs[9] = 0x42, 0x80 | function, lun
        bhs[16:20] = self.ini.next_itt().to_bytes(4, "big")
        bhs[20:24] = itt.to_bytes(4, "big") if function == ABORT_TASK else b"\xff\xff\xff\xff"
        bhs[24:28] = self.ini.cmdsn.to_bytes(4, "big")
        bhs[28:32] = self.ini.expstatsn.to_bytes(4, "big")
        bhs[32:36] = (self.ini.cmdsn - 1).to_bytes(4, "big")
        tmf.invoked = time.monotonic()
        try:
            self.ini.send(bhs)
            while tmf.outcome is None:
                try:
                    rsp, seg = self.ini.recv()
                except TimeoutError:
                    tmf.outcome = H.HUNG
                    if op.outcome is None:
                        op.outcome = H.HUNG
                    raise
                code = rsp[0] & 0x3F
                rsp_itt = int.from_bytes(rsp[16:20], "big")
                if code == R2T and rsp_itt == itt:
                    ttt, offset, length = struct.unpack_from(">I16xII", rsp, 20)
                    for n, pos in enumerate(range(offset, offset + length, 8192)):
                        chunk = data[pos : min(pos + 8192, offset + length)]
                        last = pos + len(chunk) == offset + length
                        self.ini.data_out(itt, ttt, n, pos, chunk, last)
                elif code == SCSI_RESPONSE and rsp_itt == itt:
                    op.completed, op.outcome = time.monotonic(), rsp[3]
                    op.sense = seg[2:20].hex()
                elif code == TMF_RESPONSE:
                    tmf.completed, tmf.outcome = time.monotonic(), rsp[2]
                elif code not in (ASYNC_MESSAGE, NOP_IN, R2T, DATA_IN, SCSI_RESPONSE):
                    raise AssertionError(f"unexpected PDU {rsp.hex()}")
        except (OSError, ConnectionError):
            for o in (op, tmf):
                if o.outcome is None:
                    o.outcome = H.UNKNOWN
            raise
        if op.outcome is None:
            op.outcome = H.UNKNOWN
            if tmf.outcome == 0:  # function complete: the aborted write landed or never will
                op.end = tmf.completed
        if function == LOGICAL_UNIT_RESET and tmf.outcome == 0:
            with self.cluster.cond:
                self.cluster.aborts.append((op.epoch, lun, "", tmf.completed))
            with self.hist.lock:  # every write of the LUN in flight ended with the reset
                for other in self.hist.ops:
                    if (other.epoch, other.lun) == (op.epoch, lun) and other.writes:
                        if other.outcome is None and other.invoked < tmf.invoked:
                            other.end = min(other.end, tmf.completed)


def dropped(cluster: Cluster) -> list[str]:
    """Connections the live target ended must be ones a reload ended (and said so); no
    traceback in any log."""
    out = []
    for epoch, log in sorted(cluster.logs.items()):
        if "Traceback" in log:
            at = log.index("Traceback")
            out.append(f"traceback in the target log of e{epoch}:\n{log[at - 300 : at + 1500]}")
        for n in range(INITIATORS):
            name = f"iqn.2024-01.org.zerosend:hist{n}"
            lost = sum(1 for e, who, _ in cluster.lost if (e, who) == (epoch, name))
            ended = sum(1 for line in log.splitlines() if name in line and "ending session" in line)
            if lost > ended:
                said = [
                    li
                    for li in log.splitlines()
                    if name in li and ("WARNING" in li or "ERROR" in li)
                ]
                errors = [err for e, who, err in cluster.lost if (e, who) == (epoch, name)]
                out.append(
                    f"connection dropped: {name} lost {lost} connections in e{epoch}, a reload"
                    f" ended {ended}; client saw {errors[:3]}; target said:\n  "
                    + "\n  ".join(said[-5:])
                )
    return out


@pytest.mark.slow
@pytest.mark.timeout(int(MINUTES * 60 * 2 + 240))
def test_history_of_many_initiators_with_kills(tmp_path: Path):
    with contextlib.ExitStack() as rigged:  # the rig and the device go last
        run_history(tmp_path, rigged)


def run_history(tmp_path: Path, rigged: contextlib.ExitStack) -> None:
    hist = H.History()
    luns = [
        Lun(0, str(tmp_path / "file0.img"), tmp_path / "file0.img"),
        Lun(1, "mem:1M", None),
        Lun(2, f"{tmp_path / 'mapped2.img'}:mmap", tmp_path / "mapped2.img"),
    ]
    device = mount_device(tmp_path)
    if device is not None:
        rigged.callback(device.unmount)  # (after the target: it holds the file open)
        luns.append(Lun(3, str(device.path), device.path, device))
    initial: dict[tuple[int, int], H.Value] = {}
    for lun in luns:
        if lun.path is not None:
            if lun.device is None:
                fill(lun.path, lun.disk)
            for lba in range(SPAN):
                initial[lun.disk, lba] = H.decode(H.block(H.KIND_INIT, 0, 0, 0, lun.disk, lba))
    cluster = Cluster(tmp_path, luns, hist)
    rig, backends = None, [b for b in ZERO_COPY_BACKENDS if UNAVAILABLE[b] is None]
    if RIG_UNAVAILABLE is None and backends:  # the target on the host, zero-copy forced
        rig = rigged.enter_context(Rig())
        cluster.rig, cluster.host = rig, rig.host_addr
        cluster.args = ("--backend", backends[0], "--zerocopy-probe", "off")
    rng = random.Random(SEED)
    cluster.start(initial)
    gate = threading.Thread(target=cluster.stall, args=(random.Random(SEED + 1),), daemon=True)
    gate.start()
    clients = [Client(cluster, n, SEED) for n in range(INITIATORS)]
    for c in clients:
        c.start()
    try:
        deadline = time.monotonic() + MINUTES * 60
        faults, first = 0, rng.randrange(2)
        while time.monotonic() < deadline:
            time.sleep(min(rng.uniform(2, 8), max(0.0, deadline - time.monotonic())))
            if time.monotonic() >= deadline:
                break
            faults += 1
            if faults % 2 == first:  # reloads and kills take turns, in an order the seed picks
                cluster.reload(rng)
                continue
            values = cluster.kill()
            initial = {k: (H.ZERO if k[0] in hist.volatile else v) for k, v in values.items()}
            cluster.start(initial)
        cluster.stop.set()
        for c in clients:
            c.join(BOUND + 30)
        hung = [c.name for c in clients if c.is_alive()]
        last = cluster.target
        if last is not None:  # the sessions just closed: their figures, before the kill
            wait_for(lambda: "session ended (" in last.log(), "a session's end logged")
        gate.join(30)
        cluster.kill()  # the last epoch's durability, too
    finally:
        cluster.stop.set()
        if cluster.target is not None and cluster.target.proc.poll() is None:
            cluster.target.proc.kill()
            cluster.target.proc.wait()
    errors = [f"{c.name}: {c.error!r}" for c in clients if c.error is not None]
    violations = hist.check() + dropped(cluster)
    done = sum(1 for op in hist.ops if op.good)
    by_name: dict[str, list[int]] = {}
    for op in hist.ops:
        counts = by_name.setdefault(op.name, [0, 0])
        counts[0] += 1
        counts[1] += op.good
    reloads = [what for _, what in hist.events if what.startswith("reload")]
    fenced = sum(1 for op in hist.ops if "preempted" in op.note)
    # bytes the target sent zero-copy (released uncopied, or copied by the kernel on delivery)
    sent = r"zerocopy-bytes=(\d+) kernel-copied-bytes=(\d+)"
    zero_copy = sum(int(a) + int(b) for log in cluster.logs.values()
                    for a, b in re.findall(sent, log))  # fmt: skip
    overwritten = sum(1 for op in hist.ops if "over a preempted" in op.note)
    summary = (
        f"seed {SEED}: {len(hist.ops)} operations ({done} GOOD) in {len(hist.epochs)} lives"
        f" of the target, {len(reloads)} reloads; LUNs {[lun.spec for lun in luns]};"
        f" issued/GOOD: {by_name}; checked: {hist.checked}; writes in flight at a PREEMPT"
        f" AND ABORT: {fenced}, written over: {overwritten}; over "
        f"{'the rig ' + ' '.join(cluster.args) if rig else 'loopback'}: {zero_copy} bytes"
        f" sent zero-copy"
    )
    if hung or errors or violations:
        kinds: dict[str, int] = {}
        for v in violations:
            kinds[v.split(":")[0]] = kinds.get(v.split(":")[0], 0) + 1
        summary += f"\nviolations by kind: {kinds}"
        shown, per_kind = [], dict.fromkeys(kinds, 0)
        for v in violations:  # a few of every kind
            if per_kind[v.split(":")[0]] < 3:
                per_kind[v.split(":")[0]] += 1
                shown.append(v)
        text = "\n\n".join(shown)
        more = f"\n... and {len(violations) - len(shown)} more" if len(violations) > 12 else ""
        pytest.fail(
            f"{summary}\n{len(violations)} violations; hung clients {hung}; errors {errors}\n\n"
            f"{text}{more}\n\nreplay: {replay()}\n\ntarget log tail:\n{cluster.log()[-3000:]}",
            pytrace=False,
        )
    print(summary)
    # The run did what it is for: every check had something to look at
    assert all(n for what, n in hist.checked.items() if device or "device" not in what), summary
    assert len(hist.epochs) >= 2 and reloads, summary
    assert rig is None or zero_copy > 0, summary


# -- the checker itself, on made-up histories: every invariant can fail


def made_up() -> tuple[H.History, H.Value]:
    """One epoch; block (0, 0) starts with its initial value, which is returned."""
    hist = H.History()
    initial = H.decode(H.block(H.KIND_INIT, 0, 0, 0, 0, 0))
    hist.epochs.append(H.Epoch(0, 0.0, killed=100.0, initial={(0, 0): initial}))
    return hist, initial


def op(hist: H.History, name: str, invoked: float, completed: float, outcome: object = H.GOOD,
       **kw: object) -> H.Op:  # fmt: skip
    o = H.Op(kw.pop("initiator", "ini1"), len(hist.ops) + 1, name, 0, **kw)  # type: ignore[arg-type]
    o.invoked, o.completed, o.outcome = invoked, completed, outcome
    hist.ops.append(o)
    return o


def written(writer: int, seq: int) -> H.Value:
    return H.decode(H.block(H.KIND_WRITE, writer, 0, seq, 0, 0))


def test_checker_finds_a_stale_read_and_accepts_an_overlapping_one():
    hist, initial = made_up()
    op(hist, "WRITE", 1, 2, writes={(0, 0): written(1, 1)})
    op(hist, "READ", 1.5, 1.6, reads={(0, 0): initial})  # overlaps the write: either value
    op(hist, "READ", 3, 4, reads={(0, 0): written(1, 1)})
    assert hist.check() == []
    op(hist, "READ", 5, 6, reads={(0, 0): initial})  # the write was answered before
    violation, back = hist.check()
    assert violation.startswith("not linearizable: disk 0 lba 0 read initial")
    assert back.startswith("a value came back: disk 0 lba 0 read write of ini1")
    assert "ini1 #1 WRITE" in violation and "ini1 #4 READ" in violation


def test_checker_finds_a_write_that_landed_after_its_fence():
    """B's WRITE without status, fenced by a PREEMPT AND ABORT at 2; A writes at 3..4; a read
    at 5 must not see B's data."""
    hist, _ = made_up()
    op(hist, "WRITE", 1, math.inf, H.UNKNOWN, end=2.0, writes={(0, 0): written(2, 1)},
       initiator="ini2")  # fmt: skip
    op(hist, "WRITE", 3, 4, writes={(0, 0): written(1, 2)})
    op(hist, "READ", 2.5, 2.6, reads={(0, 0): written(2, 1)})  # before A's write: fine
    assert hist.check() == []
    op(hist, "READ", 5, 6, reads={(0, 0): written(2, 1)})
    (violation,) = hist.check()
    assert "not linearizable" in violation and "fenced at 2.0000" in violation


def test_checker_finds_a_synced_write_lost_at_the_kill():
    hist, initial = made_up()
    hist.epochs[0].final = {(0, 0): initial}
    op(hist, "WRITE", 1, 2, writes={(0, 0): written(1, 1)}, writes_disks=(0,))
    assert hist.check() == []  # not synced: it may be lost
    op(hist, "SYNCHRONIZE CACHE", 3, 4, writes_disks=(0,))
    (violation,) = hist.check()
    assert violation.startswith("lost after SIGKILL of e0: disk 0 lba 0 holds initial")


def test_checker_finds_commands_a_reservation_forbids_and_conflicts_without_one():
    hist, _ = made_up()
    hist.pr.append(H.PrState(0, 1, 10, frozenset({"a"}), frozenset({"a"}), 1, "made up"))
    op(hist, "READ", 2, 3, nexus="b", reads_disks=(0,))  # WRITE EXCLUSIVE: reads allowed
    op(hist, "WRITE", 2, 3, H.RESERVATION_CONFLICT, nexus="b", writes_disks=(0,))
    op(hist, "EXTENDED COPY", 11, 12, nexus="b", writes_disks=(0,))  # state unknown by then
    assert hist.check() == []
    op(hist, "EXTENDED COPY", 4, 5, nexus="b", reads_disks=(1,), writes_disks=(0,))
    hist.pr.append(H.PrState(1, 1, 10, frozenset(), frozenset(), 0, "made up"))
    op(hist, "READ", 4, 5, H.RESERVATION_CONFLICT, nexus="b", reads_disks=(0,))
    bypass, conflict = hist.check()
    assert bypass.startswith("reservation bypassed: ini1 #4 EXTENDED COPY")
    assert conflict.startswith("RESERVATION CONFLICT where none applies: ini1 #5 READ")


def test_checker_finds_the_reservation_state_by_bisection_as_by_a_scan():
    """The state over an interval, found through the per-disk index, is the one a scan of
    every state finds (states that overlap are scanned)."""
    rnd = random.Random(7)
    hist, _ = made_up()
    for disk in range(3):
        t = 0.0
        for n in range(60):  # one after another, with gaps of unknown state between
            since = t + rnd.random()
            until = math.inf if n == 59 else since + rnd.random() * 4
            t = until
            hist.pr.append(H.PrState(disk, since, until, frozenset(), frozenset(), 0, "made up"))
    hist.pr.append(H.PrState(3, 0, 50, frozenset(), frozenset(), 0, "made up"))
    hist.pr.append(H.PrState(3, 10, 20, frozenset(), frozenset(), 0, "overlapping"))
    scans = [
        (disk, start, start + rnd.random() * 3)
        for disk in range(4)
        for start in (rnd.random() * 300 for _ in range(300))
    ]
    linear = [hist._pr_during(*q) for q in scans]
    hist._index_pr()
    assert 3 not in hist._pr_sorted and {0, 1, 2} <= set(hist._pr_sorted)
    assert [hist._pr_during(*q) for q in scans] == linear
    assert any(state is not None for state in linear)


def test_checker_finds_two_compare_and_writes_that_saw_the_same_value():
    hist, _ = made_up()
    hist.epochs[0].initial[0, 0] = written(3, 9)
    for n in (1, 2):
        op(hist, "COMPARE AND WRITE", n, n + 0.5, compare=written(3, 9),
           writes={(0, 0): written(1, n + 10)})  # fmt: skip
    (violation,) = hist.check()
    assert violation.startswith("COMPARE AND WRITE not atomic")


def test_checker_finds_hangs_and_torn_blocks():
    hist, _ = made_up()
    op(hist, "WRITE", 1, math.inf, H.HUNG)
    torn = bytearray(H.block(H.KIND_WRITE, 1, 0, 1, 0, 0))
    torn[300] ^= 1
    op(hist, "READ", 2, 3, reads={(0, 0): H.decode(bytes(torn))})
    violations = hist.check()
    assert [v.split(":")[0] for v in violations] == [
        "torn block at disk 0 lba 0",
        "no status and no end of the connection within the bound",
    ]


def test_checker_finds_a_fenced_write_that_comes_back():
    """B's WRITE, fenced at 2, has not landed when a read at 3 looks; a read at 5 sees it:
    it landed after the fence, though no write came between."""
    hist, initial = made_up()
    op(hist, "WRITE", 1, math.inf, H.UNKNOWN, end=2.0, writes={(0, 0): written(2, 1)},
       initiator="ini2")  # fmt: skip
    op(hist, "READ", 3, 4, reads={(0, 0): initial})
    assert hist.check() == []
    op(hist, "READ", 5, 6, reads={(0, 0): written(2, 1)})
    (violation,) = hist.check()
    assert violation.startswith("a value came back: disk 0 lba 0 read initial")


def test_checker_finds_a_device_without_a_write_a_sync_covered():
    hist, initial = made_up()
    op(hist, "WRITE", 1, 2, writes={(0, 0): written(1, 1)}, writes_disks=(0,))
    op(hist, "SYNCHRONIZE CACHE", 3, 4, writes_disks=(0,))
    hist.snapshots.append((0, 3.5, {(0, 0): initial}, "before the sync's answer"))
    assert hist.check() == []
    hist.snapshots.append((0, 4.5, {(0, 0): initial}, "after it"))
    (violation,) = hist.check()
    assert violation.startswith("not durable after a sync: disk 0 lba 0 holds initial")
