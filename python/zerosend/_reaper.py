"""The reaper: one background thread that finishes the sends of drivers whose loop is gone."""

from __future__ import annotations

import contextlib
import os
import select
import threading

from . import _native


class Reaper:
    """One background thread for every driver whose event loop is gone.

    Such a driver may still have sends in flight: their buffers must stay exported until the
    kernel releases them, and only then may the driver's io_uring, timer and socket duplicates
    close. The thread waits on the drivers' descriptors, reaps their completions without
    touching the dead loops (the futures keep no outcome) and lets each driver go once its last
    send was released. A driver with nothing in flight is closed at once.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._drivers: set[_native.Driver] = set()
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = -1, -1

    def adopt(self, driver: _native.Driver) -> None:
        reap = getattr(driver, "reap_orphaned", None)
        if reap is None:
            return  # the pure-Python stand-in: it copies, nothing waits on a release
        try:
            if reap() == 0:
                return
        except Exception:
            return  # nothing more can be reaped from it; it stays as it is
        with self._lock:
            self._drivers.add(driver)
            if self._thread is None:
                self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
                self._thread = threading.Thread(
                    target=self._run, name="zerosend-reaper", daemon=True
                )
                self._thread.start()
            else:
                with contextlib.suppress(BlockingIOError):  # a full pipe wakes it already
                    os.write(self._wake_w, b"\0")

    def _run(self) -> None:
        while True:
            with self._lock:
                watched = {driver.fileno(): driver for driver in self._drivers}
                wake = self._wake_r
            poller = select.poll()
            poller.register(wake, select.POLLIN)
            for fd in watched:
                poller.register(fd, select.POLLIN)
            ready = poller.poll()  # no timeout: a release makes the driver's fd readable
            for fd, _events in ready:
                if fd == wake:
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake, 4096)
                    continue
                driver = watched[fd]
                try:
                    left = driver.reap_orphaned()
                except Exception:
                    # Reaping failed for good (a DEFER_TASKRUN ring only takes its own thread's
                    # calls): stop watching it rather than spin; it stays as it is.
                    left = 0
                if left == 0:
                    with self._lock:
                        self._drivers.discard(driver)

    def _after_fork_in_child(self) -> None:
        # The thread did not survive the fork and the drivers belong to the parent.
        self._reset()


_reaper = Reaper()
os.register_at_fork(after_in_child=_reaper._after_fork_in_child)


def adopt(driver: _native.Driver) -> None:
    """Hands over the driver of an event loop that is gone (see :class:`Reaper`)."""
    _reaper.adopt(driver)
