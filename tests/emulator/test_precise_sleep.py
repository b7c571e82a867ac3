"""precise_sleep: sub-millisecond sleeps on a timerfd, not on epoll's rounded-up deadline."""

from __future__ import annotations

import trio

from emulator import precise_sleep as ps
from emulator.precise_sleep import precise_sleep
from emulator.testing.harness import RoundedWaits


async def test_the_harness_sees_trios_own_short_sleep_rounded() -> None:
    """The instrument catches what the old code did (a check of the check)."""
    waits = RoundedWaits()
    trio.lowlevel.add_instrument(waits)
    try:
        await trio.sleep(50e-6)
    finally:
        trio.lowlevel.remove_instrument(waits)
    assert waits.timeouts


async def test_a_50us_sleep_gives_epoll_no_sub_millisecond_deadline() -> None:
    assert ps.timerfd_available()
    waits = RoundedWaits()
    trio.lowlevel.add_instrument(waits)
    started = trio.current_time()
    try:
        for _ in range(20):
            await precise_sleep(50e-6)
    finally:
        trio.lowlevel.remove_instrument(waits)
    assert waits.timeouts == []
    assert trio.current_time() - started >= 20 * 50e-6  # it did sleep


async def test_zero_and_negative_sleeps_are_a_checkpoint() -> None:
    with trio.CancelScope() as scope:
        scope.cancel()
        await precise_sleep(0)  # a checkpoint: raises Cancelled, caught by the scope
        raise AssertionError("not a checkpoint")
    await precise_sleep(-1)


async def test_sleepers_at_the_same_time_each_sleep_their_own_time() -> None:
    slept: dict[int, float] = {}

    async def sleeper(index: int) -> None:
        started = trio.current_time()
        await precise_sleep(0.002 * (index + 1))
        slept[index] = trio.current_time() - started

    async with trio.open_nursery() as nursery:
        for index in range(12):
            nursery.start_soon(sleeper, index)
    assert sorted(slept) == list(range(12))
    assert all(slept[index] >= 0.002 * (index + 1) for index in slept), slept
    assert len(ps._free) <= ps._KEEP_FREE  # the pool keeps a few, closes the rest


async def test_a_cancelled_sleep_returns_its_timer_disarmed() -> None:
    with trio.move_on_after(0.002):
        await precise_sleep(0.01)
    assert ps._free
    fd = ps._free[-1]
    await trio.sleep(0.03)  # past the cancelled sleep's deadline
    assert not ps._expired(fd)  # disarmed when it came back: it never fired
    started = trio.current_time()
    await precise_sleep(0.05)
    assert trio.current_time() - started >= 0.05
