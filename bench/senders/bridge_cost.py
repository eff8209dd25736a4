"""What a thread hop per send would cost.

zerosend resolves finished sends' futures on the loop thread, in one batch per wake-up of the
driver's descriptor. A tokio-to-asyncio bridge (pyo3-async-runtimes) completes each awaited Rust
future on a runtime thread and hands the result over with loop.call_soon_threadsafe. This
measures both hand-overs for N futures, with a long-lived worker thread standing in for tokio.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time

N = 200_000
BATCH = 32


async def in_loop() -> float:
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    for _ in range(N // BATCH):
        futures = [loop.create_future() for _ in range(BATCH)]
        for future in futures:  # the driver's dispatch() does this for one wake-up
            future.set_result(None)
        for future in futures:
            await future
    return (time.perf_counter() - start) / N


async def thread_hop() -> float:
    loop = asyncio.get_running_loop()
    work: queue.SimpleQueue[list[asyncio.Future[None]] | None] = queue.SimpleQueue()

    def runtime_thread() -> None:
        while (futures := work.get()) is not None:
            for future in futures:  # one hand-over per completed Rust future
                loop.call_soon_threadsafe(future.set_result, None)

    worker = threading.Thread(target=runtime_thread)
    worker.start()
    start = time.perf_counter()
    for _ in range(N // BATCH):
        futures = [loop.create_future() for _ in range(BATCH)]
        work.put(futures)
        for future in futures:
            await future
    elapsed = time.perf_counter() - start
    work.put(None)
    worker.join()
    return elapsed / N


def main() -> None:
    for _ in range(3):
        a = asyncio.run(in_loop())
        b = asyncio.run(thread_hop())
        print(
            f"in-loop: {a * 1e6:.2f} us/future  thread hop: {b * 1e6:.2f} us/future  ({b / a:.1f}x)"
        )


if __name__ == "__main__":
    main()
