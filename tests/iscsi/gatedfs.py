"""A one-file FUSE file system whose I/O waits at a gate: a real device that blocks.

``GatedFile(mountpoint, data)`` mounts (root only) a file system holding one file,
``mountpoint / "disk.img"``, with ``data`` in it. While the gate is closed (``close_gate()``),
every read, write, fsync and lseek (SEEK_DATA/SEEK_HOLE: the whole file is data) of it waits in
the kernel until ``open_gate()``; ``waiting`` counts the requests held there, ``syncs`` the
fsyncs answered, ``seeks`` the lseeks that reached the server; while ``fail_syncs`` is set,
fsyncs fail with EIO (a device that lost the data). The file is opened with direct
I/O, so every read and write reaches this server (nothing stays in the page cache); writes
change ``data``. Spoken over ``/dev/fuse`` with the kernel's FUSE protocol
(``include/uapi/linux/fuse.h``): just the requests a fixed-size file needs.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
import threading
from pathlib import Path

# Opcodes
LOOKUP, FORGET, GETATTR, OPEN, READ, WRITE, RELEASE, FSYNC, FLUSH, INIT, INTERRUPT, DESTROY = (
    1, 2, 3, 14, 15, 16, 18, 20, 25, 26, 36, 38,
)  # fmt: skip
BATCH_FORGET = 42
LSEEK = 46
SEEK_DATA, SEEK_HOLE = 3, 4
NO_REPLY = {FORGET, BATCH_FORGET, INTERRUPT}
FOPEN_DIRECT_IO = 1
ROOT, FILE = 1, 2
NAME = "disk.img"

_IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, ...
_OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
_ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # ino size blocks times nsecs mode nlink ... flags
_READ_IN = struct.Struct("<QQI")  # fh, offset, size
_WRITE_IN = struct.Struct("<QQIIQII")  # fh, offset, size, write flags, lock owner, flags, pad
_LSEEK_IN = struct.Struct("<QQI")  # fh, offset, whence


class GatedFile:
    def __init__(self, mountpoint: Path, data: bytes) -> None:
        self.mountpoint = mountpoint
        self.data = bytearray(data)
        self.waiting = 0
        self.syncs = 0
        self.seeks = 0
        self.fail_syncs = False
        self._gate = threading.Event()
        self._gate.set()
        self._lock = threading.Lock()
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        options = f"fd={self._fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
        mountpoint.mkdir(exist_ok=True)
        if self._libc.mount(b"gatedfs", str(mountpoint).encode(), b"fuse", 0, options) != 0:
            err = ctypes.get_errno()
            os.close(self._fd)
            raise OSError(err, f"mounting FUSE at {mountpoint}: {os.strerror(err)}")
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def path(self) -> Path:
        return self.mountpoint / NAME

    def close_gate(self) -> None:
        self._gate.clear()

    def open_gate(self) -> None:
        self._gate.set()

    def unmount(self) -> None:
        self.open_gate()
        self._libc.umount2(str(self.mountpoint).encode(), 2)  # MNT_DETACH
        os.close(self._fd)

    # -- the server

    def _attr(self, node: int) -> bytes:
        if node == ROOT:
            return _ATTR.pack(
                ROOT, 0, 0, 0, 0, 0, 0, 0, 0, stat.S_IFDIR | 0o755, 2, 0, 0, 0, 4096, 0
            )
        size = len(self.data)
        mode = stat.S_IFREG | 0o644
        return _ATTR.pack(FILE, size, size // 512, 0, 0, 0, 0, 0, 0, mode, 1, 0, 0, 0, 4096, 0)

    def _reply(self, unique: int, body: bytes = b"", error: int = 0) -> None:
        try:
            os.write(
                self._fd, _OUT_HEADER.pack(_OUT_HEADER.size + len(body), -error, unique) + body
            )
        except OSError:  # the request was interrupted, or the file system is gone
            pass

    def _serve(self) -> None:
        while True:
            try:
                request = os.read(self._fd, 1 << 20)
            except OSError as e:
                if e.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue
                return  # ENODEV: unmounted
            _, opcode, unique, node, *_ = _IN_HEADER.unpack_from(request)
            arg = request[_IN_HEADER.size :]
            if opcode in NO_REPLY:
                continue
            if opcode == INIT:
                (readahead,) = struct.unpack_from("<I", arg, 8)
                out = struct.pack("<IIIIHHIIHHII", 7, 31, readahead, 0, 16, 12, 1 << 17, 1, 32,
                                  0, 0, 0)  # fmt: skip
                self._reply(unique, out.ljust(64, b"\0"))
            elif opcode == LOOKUP:
                if node == ROOT and arg.rstrip(b"\0") == NAME.encode():
                    entry = struct.pack("<QQQQII", FILE, 0, 60, 60, 0, 0)  # node, valid 60 s
                    self._reply(unique, entry + self._attr(FILE))
                else:
                    self._reply(unique, error=errno.ENOENT)
            elif opcode == GETATTR:
                self._reply(unique, struct.pack("<QII", 60, 0, 0) + self._attr(node))
            elif opcode == OPEN:
                self._reply(unique, struct.pack("<QIi", 0, FOPEN_DIRECT_IO, 0))
            elif opcode == READ:
                _, offset, size = _READ_IN.unpack_from(arg)
                threading.Thread(
                    target=self._read, args=(unique, offset, size), daemon=True
                ).start()
            elif opcode == WRITE:
                _, offset, size, *_ = _WRITE_IN.unpack_from(arg)
                data = arg[_WRITE_IN.size : _WRITE_IN.size + size]
                threading.Thread(
                    target=self._write, args=(unique, offset, data), daemon=True
                ).start()
            elif opcode == FSYNC:
                threading.Thread(target=self._fsync, args=(unique,), daemon=True).start()
            elif opcode == LSEEK:
                _, offset, whence = _LSEEK_IN.unpack_from(arg)
                threading.Thread(
                    target=self._lseek, args=(unique, offset, whence), daemon=True
                ).start()
            elif opcode in (RELEASE, FLUSH, DESTROY):
                self._reply(unique)
            else:
                self._reply(unique, error=errno.ENOSYS)

    def _pass_gate(self) -> None:
        if not self._gate.is_set():
            with self._lock:
                self.waiting += 1
            self._gate.wait()
            with self._lock:
                self.waiting -= 1

    def _read(self, unique: int, offset: int, size: int) -> None:
        self._pass_gate()
        self._reply(unique, bytes(self.data[offset : offset + size]))

    def _write(self, unique: int, offset: int, data: bytes) -> None:
        self._pass_gate()
        size = max(0, min(len(data), len(self.data) - offset))  # the file keeps its size
        self.data[offset : offset + size] = data[:size]
        self._reply(unique, struct.pack("<II", size, 0))

    def _fsync(self, unique: int) -> None:
        self._pass_gate()
        if self.fail_syncs:
            self._reply(unique, error=errno.EIO)
            return
        with self._lock:
            self.syncs += 1
        self._reply(unique)

    def _lseek(self, unique: int, offset: int, whence: int) -> None:
        with self._lock:
            self.seeks += 1
        self._pass_gate()
        size = len(self.data)
        if whence not in (SEEK_DATA, SEEK_HOLE):
            self._reply(unique, error=errno.EINVAL)
        elif offset >= size:
            self._reply(unique, error=errno.ENXIO)
        else:  # no holes: data from anywhere, the only hole at the end
            self._reply(unique, struct.pack("<Q", offset if whence == SEEK_DATA else size))
