"""A budget shared through Redis (issue 30): several members (as several processes
would be) on one real redis-server, one budget nothing can overrun."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest
from redis.asyncio import Redis

from kling_async import (
    DEFAULT_PRICES,
    BudgetExceededError,
    BudgetState,
    KlingError,
    Price,
    TaskHandle,
    UnitBudget,
)
from kling_async.contrib.redis import RedisAccount, RedisBudget
from kling_async.testing import FakeKlingServer
from tests.helpers import API_KEY, eventually, make_client

ONE_UNIT = DEFAULT_PRICES.replacing(
    Price(endpoint="images/generations", model_name="kling-v3", units=1)
)


@contextlib.asynccontextmanager
async def members(redis: Redis, name: str, count: int) -> AsyncIterator[list[RedisAccount]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(RedisAccount(redis, name=name)) for _ in range(count)
        ]


async def test_fifty_creates_from_two_processes_under_a_shared_budget_of_ten(
    redis: Redis, account_name: str
) -> None:
    async with (
        FakeKlingServer(api_key=API_KEY, task_duration=0.5, prices=ONE_UNIT) as server,
        members(redis, account_name, 2) as (one, two),
    ):
        budgets = [RedisBudget(one, 10), RedisBudget(two, 10)]
        async with (
            make_client(server, budget=budgets[0], prices=ONE_UNIT) as first,
            make_client(server, budget=budgets[1], prices=ONE_UNIT) as second,
        ):
            outcomes = await asyncio.gather(
                *((first if i % 2 else second).images.generate(prompt=str(i)) for i in range(50)),
                return_exceptions=True,
            )
            handles = [o for o in outcomes if isinstance(o, TaskHandle)]
            refused = [o for o in outcomes if isinstance(o, BudgetExceededError)]
            assert (len(handles), len(refused)) == (10, 40)
            await asyncio.gather(*(h.wait(timeout=5) for h in handles))

            async def settled() -> bool:
                await budgets[0].flush()
                await budgets[1].flush()
                return await budgets[0].state() == BudgetState(
                    limit=Decimal(10), spent=Decimal(10), reserved=Decimal(0)
                )

            await eventually(settled)
        assert len(server.requests_for("create")) == 10
        assert server.billed_units == 10


async def test_a_process_sees_what_another_reserved_and_released(
    redis: Redis, account_name: str
) -> None:
    async with members(redis, account_name, 2) as (one, two):
        mine, theirs = RedisBudget(one, "2.5"), RedisBudget(two, "2.5")
        await mine.reserve("a", Decimal("1.5"))
        await mine.reserve("a", Decimal("1.5"))  # the same create again: counted once
        with pytest.raises(BudgetExceededError) as caught:
            await theirs.reserve("b", Decimal("1.5"))
        error = caught.value
        assert (error.spent, error.reserved, error.estimate) == (
            Decimal(0),
            Decimal("1.5"),
            Decimal("1.5"),
        )
        mine.settle("a", Decimal("0.5"))  # billed less than estimated
        await mine.flush()
        await theirs.reserve("b", Decimal("1.5"))  # 0.5 + 1.5 <= 2.5
        theirs.release("b")
        theirs.release("b")
        mine.adopt("c", Decimal("9"))  # a task that exists: counted, never refused
        await theirs.flush()
        await mine.flush()
        assert await theirs.state() == BudgetState(
            limit=Decimal("2.5"), spent=Decimal("0.5"), reserved=Decimal(9)
        )


async def test_the_script_follows_the_in_process_rules(redis: Redis, account_name: str) -> None:
    """One random life of creates (reserved, then settled or released; some
    adopted; a step repeated now and then), fed to both budgets: the same
    refusals and the same totals after every step."""
    rng = random.Random(30)
    names = (f"t{number}" for number in range(10_000))
    async with members(redis, account_name, 1) as (account,):
        shared, local = RedisBudget(account, 80), UnitBudget(80)
        running: dict[str, Decimal] = {}
        last: tuple[str, str, Decimal] | None = None
        refusals = 0
        for step in range(300):
            op = rng.choices(["reserve", "adopt", "settle", "release", "again"], [8, 1, 3, 3, 1])[0]
            units = rng.choice([Decimal(rng.randrange(13)), Decimal(rng.randrange(1200)) / 100])
            if op == "again" and last is not None:
                op, key, units = last  # a step retried: it counts once
            elif op in ("settle", "release") and running:
                key = rng.choice(sorted(running))
                estimate = running.pop(key)
                units = rng.choice([Decimal(0), estimate])  # failed, or billed its estimate
            else:
                key, op = next(names), ("adopt" if op == "adopt" else "reserve")
            last = (op, key, units)
            if op == "reserve":
                outcomes: list[tuple[Decimal, Decimal] | None] = []
                for budget in (shared, local):
                    try:
                        await budget.reserve(key, units)
                        outcomes.append(None)
                    except BudgetExceededError as error:
                        outcomes.append((error.spent, error.reserved))
                assert outcomes[0] == outcomes[1], (step, op, key, units)
                refusals += outcomes[0] is not None
                if outcomes[0] is None:
                    running.setdefault(key, units)
            else:
                for budget in (shared, local):
                    if op == "release":
                        budget.release(key)
                    else:
                        getattr(budget, op)(key, units)
                if op == "adopt":
                    running.setdefault(key, units)
                await shared.flush()
            assert await shared.state() == await local.state(), (step, op, key, units)
        assert 0 < refusals < 150  # both outcomes were exercised


async def test_a_reserve_may_reach_the_limit_exactly_never_pass_it(
    redis: Redis, account_name: str
) -> None:
    async with members(redis, account_name, 1) as (account,):
        for budget in (RedisBudget(account, 10), UnitBudget(10)):
            await budget.reserve("a", Decimal(7))
            await budget.reserve("b", Decimal(3))  # exactly the limit
            with pytest.raises(BudgetExceededError):
                await budget.reserve("c", Decimal("0.000001"))
            budget.settle("a", Decimal("6.999999"))
            if isinstance(budget, RedisBudget):
                await budget.flush()
            await budget.reserve("c", Decimal("0.000001"))
            assert await budget.state() == BudgetState(
                limit=Decimal(10), spent=Decimal("6.999999"), reserved=Decimal("3.000001")
            )


async def test_an_unreachable_redis_refuses_the_create(redis: Redis, account_name: str) -> None:
    async with members(redis, account_name, 1) as (account,):
        budget = RedisBudget(account, 10)
        dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
        account.redis = dead
        budget._script = dead.register_script(budget._script.script)
        try:
            with pytest.raises(KlingError, match="cannot be reached"):
                await budget.reserve("a", Decimal(1))
        finally:
            account.redis = redis
            await dead.aclose()


async def test_a_budget_redis_lost_refuses_every_create(redis: Redis, account_name: str) -> None:
    async with members(redis, account_name, 1) as (account,):
        budget = RedisBudget(account, 10)
        await budget.reserve("a", Decimal(8))
        await account.purge()  # as a Redis restarted without persistence leaves it
        with pytest.raises(KlingError, match="was lost"):
            await budget.reserve("b", Decimal(1))
        assert budget.lost
        with pytest.raises(KlingError, match="was lost"):
            await budget.reserve("c", Decimal(1))
        await budget.flush()
        assert (await budget.state()).reserved == 0  # "b" was given back


@pytest.mark.parametrize("suffix", ["", "[eu]*"], ids=["plain", "glob-characters"])
async def test_the_shared_ledger_adds_up_what_every_process_was_billed(
    redis: Redis, account_name: str, suffix: str
) -> None:
    account_name += suffix  # matched literally, not as a pattern
    async with (
        FakeKlingServer(api_key=API_KEY, task_duration=0.1) as server,
        members(redis, account_name, 2) as (one, two),
    ):
        async with (
            make_client(server, ledger=one.ledger()) as first,
            make_client(server, ledger=two.ledger()) as second,
        ):
            handles = [
                await (first if i % 2 else second).images.generate(prompt=str(i), n=1 + i % 3)
                for i in range(5)
            ]
            await asyncio.gather(*(handle.wait(timeout=5) for handle in handles))

            reader = two.ledger()  # any process reads what every process recorded

            async def reported() -> bool:
                [total] = await reader.spend()
                return total.running == 0 and total.unreported == 0

            await eventually(reported)
            [total] = await reader.spend()
            by_endpoint = await reader.spend(by="endpoint")
    assert server.billed_units > 0
    assert total.tasks == 5
    assert total.deducted == server.billed_units
    assert total.estimated == server.billed_units  # the fake bills by the same table
    assert [(row.group, row.deducted) for row in by_endpoint] == [
        ("images/generations", Decimal(server.billed_units))
    ]
