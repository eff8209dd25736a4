"""Writes that last: the caching page tells initiators the truth about the write cache of every
kind of LUN, and what SYNCHRONIZE CACHE or FUA acknowledged survives the target being killed.

What the kill test can and cannot prove: SIGKILL ends the target process, not the machine, and
the page cache survives a process kill. So the image read back shows that every write
acknowledged before a completed SYNCHRONIZE CACHE had left the target's own memory and reached
the kernel; it cannot show that the data reached the disk (that needs a power cut, or a device
that drops unflushed writes). That part is checked by the store's own record of what it wrote
since its last fdatasync, dumped on SIGUSR1: empty right after SYNCHRONIZE CACHE or a FUA write,
not empty after a plain write.
"""

from __future__ import annotations

import os
import re
import signal
import struct
import threading
import time
from pathlib import Path

import pytest
from iscsi_helpers import IQN, MiniInitiator, RunningTarget, start_target, write10

BLOCKS_PER_WRITE = 8
WRITE_BYTES = BLOCKS_PER_WRITE * 512
BATCH = 16  # writes in flight at once, then SYNCHRONIZE CACHE
IMAGE_BYTES = 64 << 20
SYNC10 = bytes((0x35,)) + bytes(9)  # SYNCHRONIZE CACHE(10) of the whole medium


def payload(i: int) -> bytes:
    return struct.pack(">Q", i + 1) * (WRITE_BYTES // 8)


@pytest.mark.parametrize(
    ("lun", "wce"), [("{image}", 1), ("{image}:mmap", 1), ("mem:4M", 0), ("{image}:ro", 0)]
)
def test_caching_page_reports_the_write_cache_of_every_store(target_factory, tmp_path, lun, wce):
    """WCE=1 wherever a write is acknowledged before it is durable (a mapped image too: it
    reported 0, so initiators sent neither SYNCHRONIZE CACHE nor FUA)."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    t = target_factory("--lun", lun.format(image=image))
    ini = MiniInitiator(t.port)
    ini.login(IQN)
    ini.scsi(bytes((0x1A, 0x08, 0x08, 0, 0xFF, 0)), 255, read=True)  # MODE SENSE(6), DBD
    status, data, _ = ini.read_response()
    assert status == 0 and data[4] == 0x08, data.hex()
    assert (data[4 + 2] >> 2) & 1 == wce
    ini.close()


class WriteStream(threading.Thread):
    """A real initiator session writing batches of WRITEs, each batch followed by SYNCHRONIZE
    CACHE; counts what was acknowledged, and what was acknowledged before a completed sync."""

    def __init__(self, port: int, pause_after: int, signal_after: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.acked = 0
        self.durable = 0  # writes acknowledged before the last completed SYNCHRONIZE CACHE
        self.syncs = 0
        self.pause_after = pause_after
        self.paused = threading.Event()
        self.resume = threading.Event()
        self.signal_after = signal_after
        self.reached = threading.Event()
        self.ended: BaseException | None = None

    def run(self) -> None:
        ini = MiniInitiator(self.port, timeout=60)
        try:
            ini.login(IQN, {"InitiatorName": "iqn.2024-01.org.zerosend:stream"})
            capacity = IMAGE_BYTES // 2 // WRITE_BYTES
            for start in range(0, capacity, BATCH):
                for i in range(start, start + BATCH):
                    ini.scsi(
                        write10(i * BLOCKS_PER_WRITE, BLOCKS_PER_WRITE),
                        WRITE_BYTES,
                        write=True,
                        data=payload(i),
                    )
                for _ in range(BATCH):
                    status, _, _ = ini.read_response()
                    assert status == 0, "write failed"
                    self.acked += 1
                ini.scsi(SYNC10, 0)
                status, _, _ = ini.read_response()
                assert status == 0, "SYNCHRONIZE CACHE failed"
                self.durable = self.acked
                self.syncs += 1
                if self.syncs == self.pause_after:
                    self.paused.set()
                    self.resume.wait(120)
                if self.syncs == self.signal_after:
                    self.reached.set()  # and go on writing: the kill lands mid-stream
        except BaseException as e:  # the target was killed: ConnectionError / reset
            self.ended = e
        finally:
            ini.close()


def state_dump(t: RunningTarget) -> str:
    """The LUN 0 line of a fresh SIGUSR1 state dump."""
    before = t.log().count("state: LUN 0 ")
    t.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        lines = re.findall(r"state: LUN 0 .*", t.log())
        if len(lines) > before:
            return lines[-1]
        time.sleep(0.02)
    raise AssertionError(f"no state dump:\n{t.log()}")


@pytest.mark.parametrize("mode", ["", ":mmap"])
def test_sigkill_mid_stream_keeps_every_synced_write(tmp_path: Path, mode: str):
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(IMAGE_BYTES)
    t = start_target(tmp_path, "--lun", f"{image}{mode}")
    try:
        stream = WriteStream(t.port, pause_after=3, signal_after=8)
        stream.start()
        assert stream.paused.wait(120), f"stream did not get going: {stream.ended}"
        assert state_dump(t).endswith("unsynced: none"), "SYNCHRONIZE CACHE left the store dirty"
        # Another session, at the far end of the image: plain write, sync, FUA write.
        ini = MiniInitiator(t.port)
        ini.login(IQN, {"InitiatorName": "iqn.2024-01.org.zerosend:flush"})
        far = IMAGE_BYTES // 512 - 64
        steps = [
            (write10(far, 8), b"\x01" * 4096, f"bytes {far * 512}..{far * 512 + 4096}"),
            (SYNC10, b"", "none"),
            (write10(far + 8, 8, fua=True), b"\x02" * 4096, "none"),
        ]
        for cdb, data, unsynced in steps:
            ini.scsi(cdb, len(data), write=bool(data), data=data)
            status, _, _ = ini.read_response()
            assert status == 0
            state = state_dump(t)
            assert state.endswith(f"unsynced: {unsynced}"), f"after {cdb.hex()}: {state}"
        ini.close()
        stream.resume.set()
        assert stream.reached.wait(120), f"stream stopped early: {stream.ended}"
        os.kill(t.proc.pid, signal.SIGKILL)
        t.proc.wait(30)
        stream.join(60)
        assert not stream.is_alive()
        assert stream.ended is not None, "the stream finished before the kill"
    finally:
        if t.proc.poll() is None:
            t.proc.kill()
            t.proc.wait()
    durable = stream.durable
    assert durable >= 8 * BATCH
    written = image.read_bytes()
    missing = [
        i for i in range(durable) if written[i * WRITE_BYTES : (i + 1) * WRITE_BYTES] != payload(i)
    ]
    assert not missing, f"{len(missing)} of {durable} synced writes lost, first {missing[:5]}"
