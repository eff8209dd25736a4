"""Misuses zerosend's API; mypy --strict must reject every line marked ``# rejected``
(tests/test_api_types.py checks it reports those lines and no others)."""

from __future__ import annotations

import zerosend


async def misuse(zs: zerosend.Socket, writer: zerosend.StreamWriter) -> None:
    await zs.send_zc("a str is not a buffer")  # rejected
    await zs.send("neither here")  # rejected
    await zs.send_zc(["nor", "in", "a", "list"])  # rejected
    await zs.send_zc(42)  # rejected
    writer.write_zc("nor to a stream")  # rejected
    writer.write("nor a copy")  # rejected
    result = await zs.send_zc(b"fine")
    nbytes: str = result.nbytes  # rejected
    count, _zerocopy = result
    count.upper()  # rejected
    print(nbytes)
