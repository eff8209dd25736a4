"""Raw image files and block devices: read with pread into the caller's pooled buffers, or
lent from a read-only mapping; writes synced with fdatasync in the disk threads."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import stat
import sys
import threading
import time

from .. import _accel
from .store import _ZERO, BLOCK_SIZE, Loan, Store, StoreError, _Descriptor, log

# fallocate(2) modes (linux/falloc.h): Python's os.posix_fallocate cannot pass them.
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
# Deliberate faults of a mutants build (``_accel.fault_on``); always False in a release build
_MAPPED_WRITABLE_LENT = _accel.fault_on("mapped_writable_lent")
_FLUSH_IGNORES_SYNCS_UNDER_WAY = _accel.fault_on("flush_ignores_syncs_under_way")
_WRITE_NOT_MARKED_DIRTY = _accel.fault_on("write_not_marked_dirty")
_FAILED_SYNC_FORGETS_DIRTY = _accel.fault_on("failed_sync_forgets_dirty")


# File systems whose writes land in the page cache of this machine (``statfs`` f_type): ext2/3/4,
# XFS, btrfs, tmpfs, F2FS, ZFS, bcachefs. On others (FUSE, NFS, CIFS, 9p, ...) a write may wait
# for a server or a user-space daemon.
_LOCAL_FS = frozenset((0xEF53, 0x58465342, 0x9123683E, 0x01021994, 0xF2F52010, 0x2FC12FC1,
                       0xCA451A4E))  # fmt: skip
#: A write on the event loop slower than this was held up by the kernel (dirty page throttling,
#: a slow device under the page cache): the image's writes then go to its threads for a while.
WRITE_STALL = 0.01


class _Sync:
    """An fdatasync under way, of the bytes written in ``span`` (and whatever else it finds)."""

    __slots__ = ("done", "error", "span")

    def __init__(self, span: tuple[int, int]) -> None:
        self.span = span
        self.done = False
        self.error: OSError | None = None


def _overlaps(span: tuple[int, int] | None, start: int, end: int) -> bool:
    return span is not None and span[0] < end and start < span[1]


class FileStore(Store):
    """A raw image file or a block device, read with pread into the caller's pooled buffer."""

    kind = "raw"
    can_discard = True
    may_block = True

    def __init__(self, path: str, readonly: bool = False, mapped: bool = False) -> None:
        super().__init__(path)
        self.readonly = readonly
        self._map: memoryview | None = None
        try:
            self.fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as e:
            raise StoreError(f"cannot open LUN image {path}: {e.strerror}") from e
        st = os.fstat(self.fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            os.close(self.fd)
            raise StoreError(f"{path} is neither a regular file nor a block device")
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        self.size -= self.size % BLOCK_SIZE
        if self.size == 0:
            os.close(self.fd)
            raise StoreError(f"{path} is smaller than one {BLOCK_SIZE}-byte block")
        # Written, not yet made durable: [start, end). Unknown at open (an earlier process may
        # have left dirty pages), so the whole image until the first flush.
        self._dirty: tuple[int, int] | None = None if readonly else (0, self.size)
        self._syncs: list[_Sync] = []  # under way, each covering what was dirty when it began
        # Writes and syncs run in several threads: the dirty span and the syncs change under it
        self._dirty_lock = threading.Condition()
        # Reads that the page cache holds are served at once; the rest may wait for a disk
        self.nowait = _reads_nowait(self.fd)
        # Writes go to the page cache on the event loop (five to ten times cheaper than handing
        # each to a thread) where it is this machine's, until one is held up (``WRITE_STALL``)
        self._loop_writes = stat.S_ISBLK(st.st_mode) or _fs_type(self.fd) in _LOCAL_FS
        self._threads_until = 0.0  # time.monotonic() until which writes go to threads
        self._backoff = 0.0
        if mapped:
            # Reads are then views of the page cache itself: no read copy, nothing to pool.
            # The image must not shrink while served (a mapped page past EOF is a SIGBUS).
            self._mmap = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ)
            self._map = memoryview(self._mmap)
            self.kind = "raw, mapped"
        self._io = _Descriptor(self.fd, path)

    @property
    def mapped(self) -> bool:
        """Reads are views of the mapped image (``PATH:mmap``)."""
        return self._map is not None

    def segments(self, offset: int, length: int) -> list[memoryview] | None:
        if self._map is None:
            return None
        return [self._map[offset : offset + length]]

    @property
    def lends(self) -> bool:
        """READs may be sent straight from the mapped pages: nothing can write to them."""
        return self._map is not None and (self.readonly or _MAPPED_WRITABLE_LENT)

    def borrow(self, offset: int, length: int) -> Loan | None:
        return super().borrow(offset, length) if self.lends else None

    def read_into(self, offset: int, view: memoryview) -> None:
        self._read(offset, view, 0)

    def read_cached(self, offset: int, view: memoryview) -> bool:
        """Only what the page cache holds (``preadv2(RWF_NOWAIT)``); False if any of it is not
        there, or the file system cannot tell (every read then goes through ``read_into``)."""
        if not self.nowait:
            return False
        try:
            self._read(offset, view, os.RWF_NOWAIT)
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise
            self.nowait = False
            return False
        return True

    def _read(self, offset: int, view: memoryview, flags: int) -> None:
        done = 0
        with self._io as fd:
            while done < len(view):
                n = os.preadv(fd, [view[done:]], offset + done, flags)
                if n == 0:  # the file shrank under us: serve zeros rather than stale bytes
                    view[done:] = _ZERO[: len(view) - done]
                    return
                done += n

    def write(self, offset: int, data: memoryview | bytes) -> None:
        if self.readonly:
            raise StoreError(f"{self.name}: read-only")
        done = 0
        with self._io as fd:
            try:
                while done < len(data):
                    done += os.pwrite(fd, data[done:], offset + done)
            finally:  # marked once written (a flush that began earlier does not cover it); a
                # write that failed half-way is dirty too
                if not _WRITE_NOT_MARKED_DIRTY:
                    self._mark_dirty(offset, offset + len(data))

    def writes_on_loop(self) -> bool:
        return self._loop_writes and time.monotonic() >= self._threads_until

    def wrote_on_loop(self, seconds: float) -> None:
        if seconds > WRITE_STALL:  # held up: threads for 1 s, doubling while it recurs
            self._backoff = min(60.0, self._backoff * 2 or 1.0)
            self._threads_until = time.monotonic() + self._backoff
            log.info("%s: a write waited %.0f ms in the kernel; writes go to threads for %g s",
                     self.name, seconds * 1000, self._backoff)  # fmt: skip
        elif self._backoff and time.monotonic() > self._threads_until + self._backoff:
            self._backoff = 0.0  # quiet for as long again: forgiven

    def _mark_dirty(self, start: int, end: int) -> None:
        with self._dirty_lock:
            dirty = self._dirty
            self._dirty = (
                (start, end) if dirty is None else (min(dirty[0], start), max(dirty[1], end))
            )

    @property
    def write_cache(self) -> bool:
        # pwrite lands in the page cache (and a device's own cache) until fdatasync
        return not self.readonly

    @property
    def unsynced(self) -> tuple[int, int] | None:
        with self._dirty_lock:  # (a sync under way has not made its span durable yet)
            spans = [s.span for s in self._syncs]
            if self._dirty is not None:
                spans.append(self._dirty)
        if not spans:
            return None
        return min(a for a, _ in spans), max(b for _, b in spans)

    def flush(self, offset: int = 0, length: int = 0) -> None:
        end = self.size if length == 0 else offset + length
        with self._dirty_lock:
            dirty = self._dirty
            if not _overlaps(dirty, offset, end):
                # Nothing in the range waits for a sync of its own, but syncs under way in other
                # threads may be all that makes it durable: this flush is done when they are
                # (answering before them could lose data the initiator was told is durable).
                running = [s for s in self._syncs if _overlaps(s.span, offset, end)]
                if _FLUSH_IGNORES_SYNCS_UNDER_WAY:
                    running = []
                self._dirty_lock.wait_for(lambda: all(s.done for s in running))
                for s in running:
                    if s.error is not None:
                        raise OSError(s.error.errno, f"fdatasync of {self.name}: {s.error}")
                return
            assert dirty is not None
            sync = _Sync(dirty)
            self._syncs.append(sync)
            self._dirty = None  # what is written from now on is marked again
        # fdatasync, whole file: the only durable sync (sync_file_range flushes neither the
        # device cache nor metadata). Mapped images need no msync: writes go through pwrite
        # and the mapping only reads, so the file's page cache is all there is to sync.
        try:
            with self._io as fd:
                os.fdatasync(fd)
        except OSError as e:
            sync.error = e
            if not _FAILED_SYNC_FORGETS_DIRTY:
                self._mark_dirty(*dirty)  # a later flush tries again
            raise
        finally:
            with self._dirty_lock:
                sync.done = True
                self._syncs.remove(sync)
                self._dirty_lock.notify_all()

    def discard(self, offset: int, length: int) -> None:
        """Punch a hole (regular files: the blocks are freed; block devices: discarded and
        zeroed). A file system without hole punching gets zeros written instead."""
        if self.readonly:
            raise StoreError(f"{self.name}: read-only")
        mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        with self._io as fd:
            punched = _libc.fallocate(fd, mode, offset, length) == 0
            err = ctypes.get_errno()
        if punched:
            self._mark_dirty(offset, offset + length)  # the freed blocks are metadata to sync
            return
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(err, f"fallocate(PUNCH_HOLE) on {self.name}: {os.strerror(err)}")
        for at in range(offset, offset + length, len(_ZERO)):
            self.write(at, _ZERO[: min(len(_ZERO), offset + length - at)])

    def allocated(self, offset: int, length: int) -> list[tuple[int, int]]:
        with self._io as fd:
            return _allocated(fd, offset, length)

    def close(self) -> None:
        """Closes the image once no I/O uses it; I/O that starts later fails (ENODEV)."""
        self._io.close()
        if self._map is not None:
            # The mapping keeps a descriptor of the image of its own: unmap it now, unless a
            # send still holds its pages (then the mapping goes with the last of them).
            self._map.release()
            self._map = None
            try:
                self._mmap.close()
            except BufferError:
                pass


def _allocated(fd: int, offset: int, length: int) -> list[tuple[int, int]]:
    end = offset + length
    ranges: list[tuple[int, int]] = []
    pos = offset
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # nothing but a hole up to the end of the file
                break
            return [(offset, length)]  # no hole reporting here (block devices): all data
        if data >= end:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        ranges.append((data, hole - data))
        pos = hole
    return ranges


def _fs_type(fd: int) -> int:
    """The ``statfs`` magic number of the file system holding ``fd`` (0 if unknown)."""
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is its first word
    if _libc.fstatfs(fd, buf) != 0:
        return 0
    return int.from_bytes(buf.raw[: ctypes.sizeof(ctypes.c_long)], sys.byteorder) & 0xFFFFFFFF


def _reads_nowait(fd: int) -> bool:
    """Whether ``preadv2(RWF_NOWAIT)`` works on ``fd`` (some file systems refuse it)."""
    if not hasattr(os, "RWF_NOWAIT"):
        return False
    try:
        os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT)
    except BlockingIOError:
        pass  # supported; the first block is just not cached
    except OSError:
        return False
    return True
