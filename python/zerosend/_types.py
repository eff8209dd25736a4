"""The types of zerosend's API that are not classes of their own: buffers, send awaitables,
fallback codes."""

from __future__ import annotations

import enum
import sys
from collections.abc import Generator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, runtime_checkable

from ._native import SendResult

if sys.version_info >= (3, 12):
    from collections.abc import Buffer as Buffer
elif TYPE_CHECKING:
    from typing_extensions import Buffer as Buffer
else:
    # Python 3.11 has no Buffer ABC and zerosend does not depend on typing_extensions; only
    # type checkers read the alias, and they see typing_extensions' (bundled with them).
    Buffer = Any

#: One buffer of a send, or several sent as one (vectored) send: one datagram on UDP.
Buffers: TypeAlias = "Buffer | Sequence[Buffer]"


@runtime_checkable
class SendFuture(Protocol):
    """What ``send_zc()``, ``send()``, ``send_file()`` and ``StreamWriter.write_zc()`` return:
    ``await`` it for the :class:`SendResult` (or the send's error).

    On asyncio it is a native ``InFlightSend`` when the send is still in the kernel's hands (an
    asyncio-compatible future: ``asyncio.isfuture`` is true, tasks, ``gather``, ``wait``,
    ``wait_for`` and ``shield`` take it; cancelling it does not stop the send); a
    ``CompletedSend`` (done already, with the methods of a done future, awaited without
    yielding) when the kernel took it whole inside the call; under trio, a future trio can
    await. All have the methods below.
    """

    def __await__(self) -> Generator[Any, None, SendResult]: ...

    def done(self) -> bool: ...

    def cancelled(self) -> bool: ...

    def result(self) -> SendResult: ...

    def exception(self) -> BaseException | None: ...


class FallbackCode(enum.StrEnum):
    """Why ``backend="auto"`` gave a socket a lesser backend (``Socket.fallback_code``), as a
    value a program can switch on; ``Socket.fallback_reason`` says the same in words."""

    #: The peer is on this host: local delivery copies every zero-copy send anyway.
    PEER_ON_THIS_HOST = "peer_on_this_host"
    #: UDP with a zero-copy threshold above the largest datagram: no send could go zero-copy.
    DATAGRAM_BELOW_THRESHOLD = "datagram_below_threshold"
    #: The kernel refused a better backend (too old, disabled by sysctl or seccomp, a socket
    #: option refused, ...).
    KERNEL_REFUSED = "kernel_refused"
    #: The native extension is not there (another OS or architecture, a build without Rust):
    #: the pure-Python copy backend sends.
    NO_EXTENSION = "no_extension"


def fallback_code(reason: str | None, native: bool) -> FallbackCode | None:
    """The code of a socket's fallback reason (None for None)."""
    if reason is None:
        return None
    if not native:
        return FallbackCode.NO_EXTENSION
    # The core's wording of its two choices by rule (rust/zerosend/src/driver/choice.rs);
    # every other reason lists the kernel's refusals.
    if reason.startswith("the peer is on this host"):
        return FallbackCode.PEER_ON_THIS_HOST
    if reason.startswith("a datagram holds at most"):
        return FallbackCode.DATAGRAM_BELOW_THRESHOLD
    return FallbackCode.KERNEL_REFUSED
