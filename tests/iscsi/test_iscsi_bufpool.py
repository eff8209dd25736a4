"""The target's transmit buffer pool on its own: a buffer is held by one holder at a time, and
what sessions hold plus what is free is always the whole pool, whatever the order of takes,
waits, releases and session ends (random histories, invariants checked after every step).

The READ path's tests (``test_iscsi_leases.py``) show the same rule end to end through a
stalled connection; these show it without a network, in milliseconds."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from zerosend.iscsi.wire.bufpool import MmapLease, MmapPool, PoolShare


def address(lease: MmapLease) -> int:
    """Where the lease's memory starts (two leases of one buffer share it)."""
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(lease.view))


def test_every_lease_is_its_own_memory() -> None:
    pool = MmapPool(4, 4096)
    share = pool.share(4)
    leases = [share.try_acquire() for _ in range(4)]
    assert all(lease is not None for lease in leases)
    held = [lease for lease in leases if lease is not None]
    assert len({address(lease) for lease in held}) == 4
    assert pool.available == 0
    assert share.try_acquire() is None
    for n, lease in enumerate(held):  # each buffer keeps what its holder wrote
        lease.view[:] = bytes([n]) * len(lease.view)
    assert [lease.view[0] for lease in held] == [0, 1, 2, 3]
    for lease in held:
        lease.release()
    assert pool.available == 4 and share.held == 0


def test_a_released_buffer_goes_to_the_waiting_session_that_holds_fewest() -> None:
    async def main() -> None:
        pool = MmapPool(2, 4096)
        rich, poor = pool.share(2), pool.share(2)
        first, second = rich.try_acquire(), rich.try_acquire()
        assert first is not None and second is not None
        rich_waits = asyncio.ensure_future(rich.acquire())
        poor_waits = asyncio.ensure_future(poor.acquire())
        await asyncio.sleep(0)
        first.release()
        got = await asyncio.wait_for(poor_waits, 5)
        assert got is first and got.owner is poor and not rich_waits.done()
        rich_waits.cancel()
        second.release()
        got.release()
        assert pool.available == 2

    asyncio.run(main())


STEP = st.tuples(
    st.sampled_from(["take", "wait", "release", "cancel", "close"]),
    st.integers(0, 2),  # which session
    st.integers(0, 7),  # which lease or wait
)
OPS = st.lists(STEP, max_size=60)


@settings(max_examples=150, deadline=None)
@given(count=st.integers(1, 4), caps=st.lists(st.integers(1, 4), min_size=3, max_size=3),
       ops=OPS)  # fmt: skip
def test_random_histories_never_share_a_buffer(count: int, caps: list[int], ops) -> None:
    async def main() -> None:
        pool = MmapPool(count, 4096)
        shares = [pool.share(cap) for cap in caps]
        held: list[tuple[PoolShare, MmapLease]] = []
        waits: list[tuple[PoolShare, asyncio.Task[MmapLease]]] = []

        def settle() -> None:
            for share, task in list(waits):
                if task.done():
                    waits.remove((share, task))
                    if not task.cancelled():
                        held.append((share, task.result()))

        def check() -> None:
            mine = [lease for _, lease in held]
            assert len({id(lease) for lease in mine}) == len(mine), "one buffer, two holders"
            assert len({address(lease) for lease in mine}) == len(mine)
            free = list(pool._free)
            assert not set(map(id, free)) & set(map(id, mine)), "a held buffer is free"
            assert len(free) + len(mine) == count, "a buffer was lost or made twice"
            for share in shares:
                assert share.held == sum(1 for s, _ in held if s is share) <= share.cap

        for op, who, n in ops:
            share = shares[who]
            if op == "take":
                lease = share.try_acquire()
                if lease is not None:
                    held.append((share, lease))
            elif op == "wait":
                waits.append((share, asyncio.ensure_future(share.acquire())))
            elif op == "release" and held:
                _, lease = held.pop(n % len(held))
                lease.release()
            elif op == "cancel" and waits:
                waits[n % len(waits)][1].cancel()
            elif op == "close":
                share.close()
            for _ in range(3):
                await asyncio.sleep(0)
            settle()
            check()
        for _, task in waits:
            task.cancel()
        await asyncio.sleep(0)
        settle()
        for _, lease in held:
            lease.release()
        held.clear()
        check()
        assert pool.available == count

    asyncio.run(main())
