"""READs of a read-only image sent with sendfile (``--sendfile on``, kept for
measuring: bench/iscsi/BENCHMARKS.md): the bytes arrive whole and in order with the headers
around them, for large reads (sendfile) and small ones (packed) mixed in one batch."""

from __future__ import annotations

import re
import socket
import struct
from pathlib import Path

from iscsi_helpers import MiniInitiator, make_image, need, run

MiB = 1 << 20
BLOCK = 512


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def test_sendfile_reads_arrive_whole(target_factory, tmp_path: Path):
    image = tmp_path / "disk.img"
    data = make_image(image, 4 * MiB, seed=31)
    t = target_factory("--lun", f"{image}:ro", "--sendfile", "on")
    ini = MiniInitiator(t.port)
    try:
        ini.mrdsl = 256 * 1024
        ini.login(t.iqn, {"MaxRecvDataSegmentLength": str(ini.mrdsl)})
        reads = [(0, 128), (300, 8), (1000, 256), (7, 1), (2000, 64), (4000, 24)]
        ini.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)  # one batch
        for lba, blocks in reads:
            ini.scsi(read10(lba, blocks), blocks * BLOCK, read=True)
        ini.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
        for lba, blocks in reads:
            status, got, _ = ini.read_response()
            assert status == 0
            assert got == data[lba * BLOCK : (lba + blocks) * BLOCK], (lba, blocks)
    finally:
        ini.close()
    qemu = need("qemu-img")
    back = tmp_path / "back.raw"
    run([qemu, "convert", "-f", "raw", "-O", "raw", t.url(), str(back)])
    assert back.read_bytes() == data
    # The large reads left as sendfile: neither copied nor zero-copy sends
    ends = re.findall(r"session ended \(commands=\d+ read=(\d+) .* copied-bytes=(\d+) ", t.log())
    read, copied = (int(n) for n in ends[0])
    assert copied < read // 10, ends[0]
