"""qcow2 images, served read-only: compressed clusters inflated into immutable buffers."""

from __future__ import annotations

import os
import struct
import threading
import zlib
from collections import OrderedDict

from .store import BLOCK_SIZE, Store, StoreError, _Descriptor, _zero_views

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
