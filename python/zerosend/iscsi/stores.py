"""Backing stores behind LUNs: raw image files and block devices, compressed qcow2 images
(read-only, decompressed in user space), and memory / null LUNs for benchmarks.

A store either fills a caller's buffer (``read_into``: raw files, read into pooled buffers) or
lends views of memory it owns (``borrow``: memory LUNs, decompressed clusters, read-only mapped
images), which the target sends without any copy. Lent memory never changes while the loan
lasts (until the send carrying it was released by the kernel): decompressed clusters are
immutable ``bytes``, a memory LUN copies a lent chunk before a WRITE changes it, and a mapped
image that can be written lends nothing (its pages are the page cache, which a WRITE changes
in place), so its READs are read into pooled buffers like a plain file's.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import re
import stat
import struct
import sys
import threading
import time
import zlib
from collections import OrderedDict

from .. import _mutant

BLOCK_SIZE = 512
_ZERO = memoryview(bytes(1 << 20))
# fallocate(2) modes (linux/falloc.h): Python's os.posix_fallocate cannot pass them.
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
log = logging.getLogger("zerosend.iscsi")
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
# Deliberate faults of a mutants build (``zerosend._mutant``); always False in a release build
_MAPPED_WRITABLE_LENT = _mutant.on("mapped_writable_lent")
_LOAN_WRITTEN_IN_PLACE = _mutant.on("loan_written_in_place")
_FLUSH_IGNORES_SYNCS_UNDER_WAY = _mutant.on("flush_ignores_syncs_under_way")
_WRITE_NOT_MARKED_DIRTY = _mutant.on("write_not_marked_dirty")
_FAILED_SYNC_FORGETS_DIRTY = _mutant.on("failed_sync_forgets_dirty")

# File systems whose writes land in the page cache of this machine (``statfs`` f_type): ext2/3/4,
# XFS, btrfs, tmpfs, F2FS, ZFS, bcachefs. On others (FUSE, NFS, CIFS, 9p, ...) a write may wait
# for a server or a user-space daemon.
_LOCAL_FS = frozenset((0xEF53, 0x58465342, 0x9123683E, 0x01021994, 0xF2F52010, 0x2FC12FC1,
                       0xCA451A4E))  # fmt: skip
#: A write on the event loop slower than this was held up by the kernel (dirty page throttling,
#: a slow device under the page cache): the image's writes then go to its threads for a while.
WRITE_STALL = 0.01


class StoreError(Exception):
    """A backing store that cannot be opened or read; the message names the file and why."""


class Loan:
    """Views of a store's memory for one send; ``release()`` once the kernel let go of them."""

    __slots__ = ("views",)

    def __init__(self, views: list[memoryview]) -> None:
        self.views = views

    def release(self) -> None:
        pass


class Store:
    """Base class: a byte-addressed medium of ``size`` bytes."""

    size: int = 0
    block_size: int = BLOCK_SIZE
    readonly: bool = False
    kind: str = "store"
    can_discard: bool = False  # ``discard`` deallocates (UNMAP)
    # Reads, writes and syncs may wait for a device: they run in the store's threads
    # (``diskio``) unless the page cache takes them at once (``read_cached``,
    # ``writes_on_loop``); ``borrow`` and those two are called on the event loop only.
    may_block: bool = False

    def __init__(self, name: str) -> None:
        self.name = name

    @property
    def blocks(self) -> int:
        return self.size // self.block_size

    def segments(self, offset: int, length: int) -> list[memoryview] | None:
        """Views covering [offset, offset+length) if the data already lives in memory (views
        of memory a WRITE may change: to send them, ``borrow``)."""
        return None

    def borrow(self, offset: int, length: int) -> Loan | None:
        """[offset, offset+length) as memory that stays unchanged until the loan is released,
        or None: then ``read_into`` a buffer of the caller's."""
        views = self.segments(offset, length)
        return None if views is None else Loan(views)

    def read_into(self, offset: int, view: memoryview) -> None:
        raise NotImplementedError

    def read_cached(self, offset: int, view: memoryview) -> bool:
        """Fill ``view`` if that cannot wait for a disk; False if it would (then ``read_into``
        it where waiting stops nobody)."""
        self.read_into(offset, view)
        return True

    def write(self, offset: int, data: memoryview | bytes) -> None:
        raise StoreError(f"{self.name}: read-only")

    def writes_on_loop(self) -> bool:
        """A write may be done on the event loop now: it lands in memory without waiting."""
        return not self.may_block

    def wrote_on_loop(self, seconds: float) -> None:
        """A write on the event loop took ``seconds``."""

    @property
    def write_cache(self) -> bool:
        """Writes are acknowledged before they reach stable storage (the caching page's WCE):
        only ``flush`` makes them durable, so initiators must send SYNCHRONIZE CACHE or FUA."""
        return False

    @property
    def unsynced(self) -> tuple[int, int] | None:
        """The byte span written since the last flush that covered it, or None."""
        return None

    def flush(self, offset: int = 0, length: int = 0) -> None:
        """Make the writes to [offset, offset+length) durable (``length`` 0: to the end)."""

    def close(self) -> None:
        pass

    @property
    def thin(self) -> bool:
        """The store can deallocate ranges (``discard``), which then read as zeros."""
        return self.can_discard and not self.readonly

    def discard(self, offset: int, length: int) -> None:
        """Deallocate [offset, offset+length): it reads as zeros afterwards."""
        raise StoreError(f"{self.name}: cannot deallocate ranges")

    def allocated(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The (offset, length) ranges inside [offset, offset+length) that hold data; the rest
        is deallocated and reads as zeros."""
        return [(offset, length)]


class _Descriptor:
    """An image's descriptor, closed only once no I/O in any thread uses it. Closed while a
    queued write still has to run, its number could go to the next file the target opens,
    which would get the LUN's data: so ``close()`` waits for the I/O under way (the last of it
    closes the descriptor) and I/O that starts after it fails. ``with descriptor as fd:``."""

    __slots__ = ("_closing", "_lock", "_users", "fd", "name")

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        self._lock = threading.Lock()
        self._users = 0
        self._closing = False

    def __enter__(self) -> int:
        with self._lock:
            if self._closing:
                raise OSError(errno.ENODEV, f"{self.name}: closed (the LUN was removed)")
            self._users += 1
        return self.fd

    def __exit__(self, *_: object) -> None:
        with self._lock:
            self._users -= 1
            last = self._closing and not self._users
        if last:
            os.close(self.fd)

    def close(self) -> None:
        with self._lock:
            if self._closing:
                return
            self._closing = True
            now = not self._users
        if now:
            os.close(self.fd)


class _Sync:
    """An fdatasync under way, of the bytes written in ``span`` (and whatever else it finds)."""

    __slots__ = ("done", "error", "span")

    def __init__(self, span: tuple[int, int]) -> None:
        self.span = span
        self.done = False
        self.error: OSError | None = None


def _overlaps(span: tuple[int, int] | None, start: int, end: int) -> bool:
    return span is not None and span[0] < end and start < span[1]


def _zero_views(length: int) -> list[memoryview]:
    out = []
    while length > 0:
        n = min(length, len(_ZERO))
        out.append(_ZERO[:n])
        length -= n
    return out


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


class MemoryStore(Store):
    """An anonymous-memory LUN: reads are lent straight out of it (no read copy at all).

    The memory is split in chunks; a WRITE to a chunk that a send still holds goes to a fresh
    copy of the chunk (copy-on-write), which replaces it in the LUN, and the send keeps the old
    one, unchanged, until its release."""

    kind = "mem"
    can_discard = True
    CHUNK = 64 * 1024

    def __init__(self, size: int) -> None:
        super().__init__(f"mem:{size}")
        self.size = size - size % BLOCK_SIZE
        base = memoryview(mmap.mmap(-1, self.size))
        c = self.CHUNK
        self._chunks = [base[at : at + c] for at in range(0, self.size, c)]
        self._lent = [0] * len(self._chunks)  # loans of each chunk as it is now
        # Times each chunk was copied on write (a loan of an older copy no longer counts)
        self._copies = [0] * len(self._chunks)
        # Loans are made on the event loop, while a write may come from a thread (EXTENDED COPY,
        # or a write that found the medium busy): a chunk's loan count and its copy change
        # together.
        self._lock = threading.Lock()

    def _pieces(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(chunk, start, end) of every chunk [offset, offset+length) touches."""
        c = self.CHUNK
        out = []
        end = offset + length
        while offset < end:
            index, start = divmod(offset, c)
            n = min(c - start, end - offset)
            out.append((index, start, start + n))
            offset += n
        return out

    def segments(self, offset: int, length: int) -> list[memoryview]:
        return [self._chunks[i][a:b] for i, a, b in self._pieces(offset, length)]

    def borrow(self, offset: int, length: int) -> Loan:
        pieces = self._pieces(offset, length)
        with self._lock:
            for i, _, _ in pieces:
                self._lent[i] += 1
            return _ChunkLoan(self, [self._chunks[i][a:b] for i, a, b in pieces],
                              [(i, self._copies[i]) for i, _, _ in pieces])  # fmt: skip

    def _returned(self, chunks: list[tuple[int, int]]) -> None:
        with self._lock:
            for i, copy in chunks:
                if self._copies[i] == copy:
                    self._lent[i] -= 1

    def read_into(self, offset: int, view: memoryview) -> None:
        pos = 0
        for seg in self.segments(offset, len(view)):
            view[pos : pos + len(seg)] = seg
            pos += len(seg)

    def write(self, offset: int, data: memoryview | bytes) -> None:
        pos = 0
        for i, a, b in self._pieces(offset, len(data)):
            with self._lock:  # one chunk at a time: a loan waits for one chunk's copy at most
                if self._lent[i] and not _LOAN_WRITTEN_IN_PLACE:
                    self._chunks[i] = memoryview(bytearray(self._chunks[i]))
                    self._lent[i] = 0
                    self._copies[i] += 1
                self._chunks[i][a:b] = data[pos : pos + b - a]
            pos += b - a

    def discard(self, offset: int, length: int) -> None:
        # Zeroed through write(), so copy-on-write keeps the pages a send still holds.
        for at in range(offset, offset + length, len(_ZERO)):
            self.write(at, _ZERO[: min(len(_ZERO), offset + length - at)])


class _ChunkLoan(Loan):
    __slots__ = ("_chunks", "_store")

    def __init__(
        self, store: MemoryStore, views: list[memoryview], chunks: list[tuple[int, int]]
    ) -> None:
        super().__init__(views)
        self._store = store
        self._chunks = chunks

    def release(self) -> None:
        chunks, self._chunks = self._chunks, []  # at most once
        self._store._returned(chunks)


class NullStore(Store):
    """Reads zeros, discards writes: measures the target itself."""

    kind = "null"
    can_discard = True

    def __init__(self, size: int) -> None:
        super().__init__(f"null:{size}")
        self.size = size - size % BLOCK_SIZE

    def segments(self, offset: int, length: int) -> list[memoryview]:
        return _zero_views(length)

    def read_into(self, offset: int, view: memoryview) -> None:
        view[:] = bytes(len(view))

    def write(self, offset: int, data: memoryview | bytes) -> None:
        pass

    def discard(self, offset: int, length: int) -> None:
        pass

    def allocated(self, offset: int, length: int) -> list[tuple[int, int]]:
        return []


QCOW2_MAGIC = b"QFI\xfb"


class _Missing:
    """Not in memory: finding out would read the image."""


MISSING = _Missing()


class Qcow2Store(Store):
    """A qcow2 image served read-only. Compressed clusters (``qemu-img convert -c``) are inflated
    into immutable buffers kept in a small LRU and sent straight from there."""

    kind = "qcow2"
    may_block = True

    def __init__(self, path: str, cache_bytes: int = 16 << 20) -> None:
        super().__init__(path)
        self.readonly = True
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise StoreError(f"cannot open qcow2 image {path}: {e.strerror}") from e
        self._io = _Descriptor(self.fd, path)
        try:
            self._parse_header()
        except StoreError:
            self._io.close()
            raise
        # Both caches are shared by the store's threads; the lock is never held across a read.
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_max = max(4, cache_bytes // self.cluster_size)
        self._l2_cache: OrderedDict[int, tuple[int, ...]] = OrderedDict()

    def _pread(self, length: int, offset: int) -> bytes:
        with self._io as fd:
            data = os.pread(fd, length, offset)
        if len(data) != length:
            raise StoreError(f"{self.name}: truncated qcow2 image (offset {offset})")
        return data

    def _parse_header(self) -> None:
        hdr = self._pread(104, 0) if os.fstat(self.fd).st_size >= 104 else b""
        if len(hdr) < 72 or hdr[:4] != QCOW2_MAGIC:
            raise StoreError(f"{self.name}: not a qcow2 image")
        (version,) = struct.unpack_from(">I", hdr, 4)
        backing_off, _backing_len, cluster_bits, size, crypt = struct.unpack_from(">QIIQI", hdr, 8)
        l1_size, l1_off = struct.unpack_from(">IQ", hdr, 36)
        if version not in (2, 3):
            raise StoreError(f"{self.name}: qcow2 version {version} is not supported")
        if backing_off:
            raise StoreError(f"{self.name}: qcow2 images with a backing file are not supported")
        if crypt:
            raise StoreError(f"{self.name}: encrypted qcow2 images are not supported")
        if not 9 <= cluster_bits <= 21:
            raise StoreError(f"{self.name}: bad qcow2 cluster_bits {cluster_bits}")
        if version == 3:
            (incompatible,) = struct.unpack_from(">Q", hdr, 72)
            # bit 0 dirty (harmless read-only), bit 1 corrupt, 2 external data, 3 zstd, 4 ext L2
            bad = incompatible & ~0x1
            if bad:
                raise StoreError(
                    f"{self.name}: qcow2 incompatible features 0x{bad:x} not supported "
                    "(only zlib-compressed, self-contained images)"
                )
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.size = size - size % BLOCK_SIZE
        self.l2_entries = self.cluster_size // 8
        needed = -(-size // (self.cluster_size * self.l2_entries))
        if l1_size < needed:
            raise StoreError(f"{self.name}: qcow2 L1 table too small for the disk size")
        raw = self._pread(8 * l1_size, l1_off)
        self.l1 = struct.unpack(f">{l1_size}Q", raw)
        self.csize_shift = 62 - (cluster_bits - 8)
        self.csize_mask = (1 << (cluster_bits - 8)) - 1
        self.coffset_mask = (1 << self.csize_shift) - 1

    def _l2(self, l2_off: int, cached_only: bool) -> tuple[int, ...] | None:
        with self._lock:
            table = self._l2_cache.get(l2_off)
            if table is not None:
                self._l2_cache.move_to_end(l2_off)
                return table
        if cached_only:
            return None
        raw = self._pread(self.cluster_size, l2_off)  # never under the lock: it may block
        table = struct.unpack(f">{self.l2_entries}Q", raw)
        with self._lock:
            self._l2_cache[l2_off] = table
            if len(self._l2_cache) > 64:
                self._l2_cache.popitem(last=False)
        return table

    def _cluster(self, index: int, cached_only: bool) -> memoryview | _Missing | None:
        """The cluster's contents, or None when it reads as zeros; MISSING if ``cached_only``
        and finding out would read the image."""
        with self._lock:
            cached = self._cache.get(index)
            if cached is not None:
                self._cache.move_to_end(index)
                return memoryview(cached)
        l1_index, l2_index = divmod(index, self.l2_entries)
        l1e = self.l1[l1_index] if l1_index < len(self.l1) else 0
        l2_off = l1e & 0x00FFFFFFFFFFFE00
        if not l2_off:
            return None
        table = self._l2(l2_off, cached_only)
        if table is None:
            return MISSING
        entry = table[l2_index]
        if entry & 1 and not entry & (1 << 62):  # v3 "reads as zero"
            return None
        off = entry & 0x00FFFFFFFFFFFE00
        if not entry & (1 << 62) and not off:
            return None
        if cached_only:
            return MISSING
        if entry & (1 << 62):
            coff = entry & self.coffset_mask
            nsect = ((entry >> self.csize_shift) & self.csize_mask) + 1
            csize = nsect * 512 - (coff & 511)
            with self._io as fd:
                comp = os.pread(fd, csize, coff)
            try:
                data = zlib.decompressobj(-15).decompress(comp, self.cluster_size)
            except zlib.error as e:
                raise StoreError(f"{self.name}: corrupt compressed cluster {index}: {e}") from e
            if len(data) < self.cluster_size:
                data += bytes(self.cluster_size - len(data))
        else:
            data = self._pread(self.cluster_size, off)
        with self._lock:
            self._cache[index] = data
            if len(self._cache) > self._cache_max:
                self._cache.popitem(last=False)
        return memoryview(data)

    def _segments(self, offset: int, length: int, cached_only: bool) -> list[memoryview] | None:
        out: list[memoryview] = []
        end = offset + length
        while offset < end:
            index, within = divmod(offset, self.cluster_size)
            n = min(self.cluster_size - within, end - offset)
            cluster = self._cluster(index, cached_only)
            if cluster is None:
                out.extend(_zero_views(n))
            elif isinstance(cluster, _Missing):
                return None
            else:
                out.append(cluster[within : within + n])
            offset += n
        return out

    def segments(self, offset: int, length: int) -> list[memoryview] | None:
        """Only clusters already in memory (finding the rest reads, and maybe inflates, the
        image: that is left to ``read_into`` in the store's threads)."""
        return self._segments(offset, length, cached_only=True)

    def read_cached(self, offset: int, view: memoryview) -> bool:
        return False  # ``borrow`` served what was in memory; the rest reads the image

    def read_into(self, offset: int, view: memoryview) -> None:
        pos = 0
        for seg in self._segments(offset, len(view), cached_only=False) or ():
            view[pos : pos + len(seg)] = seg
            pos += len(seg)

    def close(self) -> None:
        """Closes the image once no read uses it (see ``_Descriptor``)."""
        self._io.close()


_SIZE_RE = re.compile(r"^(\d+)([KMGT]?)(i?B)?$", re.IGNORECASE)


def parse_size(text: str) -> int:
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise ValueError(f"bad size {text!r} (e.g. 512M, 4G)")
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(m.group(1)) * mult


def open_store(spec: str, readonly: bool = False, mapped: bool = False) -> Store:
    """Open a LUN from its command-line form: a path, ``mem:SIZE`` or ``null:SIZE``.
    qcow2 images are detected by their magic and are always read-only."""
    store: Store
    if spec.startswith(("mem:", "null:")):
        kind, _, size = spec.partition(":")
        store = MemoryStore(parse_size(size)) if kind == "mem" else NullStore(parse_size(size))
        store.readonly = readonly
        return store
    try:
        with open(spec, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise StoreError(f"cannot open LUN image {spec}: {e.strerror}") from e
    if magic == QCOW2_MAGIC:
        return Qcow2Store(spec)
    return FileStore(spec, readonly=readonly, mapped=mapped)
