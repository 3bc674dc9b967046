"""The n-weighted adaptive limiter on its own: weights, fairness, 1303, 1302, growth.

Where a rule is about time (the fairness window, the pause after a 1303, the
spacing after a 1302), the limiter reads an injected :class:`Clock` that the test
moves, rather than the test sleeping for real.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from kling_async import ConcurrencyLimiter, ConcurrencyLimitError, RateLimitError, ServerError
from tests.helpers import Clock, eventually

QUOTA_FULL = ConcurrencyLimitError("full", code=1303, http_status=429)
TOO_FAST = RateLimitError("slow down", code=1302, http_status=429)


async def admitted(limiter: ConcurrencyLimiter, units: int, within: float = 0.05) -> bool:
    """Whether an acquire of ``units`` succeeds within ``within`` seconds (it keeps them)."""
    try:
        await asyncio.wait_for(limiter.acquire(units), within)
    except asyncio.TimeoutError:
        return False
    return True


async def test_units_are_weighted_by_n() -> None:
    limiter = ConcurrencyLimiter(10)
    assert await admitted(limiter, 6)
    assert not await admitted(limiter, 5)
    assert await admitted(limiter, 4)
    assert limiter.in_use == 10
    limiter.release(6)
    assert await admitted(limiter, 5)
    assert limiter.in_use == 9


async def test_a_waiter_is_admitted_when_units_come_back() -> None:
    limiter = ConcurrencyLimiter(3)
    await limiter.acquire(3)
    waiter = asyncio.create_task(limiter.acquire(2))
    await eventually(lambda: limiter.waiting == 1)  # queued
    assert not waiter.done()
    limiter.release(3)
    await asyncio.wait_for(waiter, 1)
    assert limiter.in_use == 2


async def test_small_tasks_may_pass_a_large_one_only_within_the_fairness_window() -> None:
    clock = Clock(0.0)
    limiter = ConcurrencyLimiter(10, fairness_window=0.2, clock=clock)
    await limiter.acquire(5)
    large = asyncio.create_task(limiter.acquire(9))
    await eventually(lambda: limiter.waiting == 1)  # queued
    assert await admitted(limiter, 2)  # fits beside the waiting 9: may pass it for now
    clock.now += 0.25
    assert not await admitted(limiter, 1)  # the 9 has waited long enough: nobody passes
    limiter.release(5)
    limiter.release(2)
    await asyncio.wait_for(large, 1)
    assert limiter.in_use == 9


async def test_a_large_task_is_not_starved_by_a_stream_of_small_ones() -> None:
    clock = Clock(0.0)
    limiter = ConcurrencyLimiter(10, fairness_window=0.1, clock=clock)
    stop = asyncio.Event()

    async def small_stream() -> None:
        while not stop.is_set():
            await limiter.acquire(1)
            await asyncio.sleep(0.01)
            limiter.release(1)

    streams = [asyncio.create_task(small_stream()) for _ in range(12)]
    await asyncio.sleep(0.05)
    large = asyncio.create_task(limiter.acquire(9))
    await asyncio.sleep(0.05)  # small ones overtake it, within the window
    clock.now += 0.1  # the window is over
    started = time.monotonic()
    await asyncio.wait_for(large, 2)
    waited = time.monotonic() - started
    stop.set()
    limiter.release(9)
    await asyncio.gather(*streams)
    assert waited < 0.4  # the time for the small tasks to drain


async def test_a_task_larger_than_the_limit_runs_alone() -> None:
    # The quota is unknown and the limit starts small: a large task still goes,
    # alone, since the limit is only a guess.
    limiter = ConcurrencyLimiter(None)
    assert limiter.limit < 9
    await limiter.acquire(2)
    big = asyncio.create_task(limiter.acquire(9))
    await eventually(lambda: limiter.waiting == 1)  # queued
    assert not big.done()
    limiter.release(2)
    await asyncio.wait_for(big, 1)
    assert limiter.in_use == 9


async def test_a_task_larger_than_the_known_quota_is_refused_at_once() -> None:
    # With a known quota it could never be created: waiting would hang for ever.
    limiter = ConcurrencyLimiter(4)
    with pytest.raises(ValueError, match="never fit"):
        await asyncio.wait_for(limiter.acquire(9), 1)
    assert limiter.in_use == 0
    assert limiter.waiting == 0


async def test_cancelled_waiters_leave_the_queue_and_keep_nothing() -> None:
    limiter = ConcurrencyLimiter(2)
    await limiter.acquire(2)
    waiter = asyncio.create_task(limiter.acquire(1))
    await eventually(lambda: limiter.waiting == 1)  # queued
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert limiter.waiting == 0
    limiter.release(2)
    assert limiter.in_use == 0
    assert await admitted(limiter, 2)


async def test_concurrency_error_shrinks_the_limit_to_what_running_tasks_hold() -> None:
    clock = Clock(0.0)
    limiter = ConcurrencyLimiter(20, min_cooldown=0.2, clock=clock)
    await limiter.acquire(7)
    limiter.created(7)
    await limiter.acquire(5)  # a create still waiting for its answer
    limiter.observe(QUOTA_FULL)
    limiter.release(5, created=False)
    assert limiter.limit == 7
    assert limiter.rejected_creates == 1
    limiter.release(7)
    assert (limiter.in_use, limiter.running) == (0, 0)
    clock.now += 0.19
    assert not await admitted(limiter, 1)  # the pause after a 1303
    clock.now += 0.11  # past the longest pause: 0.2 s, jittered up to 1.5 times
    assert await admitted(limiter, 1)


def test_repeated_concurrency_errors_back_off_longer_but_one_wave_counts_once() -> None:
    clock = Clock(0.0)
    limiter = ConcurrencyLimiter(5, min_cooldown=0.05, clock=clock)
    for _ in range(10):  # ten creates in flight all answered 1303 at once
        limiter.observe(QUOTA_FULL)
    first = limiter._resume_at - clock.now
    assert 0.05 <= first < 0.075  # the cooldown, jittered upwards only
    assert limiter.limit == 1  # nothing running: the smallest useful limit
    clock.now += first + 0.01
    limiter.observe(QUOTA_FULL)  # a create sent after the pause: the quota is still full
    second = limiter._resume_at - clock.now
    assert 0.1 <= second < 0.15  # doubled, jittered upwards only


def test_default_cooldown_follows_klings_advice() -> None:
    assert ConcurrencyLimiter(5).min_cooldown >= 1.0


async def test_the_limit_grows_back_to_capacity_on_sustained_success() -> None:
    limiter = ConcurrencyLimiter(6, min_cooldown=0.01)
    await limiter.acquire(2)
    limiter.created(2)
    limiter.observe(QUOTA_FULL)
    assert limiter.limit == 2
    for _ in range(2):
        limiter.created(0)
    assert limiter.limit == 3  # one more unit per full turnover
    for _ in range(100):
        limiter.created(0)
    assert limiter.limit == 6  # never past the configured maximum


async def test_an_unknown_quota_is_probed_by_doubling_then_learned() -> None:
    limiter = ConcurrencyLimiter(None, min_cooldown=0.01)
    assert limiter.limit == 8
    for _ in range(8):
        limiter.created(0)
    assert limiter.limit == 16
    for _ in range(16):
        limiter.created(0)
    assert limiter.limit == 32
    await limiter.acquire(20)
    limiter.created(20)
    limiter.observe(QUOTA_FULL)
    assert limiter.limit == 20
    for _ in range(20):
        limiter.created(0)
    assert limiter.limit == 21  # additive once a ceiling was met


async def test_rate_limit_spaces_creates_and_success_relaxes_it() -> None:
    clock = Clock(0.0)
    limiter = ConcurrencyLimiter(100, clock=clock)
    limiter.observe(TOO_FAST)
    limiter.observe(TOO_FAST)
    limiter.observe(TOO_FAST)  # 0.05 -> 0.1 -> 0.2 s between creates
    assert await admitted(limiter, 1)
    for _ in range(2):
        clock.now += 0.19
        assert not await admitted(limiter, 1)  # too soon after the one before
        clock.now += 0.02
        assert await admitted(limiter, 1)
    for _ in range(4):
        limiter.created(1)
    assert limiter._spacing == 0.0


async def test_other_errors_teach_nothing() -> None:
    limiter = ConcurrencyLimiter(5)
    limiter.observe(ServerError("boom", code=5000, http_status=500))
    assert limiter.limit == 5
    assert limiter.rejected_creates == 0


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ConcurrencyLimiter(0)


async def test_a_waiter_cancelled_just_after_admission_created_nothing() -> None:
    # r01: it gave its units back as a created task's, so `running` drifted down
    # and the next 1303 shrank the limit below what really ran.
    limiter = ConcurrencyLimiter(10, min_cooldown=0.01)
    for _ in range(4):
        await limiter.acquire(2)
        limiter.created(2)
    await limiter.acquire(2)  # a create on the wire
    waiters = [asyncio.create_task(limiter.acquire(1)) for _ in range(3)]
    await asyncio.sleep(0)
    limiter.release(2, created=False)  # it failed: the waiters are admitted ...
    for waiter in waiters:
        waiter.cancel()  # ... and their callers give up in the same loop iteration
    await asyncio.gather(*waiters, return_exceptions=True)
    assert limiter.running == 8
    assert limiter.in_use == 8
    limiter.observe(ConcurrencyLimitError("quota full", code=1303))
    assert limiter.limit == 8


def test_a_limiter_paused_on_one_event_loop_still_wakes_on_the_next() -> None:
    # r11: a pause timer left on an ended loop blocked every later wake-up.
    limiter = ConcurrencyLimiter(2, min_cooldown=0.05)

    async def pause_and_leave() -> None:
        await limiter.acquire(1)
        limiter.observe(ConcurrencyLimitError("full", code=1303))
        limiter.release(1, created=False)  # schedules the resume timer on this loop

    async def pause_and_wait() -> None:
        await asyncio.sleep(0.1)  # the first pause is over
        await limiter.acquire(1)
        limiter.observe(ConcurrencyLimitError("full", code=1303))
        limiter.release(1, created=False)
        await asyncio.wait_for(limiter.acquire(1), 2)

    asyncio.run(pause_and_leave())
    asyncio.run(pause_and_wait())
    assert limiter.in_use == 1


def test_the_fairness_window_follows_how_long_tasks_hold_their_units() -> None:
    # Issue 15: a fixed 2 s window let a large task block the queue long before
    # units came back from 10 s tasks, leaving them idle.
    now = [0.0]
    limiter = ConcurrencyLimiter(20, clock=lambda: now[0])
    assert limiter.overtaking_window == 2.0  # nothing learned yet
    # 20 units running, each task held 10 s: two units come back every second.
    limiter.running = limiter.in_use = 20
    for second in range(1, 41):
        now[0] = float(second)
        limiter.release(2)
        limiter.running += 2
        limiter.in_use += 2
    assert 40.0 <= limiter.overtaking_window <= 60.0  # five holds of about 10 s
    fixed = ConcurrencyLimiter(20, fairness_window=0.5, clock=lambda: now[0])
    assert fixed.overtaking_window == 0.5


def test_the_learned_fairness_window_stays_within_bounds() -> None:
    now = [0.0]
    limiter = ConcurrencyLimiter(50, clock=lambda: now[0])
    limiter.running = limiter.in_use = 50
    for moment in (0.0, 100.0):  # two units back in 100 s: tasks seem to run for ever
        now[0] = moment
        limiter.release(1)
        limiter.running += 1
        limiter.in_use += 1
    assert limiter.overtaking_window == 120.0
    quick = ConcurrencyLimiter(50, clock=lambda: now[0])
    quick.running = quick.in_use = 5
    for tick in range(50):  # 100 units back a second, 5 running: tasks of 50 ms
        now[0] = 200.0 + tick / 10
        quick.release(10)
        quick.running += 10
        quick.in_use += 10
    assert quick.overtaking_window == 2.0
