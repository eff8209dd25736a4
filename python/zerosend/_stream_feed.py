"""The reading half of a zerosend stream: the socket read into an ``asyncio.StreamReader``."""

from __future__ import annotations

import asyncio
import socket
from typing import Final

#: The largest read of one readiness event (asyncio reads 256 KiB).
READ_SIZE: Final = 256 << 10


class _SocketFeed(asyncio.ReadTransport):
    """Reads the socket into a StreamReader, which pauses and resumes it (its flow control).

    It reads the caller's socket object while the driver sends through its own duplicate of the
    descriptor, so reading never waits for sends, nor sends for reading.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, reader: asyncio.StreamReader
    ) -> None:
        super().__init__()
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._reader = reader
        self._reading = False
        self._done = False
        reader.set_transport(self)
        self.resume_reading()

    def is_reading(self) -> bool:
        return self._reading

    def pause_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def resume_reading(self) -> None:
        if not self._reading and not self._done:
            self._loop.add_reader(self._fd, self._read_ready)
            self._reading = True

    def is_closing(self) -> bool:
        return self._done

    def close(self) -> None:
        """Stops reading for good; what was read stays readable, then the reader sees EOF."""
        if not self._done:
            self._stop()
            self._reader.feed_eof()

    def _stop(self) -> None:
        self.pause_reading()
        self._done = True

    def _read_ready(self) -> None:
        try:
            data = self._sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._stop()
            self._reader.set_exception(exc)
            return
        if data:
            self._reader.feed_data(data)
        else:
            self._stop()
            self._reader.feed_eof()
