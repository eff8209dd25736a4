"""The trio face of the driver: a driver per trio run, watched by a system task.

asyncio gets ``loop.add_reader``; trio gets a system task per descriptor of the driver (its epoll
set, and its io_uring once it has one) that waits with ``trio.lowlevel.wait_readable`` and reaps
completions on the run's own thread.
Sends resolve :class:`TrioFuture` objects, which trio can await. trio is imported only here, and
this module only once :func:`zerosend.wrap` found itself running under trio.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from typing import Any

import trio

from . import _native

_driver_var: trio.lowlevel.RunVar[_native.Driver | None] = trio.lowlevel.RunVar(
    "zerosend_driver", default=None
)
_log = logging.getLogger("zerosend")


class TrioFuture:
    """The outcome of one send (or drain) under trio: ``await`` it for the result.

    Like an asyncio future, it has ``done()``, ``result()`` and ``exception()``; awaiting it
    from a task that gets cancelled leaves the send running, as on asyncio.
    """

    __slots__ = ("_done", "_error", "_event", "_value")

    def __init__(self) -> None:
        self._done = False
        self._value: Any = None
        self._error: BaseException | None = None
        self._event: trio.Event | None = None

    def done(self) -> bool:
        return self._done

    def cancelled(self) -> bool:
        return False

    def set_result(self, value: Any) -> None:
        self._finish(value, None)

    def set_exception(self, error: BaseException) -> None:
        self._finish(None, error)

    def _finish(self, value: Any, error: BaseException | None) -> None:
        if self._done:
            raise RuntimeError("this zerosend future already has its outcome")
        self._value, self._error, self._done = value, error, True
        if self._event is not None:
            self._event.set()

    def result(self) -> Any:
        if not self._done:
            raise RuntimeError("the send has not finished; await it first")
        if self._error is not None:
            raise self._error
        return self._value

    def exception(self) -> BaseException | None:
        if not self._done:
            raise RuntimeError("the send has not finished; await it first")
        return self._error

    async def _wait(self) -> Any:
        if not self._done:
            if self._event is None:
                self._event = trio.Event()
            await self._event.wait()
        return self.result()

    def __await__(self) -> Generator[Any, None, Any]:
        return self._wait().__await__()


class TrioLoop:
    """What :class:`zerosend.Socket` needs from its event loop, on the current trio run."""

    __slots__ = ("_token",)

    def __init__(self) -> None:
        self._token = trio.lowlevel.current_trio_token()

    def create_future(self) -> Any:
        return TrioFuture()

    def call_soon(self, callback: Callable[[], object]) -> None:
        # Runs after the tasks already scheduled: every send of this turn goes in one flush.
        self._token.run_sync_soon(callback)

    def add_reader(self, fd: int, callback: Callable[[], object]) -> None:
        trio.lowlevel.spawn_system_task(_watch, fd, callback, name="zerosend driver")


def driver_for_run() -> tuple[TrioLoop, _native.Driver]:
    """The current trio run's driver (created, and watched, on first use) and its loop face."""
    driver = _driver_var.get()
    if driver is None or driver.forked:
        driver = _native.Driver()
        TrioLoop().add_reader(driver.fileno(), driver.dispatch)
        _driver_var.set(driver)
    return TrioLoop(), driver


async def _watch(fd: int, dispatch: Callable[[], object]) -> None:
    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            dispatch()
        except Exception:
            # As asyncio does for a failing reader callback: log it and keep serving.
            _log.exception("zerosend: processing the kernel's completions failed")
