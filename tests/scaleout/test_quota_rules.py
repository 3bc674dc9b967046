"""The quota rules: the pure module, table-tested; the Lua script of the shared
limiter and the in-process limiter fed the same event sequences, asserting both
decide as the rules do."""

from __future__ import annotations

import random

import pytest
from redis.asyncio import Redis

from kling_async import ConcurrencyLimiter, ConcurrencyLimitError, RateLimitError
from kling_async._limiter import (
    FIRST_CREATE_SPACING,
    MAX_COOLDOWN,
    MAX_CREATE_SPACING,
    MIN_COOLDOWN,
    UNKNOWN_CAPACITY_START,
)
from kling_async._quota_rules import (
    QuotaParams,
    QuotaState,
    admit,
    created,
    fits,
    grow,
    initial,
    paused,
    rate_limited,
    rejected,
    spaced,
)
from kling_async.contrib.redis import RedisAccount


def params(capacity: int | None) -> QuotaParams:
    return QuotaParams(
        capacity=capacity,
        unknown_start=UNKNOWN_CAPACITY_START,
        min_cooldown_ms=round(MIN_COOLDOWN * 1000),
        max_cooldown_ms=round(MAX_COOLDOWN * 1000),
        first_spacing_ms=round(FIRST_CREATE_SPACING * 1000),
        max_spacing_ms=round(MAX_CREATE_SPACING * 1000),
    )


@pytest.mark.parametrize(
    ("capacity", "before", "after"),
    [
        (None, QuotaState(limit=4), 8),  # no ceiling known: doubles
        (None, QuotaState(limit=4, ceiling_known=True), 5),  # a ceiling known: one unit
        (6, QuotaState(limit=5, ceiling_known=True), 6),
        (6, QuotaState(limit=6, ceiling_known=True), 6),  # never above the capacity
        (6, QuotaState(limit=4), 6),  # doubling stops at the capacity
    ],
)
def test_grow(capacity: int | None, before: QuotaState, after: int) -> None:
    assert grow(before, params(capacity)).limit == after


def test_a_turnover_of_successes_grows_the_limit_and_relaxes_the_spacing() -> None:
    rules = params(None)
    state = QuotaState(limit=2, spacing=rules.first_spacing_ms * 4)
    state = created(state, rules)
    assert (state.limit, state.successes, state.spacing) == (2, 1, rules.first_spacing_ms * 2)
    state = created(state, rules)
    assert (state.limit, state.successes, state.spacing) == (4, 0, rules.first_spacing_ms)
    assert created(state, rules).spacing == 0


def test_a_1303_drops_the_limit_to_running_units_and_pauses_once_per_wave() -> None:
    rules = params(10)
    state = rejected(initial(rules), rules, now=1000, running_units=3, jitter=1000)
    assert (state.limit, state.rejections, state.ceiling_known) == (3, 1, True)
    assert state.resume_at == 1000 + rules.min_cooldown_ms
    again = rejected(state, rules, now=1001, running_units=0, jitter=1000)  # same wave
    assert (again.limit, again.rejections, again.resume_at) == (1, 1, state.resume_at)
    later = rejected(again, rules, now=state.resume_at, running_units=2, jitter=1000)
    assert later.rejections == 2
    assert later.resume_at == state.resume_at + 2 * rules.min_cooldown_ms


def test_a_1302_spaces_creates_within_bounds() -> None:
    rules = params(None)
    state = rate_limited(QuotaState(limit=1), rules)
    assert state.spacing == rules.first_spacing_ms
    for _ in range(40):
        state = rate_limited(state, rules)
    assert state.spacing == rules.max_spacing_ms


def test_admission_fits_the_limit_or_goes_alone_and_waits_out_pause_and_spacing() -> None:
    state = QuotaState(limit=4)
    assert fits(state, in_use=1, units=3)
    assert not fits(state, in_use=2, units=3)
    assert fits(state, in_use=0, units=9)  # larger than the whole limit: alone
    assert not fits(state, in_use=1, units=9)
    assert paused(QuotaState(limit=4, resume_at=100), 99)
    assert not paused(QuotaState(limit=4, resume_at=100), 100)
    spaced_out = admit(QuotaState(limit=4, spacing=50), 1000)
    assert spaced(spaced_out, 1049)
    assert not spaced(spaced_out, 1050)


SEQUENCES = {
    "grow from unknown": (None, 0, ["created"] * 7),
    "grow to capacity": (5, 0, ["created"] * 12),
    "1303 then recover": (None, 3, ["created"] * 3 + ["1303", "1303"] + ["created"] * 9),
    "1302 then relax": (8, 1, ["1302", "1302", "1302", "created", "created", "created"]),
    "mixed": (12, 2, ["created", "1302", "1303", "created", "1302", "1303", "created"] * 3),
    "1303 with nothing running": (None, 0, ["1303", "created", "created", "1303"]),
}


@pytest.mark.parametrize("name", sorted(SEQUENCES))
async def test_the_lua_script_agrees_with_the_pure_rules(
    redis: Redis, account_name: str, name: str
) -> None:
    capacity, running, events = SEQUENCES[name]
    rules = params(capacity)
    async with RedisAccount(redis, name=account_name) as account:
        limiter = account.limiter(capacity)
        if running:
            await limiter._call(1, [["adopt", "running-task", running]], [])
        seconds, micros = await redis.time()
        now = seconds * 1000 + micros // 1000
        ops: list[list[object]] = []
        expected = initial(rules)
        for event in events:
            if event == "created":
                ops.append(["created", "some-task"])
                expected = created(expected, rules)
            elif event == "1303":
                ops.append(["1303", "", 1200])
                expected = rejected(expected, rules, now=now, running_units=running, jitter=1200)
            else:
                ops.append(["1302", ""])
                expected = rate_limited(expected, rules)
        await limiter._call(2, ops, [])
        stored = {
            key.decode(): float(value)
            for key, value in (await redis.hgetall(account.key("limiter"))).items()  # type: ignore[misc]  # redis-py: reply or awaitable
        }
        await limiter.close()
    assert stored["limit"] == expected.limit
    assert bool(stored["ceiling_known"]) == expected.ceiling_known
    assert stored["successes"] == expected.successes
    assert stored["rejections"] == expected.rejections
    assert stored["spacing"] == expected.spacing
    assert stored["creates"] == expected.creates
    assert stored["rejected"] == expected.rejected
    assert abs(stored["resume_at"] - expected.resume_at) < 200  # Redis's clock moved on a little


class _Jitter(random.Random):
    """The jitter the Lua test sends (1.2, per mille 1200), drawn every time."""

    def uniform(self, a: float, b: float) -> float:
        return 1.2


@pytest.mark.parametrize("name", sorted(SEQUENCES))
async def test_the_in_process_limiter_agrees_with_the_pure_rules(name: str) -> None:
    capacity, running, events = SEQUENCES[name]
    rules = params(capacity)
    now = 5.0
    limiter = ConcurrencyLimiter(capacity, clock=lambda: now, rng=_Jitter())
    if running:
        limiter.adopt(running)
    expected = initial(rules)
    for event in events:
        if event == "created":
            limiter.created(0)  # a success of a task not counted here, as in the Lua test
            expected = created(expected, rules)
        elif event == "1303":
            limiter.observe(ConcurrencyLimitError("quota full", code=1303))
            expected = rejected(expected, rules, now=now * 1000, running_units=running, jitter=1200)
        else:
            limiter.observe(RateLimitError("too fast", code=1302))
            expected = rate_limited(expected, rules)
    assert limiter.limit == expected.limit
    assert limiter._resume_at == expected.resume_at / 1000
    assert limiter._spacing == expected.spacing / 1000
    assert limiter.creates == expected.creates
    assert limiter.rejected_creates == expected.rejected
