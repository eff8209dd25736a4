"""Type stubs of the Rust extension (checked against it with mypy's stubtest)."""

import sys
from collections.abc import Callable, Generator, Iterator
from typing import Any, Final, Literal, final, overload

from zerosend._errors import BackendUnavailableError as BackendUnavailableError

if sys.version_info >= (3, 12):
    from collections.abc import Buffer
else:
    from typing_extensions import Buffer

__all__ = [
    "BACKENDS",
    "STATS_KEYS",
    "BackendUnavailableError",
    "Capabilities",
    "CompletedSend",
    "Driver",
    "IscsiReadPath",
    "PoolBuffer",
    "PoolMemory",
    "SendResult",
    "capabilities",
    "crc32c",
]

#: The backends, best first ("auto" picks among them).
BACKENDS: Final[tuple[str, ...]]
#: The names of a socket's counters (``Socket.stats``), in the core's order.
STATS_KEYS: Final[tuple[str, ...]]

@final
class CompletedSend:
    """The outcome of a send that finished inside its call: awaiting it returns (or raises) at
    once, and it has the methods of a done ``asyncio.Future``."""

    _asyncio_future_blocking: bool
    # At run time __await__ and __iter__ return the object itself, which ends the await at its
    # first __next__; typed as the generator it stands for.
    def __await__(self) -> Generator[Any, None, SendResult]: ...
    def __iter__(self) -> Generator[Any, None, SendResult]: ...
    def __next__(self) -> Any: ...
    def done(self) -> bool: ...
    def cancelled(self) -> bool: ...
    def cancel(self, msg: Any = None) -> bool: ...
    def result(self) -> SendResult: ...
    def exception(self) -> BaseException | None: ...
    def add_done_callback(
        self, callback: Callable[[Any], object], *, context: Any = None
    ) -> None: ...
    def remove_done_callback(self, callback: Callable[[Any], object]) -> int: ...
    def get_loop(self) -> Any: ...

@final
class SendResult:
    """How a send ended: bytes sent, and whether the kernel really avoided the copy.

    It unpacks like a tuple: ``nbytes, zerocopy = result``."""

    __match_args__: Final = ("nbytes", "zerocopy")
    @property
    def nbytes(self) -> int: ...
    @property
    def zerocopy(self) -> bool: ...
    def __new__(cls, nbytes: int, zerocopy: bool) -> SendResult: ...
    def __eq__(self, value: object, /) -> bool: ...
    def __ne__(self, value: object, /) -> bool: ...
    __hash__: None  # type: ignore[assignment]
    def __len__(self) -> Literal[2]: ...
    @overload
    def __getitem__(self, index: Literal[0, -2], /) -> int: ...
    @overload
    def __getitem__(self, index: Literal[1, -1], /) -> bool: ...
    @overload
    def __getitem__(self, index: int, /) -> int | bool: ...
    def __iter__(self) -> Iterator[int]: ...

@final
class Capabilities:
    """What the running kernel offers for zero-copy transmit, with reasons for each False."""

    @property
    def kernel(self) -> str: ...
    @property
    def io_uring_send_zc(self) -> bool: ...
    @property
    def io_uring_send_zc_reason(self) -> str | None: ...
    @property
    def msg_zerocopy(self) -> bool: ...
    @property
    def msg_zerocopy_reason(self) -> str | None: ...

@final
class Driver:
    """The core driver of one event loop (use zerosend.wrap, not this class)."""

    def __new__(cls) -> Driver: ...
    @property
    def forked(self) -> bool: ...
    def fileno(self) -> int: ...
    def register(self, fd: int, backend: str | None, zerocopy_threshold: int) -> int: ...
    def submit(self, socket: int, buffers: Any, zerocopy: bool, event_loop: Any) -> Any: ...
    def submit_file(
        self, socket: int, fd: int, offset: int, count: int | None, event_loop: Any
    ) -> Any: ...
    def flush(self) -> None: ...
    def watch_ring(self) -> int: ...
    def dispatch(self) -> None: ...
    def dispatch_ring(self) -> None: ...
    def drain(self, socket: int, future: Any) -> None: ...
    def close(self, socket: int) -> None: ...
    def backend(self, socket: int) -> str: ...
    def fallback_reason(self, socket: int) -> str | None: ...
    def inflight(self, socket: int) -> int: ...
    def stats(self, socket: int) -> dict[str, int]: ...
    def register_pool(self, pool: PoolMemory) -> None: ...
    def unregister_pool(self, pool: PoolMemory) -> None: ...

@final
class PoolMemory:
    """A locked, page-aligned region holding ``count`` buffers of ``size`` bytes."""

    def __new__(cls, count: int, size: int, hugepages: bool = False) -> PoolMemory: ...
    @property
    def count(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def hugepages(self) -> bool: ...
    @property
    def hugepages_fallback(self) -> str | None: ...
    def buffer(self, index: int, on_free: Callable[[int], object]) -> PoolBuffer: ...

@final
class PoolBuffer:
    """One writable pool buffer; fill it through ``memoryview(buf)``."""

    @property
    def index(self) -> int: ...
    @property
    def released(self) -> bool: ...
    def release(self) -> None: ...
    def __len__(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...

def capabilities() -> Capabilities:
    """Probe the running kernel now."""

def crc32c(data: Buffer, value: int = 0) -> int:
    """CRC32C (Castagnoli) of a bytes-like object, continuing from ``value`` (0 to start)."""

@final
class _ReadRun:
    """What one ``IscsiReadPath.serve`` call did (its runtime name is ``ReadRun``; it is not a
    module attribute)."""

    @property
    def start(self) -> int: ...
    @property
    def pos(self) -> int: ...
    @property
    def expcmdsn(self) -> int: ...
    @property
    def statsn(self) -> int: ...
    @property
    def maxcmdsn(self) -> int: ...
    @property
    def commands(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def large(self) -> bool: ...
    @property
    def need(self) -> int: ...
    @property
    def send_from(self) -> int: ...
    @property
    def send_len(self) -> int: ...

@final
class IscsiReadPath:
    """One LUN's READ path on one connection: the inner loop of the target's READ path."""

    def __new__(
        cls,
        fd: int,
        lun: bytes,
        block_size: int,
        blocks: int,
        max_len: int,
        zc_min: int,
        refer_min: int,
    ) -> IscsiReadPath: ...
    def serve(
        self, rx: Any, start: int, end: int, out: Any, pos: int, sn: tuple[int, int, int]
    ) -> _ReadRun: ...
    @staticmethod
    def encode_data_in(
        flags: int,
        status: int,
        data_len: int,
        lun: bytes,
        itt: int,
        statsn: int,
        expcmdsn: int,
        maxcmdsn: int,
        datasn: int,
        offset: int,
        residual: int,
    ) -> bytes:
        """A whole iSCSI Data-In header (48 bytes)."""

    @staticmethod
    def encode_scsi_response(
        flags: int,
        status: int,
        data_len: int,
        itt: int,
        statsn: int,
        expcmdsn: int,
        maxcmdsn: int,
        expdatasn: int,
        residual: int,
    ) -> bytes:
        """A whole iSCSI SCSI Response header (48 bytes)."""
