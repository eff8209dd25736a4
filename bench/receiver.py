"""The one receiver every sender in the benchmark talks to.

    python -m bench.receiver --listen HOST:PORT [--cpu N]

Prints ``ready PORT`` once it listens, then serves until stdin closes: each accepted connection
is read to its end (into a reused buffer, nothing kept), then answered with the byte count as
8 little-endian bytes and closed. One thread per connection, so N connections are read at once.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
import threading

ACK = struct.Struct("<Q")
READ_SIZE = 4 << 20


def serve_connection(conn: socket.socket) -> None:
    with conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        buf = bytearray(READ_SIZE)
        total = 0
        while True:
            try:
                n = conn.recv_into(buf)
            except OSError:
                return
            if n == 0:
                break
            total += n
        try:
            conn.sendall(ACK.pack(total))
        except OSError:
            return


def accept_forever(server: socket.socket) -> None:
    while True:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        threading.Thread(target=serve_connection, args=(conn,), daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.receiver")
    parser.add_argument("--listen", required=True, help="HOST:PORT (port 0 picks one)")
    parser.add_argument("--cpu", type=int, default=None, help="pin to this CPU")
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    host, port = args.listen.rsplit(":", 1)
    server = socket.create_server((host, int(port)), backlog=256)
    print(f"ready {server.getsockname()[1]}", flush=True)
    threading.Thread(target=accept_forever, args=(server,), daemon=True).start()
    sys.stdin.read()  # serve until whoever started us closes our stdin
    server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
