"""What the image store's dirty span decides: which flush must sync. A write marks its span
dirty, so the next flush covering it syncs; a sync that failed (the device lost the data)
leaves its span dirty, so the next flush syncs again instead of answering at once: SYNCHRONIZE
CACHE must not answer GOOD for data no sync made durable.

The image lies on the FUSE file system of ``gatedfs``, which counts the fsyncs that reached
the device and can fail them.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from gatedfs import GatedFile
from test_iscsi_diskio import mounted_gate

from zerosend.iscsi.storage.file import FileStore

MiB = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> Iterator[GatedFile]:
    with mounted_gate(tmp_path, random.Random(43).randbytes(1 * MiB)) as fs:
        yield fs


@pytest.mark.timeout(60)
def test_a_write_is_synced_by_the_next_flush_that_covers_it(image: GatedFile) -> None:
    store = FileStore(str(image.path))
    try:
        store.flush()  # the image is clean
        assert store.unsynced is None
        syncs = image.syncs
        store.flush()
        assert image.syncs == syncs, "a flush with nothing written synced"
        store.write(8192, os.urandom(4096))
        assert store.unsynced == (8192, 12288)
        store.flush(0, 4096)  # another range: nothing to sync there
        assert image.syncs == syncs
        store.flush(8192, 512)
        assert image.syncs == syncs + 1 and store.unsynced is None
    finally:
        store.close()


@pytest.mark.timeout(60)
def test_a_failed_sync_leaves_its_span_for_the_next_flush(image: GatedFile) -> None:
    store = FileStore(str(image.path))
    try:
        store.flush()
        store.write(0, os.urandom(4096))
        image.fail_syncs = True
        with pytest.raises(OSError):
            store.flush()
        assert store.unsynced == (0, 4096), "a failed sync made its span look durable"
        image.fail_syncs = False
        syncs = image.syncs
        store.flush()
        assert image.syncs == syncs + 1, "the flush after a failed sync did not sync again"
        assert store.unsynced is None
    finally:
        store.close()
