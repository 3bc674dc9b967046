"""The shared limiter's quota rules: the pure module, table-tested, and the Lua
script fed the same event sequences, asserting both agree."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from kling_async._limiter import (
    FIRST_CREATE_SPACING,
    MAX_COOLDOWN,
    MAX_CREATE_SPACING,
    MIN_COOLDOWN,
    UNKNOWN_CAPACITY_START,
)
from kling_async.contrib.redis import RedisAccount
from kling_async.contrib.redis._quota_rules import (
    QuotaParams,
    QuotaState,
    created,
    grow,
    initial,
    rate_limited,
    rejected,
)


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
