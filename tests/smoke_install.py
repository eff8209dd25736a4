"""Checks an installed zerosend: wraps a real TCP pair, sends with send_zc, checks the bytes and
the result. Prints one JSON line (where zerosend was imported from, its version, the backend).

Run with the Python of the environment under test, outside the source tree:
    python tests/smoke_install.py [--expect-native]

``--expect-native`` fails the run if the native extension did not load.
"""

import asyncio
import json
import socket
import sys

import zerosend

PAYLOAD = bytes(range(256)) * 256  # 64 KiB


async def main() -> dict[str, object]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
    client.setblocking(False)
    zs = zerosend.wrap(client)
    result = await zs.send_zc(bytearray(PAYLOAD))
    backend, reason = zs.backend, zs.fallback_reason
    await zs.aclose()
    received = bytearray()
    with peer:
        while chunk := peer.recv(1 << 16):
            received += chunk
    assert received == PAYLOAD, f"received {len(received)} bytes, not the {len(PAYLOAD)} sent"
    assert result == zerosend.SendResult(len(PAYLOAD), False), result  # loopback copies
    return {
        "file": zerosend.__file__,
        "version": zerosend.__version__,
        "native": zerosend._native.__name__ == "zerosend._native",
        "backend": backend,
        "fallback_reason": reason,
    }


if __name__ == "__main__":
    facts = asyncio.run(main())
    print(json.dumps(facts))
    if "--expect-native" in sys.argv and not facts["native"]:
        sys.exit(f"the native extension did not load: {zerosend.capabilities()!r}")
