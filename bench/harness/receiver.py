"""The one receiver every sender talks to: the benchmarks, the demo and the tests on the rig.

    python -m bench.harness.receiver --listen HOST:PORT [--cpu N] [--once] [--check sha256|verify]
                             [--chunk BYTES] [--udp]

Prints ``ready PORT`` once it listens. Each accepted TCP connection is read to its end (into a
reused buffer, in its own thread, so N connections are read at once), answered with its byte
count as 8 little-endian bytes, and closed. With ``--once`` it serves a single connection, prints
that connection's report as one JSON line and exits; otherwise it serves until its stdin closes.
``--check sha256`` adds the SHA-256 of the stream to the report; ``--check verify`` checks
``--chunk``-sized chunks written by :func:`fill_chunk` and reports the corrupt ones (a buffer
reused before its release). With ``--udp`` it reads and discards datagrams until stdin closes.

:func:`start_receiver` starts it (in a network namespace too) and waits until it listens.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

from bench.harness.rig import in_namespace

ACK = struct.Struct("<Q")
#: Each chunk of a ``verify`` stream starts with its number.
HEADER = struct.Struct("<Q")
READ_SIZE = 4 << 20
CHECKS = ("discard", "sha256", "verify")
Check = Literal["discard", "sha256", "verify"]
ROOT = Path(__file__).resolve().parents[2]


def chunk_fill(index: int) -> int:
    """The byte value that fills chunk ``index`` after its 8-byte header."""
    return index % 251


def fill_chunk(buf: bytearray | memoryview, index: int) -> None:
    """Write chunk ``index``'s pattern: its number, then one repeated byte value."""
    view = memoryview(buf)
    HEADER.pack_into(view, 0, index)
    view[HEADER.size :] = bytes([chunk_fill(index)]) * (len(view) - HEADER.size)


class ChunkVerifier:
    """Checks a stream of :func:`fill_chunk` chunks as it arrives, in any read sizes."""

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self.buf = bytearray(chunk)
        self.pending = 0
        self.index = 0
        self.corrupt: list[int] = []

    def feed(self, data: memoryview) -> None:
        while data:
            take = min(len(data), self.chunk - self.pending)
            self.buf[self.pending : self.pending + take] = data[:take]
            self.pending += take
            data = data[take:]
            if self.pending == self.chunk:
                (number,) = HEADER.unpack_from(self.buf, 0)
                fill = chunk_fill(self.index)
                body = self.chunk - HEADER.size
                intact = number == self.index and self.buf.count(fill, HEADER.size) == body
                if not intact and len(self.corrupt) < 100:
                    self.corrupt.append(self.index)
                self.index += 1
                self.pending = 0

    def report(self) -> dict[str, object]:
        return {"chunks": self.index, "corrupt": self.corrupt, "partial": self.pending}


def serve_connection(conn: socket.socket, check: str, chunk: int) -> dict[str, object]:
    """Reads ``conn`` to its end, acknowledges the byte count; returns the report."""
    with conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        buf = bytearray(READ_SIZE)
        view = memoryview(buf)
        digest = hashlib.sha256() if check == "sha256" else None
        verifier = ChunkVerifier(chunk) if check == "verify" else None
        total = 0
        while True:
            try:
                n = conn.recv_into(buf)
            except OSError:
                break
            if n == 0:
                break
            total += n
            if digest is not None:
                digest.update(view[:n])
            if verifier is not None:
                verifier.feed(view[:n])
        try:
            conn.sendall(ACK.pack(total))
        except OSError:
            pass  # a sender that closed without waiting for the count
    report: dict[str, object] = {"bytes": total}
    if digest is not None:
        report["sha256"] = digest.hexdigest()
    if verifier is not None:
        report.update(verifier.report())
    return report


def accept_forever(server: socket.socket, check: str, chunk: int) -> None:
    while True:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        thread = threading.Thread(target=serve_connection, args=(conn, check, chunk), daemon=True)
        thread.start()


def discard_datagrams(sock: socket.socket) -> None:
    while True:
        try:
            sock.recv(1 << 16)
        except OSError:
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.harness.receiver")
    parser.add_argument("--listen", required=True, help="HOST:PORT (port 0 picks one)")
    parser.add_argument("--cpu", type=int, default=None, help="pin to this CPU")
    parser.add_argument("--once", action="store_true", help="one connection, then its report")
    parser.add_argument("--check", choices=CHECKS, default="discard")
    parser.add_argument("--chunk", type=int, default=0, help="chunk size for --check verify")
    parser.add_argument("--udp", action="store_true", help="discard datagrams instead")
    args = parser.parse_args(argv)
    if args.check == "verify" and args.chunk <= HEADER.size:
        parser.error(f"--check verify needs --chunk larger than {HEADER.size}")
    if args.udp and (args.once or args.check != "discard"):
        parser.error("--udp only discards, until stdin closes")
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    host, port = args.listen.rsplit(":", 1)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if args.udp:
        server = socket.socket(family, socket.SOCK_DGRAM)
        server.bind((host, int(port)))
        serve = threading.Thread(target=discard_datagrams, args=(server,), daemon=True)
    else:
        server = socket.create_server((host, int(port)), family=family, backlog=256)
        serve = threading.Thread(
            target=accept_forever, args=(server, args.check, args.chunk), daemon=True
        )
    print(f"ready {server.getsockname()[1]}", flush=True)
    if args.once:
        conn, _ = server.accept()
        server.close()
        print(json.dumps(serve_connection(conn, args.check, args.chunk)), flush=True)
        return 0
    serve.start()
    sys.stdin.read()  # serve until whoever started us closes our stdin
    server.close()
    return 0


@dataclass
class Receiver:
    """A running receiver process, listening at ``host``:``port``."""

    process: subprocess.Popen[str]
    host: str
    port: int

    def report(self, timeout: float = 60) -> dict[str, object]:
        """Wait for a ``once`` receiver to finish; its report (raises if it failed)."""
        try:
            out, err = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        if self.process.returncode != 0:
            raise RuntimeError(f"the receiver failed ({self.process.returncode}): {err.strip()}")
        report: dict[str, object] = json.loads(out.strip().splitlines()[-1])
        return report

    def stop(self) -> None:
        """Close its stdin (a serving receiver then exits) and wait for it."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            self.kill()  # do not wait for a stream that may never end
        else:
            self.stop()


def start_receiver(
    host: str,
    port: int = 0,
    *,
    namespace: str | None = None,
    cpu: int | None = None,
    once: bool = False,
    check: Check = "discard",
    chunk: int = 0,
    udp: bool = False,
) -> Receiver:
    """Start the receiver (inside network ``namespace`` if given); returns once it listens."""
    argv = [sys.executable, "-m", "bench.harness.receiver", "--listen", f"{host}:{port}"]
    argv += ["--check", check, "--chunk", str(chunk)]
    if cpu is not None:
        argv += ["--cpu", str(cpu)]
    if once:
        argv.append("--once")
    if udp:
        argv.append("--udp")
    process = subprocess.Popen(
        in_namespace(namespace, argv),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,  # where ``python -m bench.harness.receiver`` finds the bench package
    )
    assert process.stdout is not None
    line = process.stdout.readline().split()
    if len(line) != 2 or line[0] != "ready":
        process.kill()
        _, err = process.communicate()
        raise RuntimeError(f"the receiver did not start: {' '.join(line)} {err.strip()}")
    return Receiver(process, host, int(line[1]))


if __name__ == "__main__":
    sys.exit(main())
