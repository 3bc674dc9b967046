"""Budgets nothing can overrun (issue 30): estimates reserved at intent, refused
before sending, replaced by the deduction, released when nothing landed."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from pathlib import Path

import pytest

import kling_async
from kling_async import (
    DEFAULT_PRICES,
    BudgetExceededError,
    BudgetState,
    ImageGenerationRequest,
    Price,
    TaskHandle,
    UnitBudget,
    UnknownPriceError,
)
from kling_async.testing import FakeKlingServer
from tests.helpers import API_KEY, eventually, make_client

#: One unit an image for kling-v3, on both sides: budgets in small numbers.
ONE_UNIT = DEFAULT_PRICES.replacing(
    Price(endpoint="images/generations", model_name="kling-v3", units=1)
)


def units(*values: int) -> tuple[Decimal, ...]:
    return tuple(Decimal(value) for value in values)


def creates(server: FakeKlingServer) -> int:
    return len(server.requests_for("create"))


async def test_a_create_past_the_budget_is_refused_before_anything_is_sent() -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=None) as server:
        async with make_client(server, budget=20) as client:
            first = await client.images.generate(prompt="a", n=2)  # 16 units reserved
            with pytest.raises(BudgetExceededError) as caught:
                await client.images.generate(prompt="b")  # 8 more: 24 > 20
            assert isinstance(first, TaskHandle)
            assert creates(server) == 1
            assert await client.budget.state() == BudgetState(  # type: ignore[union-attr]
                limit=Decimal(20), spent=Decimal(0), reserved=Decimal(16)
            )
    error = caught.value
    assert isinstance(error, kling_async.KlingError)
    assert (error.budget, error.spent, error.reserved, error.estimate) == units(20, 0, 16, 8)
    assert error.name == "budget"
    assert error.create_outcome == "nothing was sent"
    assert error.external_task_id is not None
    message = str(error)
    assert "budget of 20 units exceeded" in message
    assert "4 left" in message
    assert "Raise the budget" in message


async def test_the_deduction_replaces_the_estimate_when_the_task_ends() -> None:
    # The client estimates 10 an image, Kling (the fake) bills 8: the difference
    # comes back when the task ends.
    over = DEFAULT_PRICES.replacing(
        Price(endpoint="images/generations", model_name="kling-v3", units=10)
    )
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.3) as server:
        budget = UnitBudget(18)
        async with make_client(server, budget=budget, prices=over) as client:
            first = await client.images.generate(prompt="a")
            assert (budget.spent, budget.reserved) == units(0, 10)
            with pytest.raises(BudgetExceededError):  # 10 + 10 > 18 while it runs
                await client.images.generate(prompt="b")
            await first.wait(timeout=5)
            await eventually(lambda: budget.spent == 8)
            assert budget.reserved == 0
            second = await client.images.generate(prompt="c")  # 8 + 10 <= 18
            await second.wait(timeout=5)
            await eventually(lambda: budget.spent == 16)
    assert server.billed_units == 16 == budget.spent


async def test_a_create_that_did_not_land_gives_its_reservation_back(
    server: FakeKlingServer,
) -> None:
    server.inject("error", route="create", code=1301, message="unsafe")
    budget = UnitBudget(8)
    async with make_client(server, budget=budget) as client:
        with pytest.raises(kling_async.ContentPolicyError):
            await client.images.generate(prompt="a")
        assert (budget.spent, budget.reserved) == units(0, 0)
        task = await client.images.run(ImageGenerationRequest(prompt="b"))  # the 8 are free
    assert task.cost is not None
    assert task.cost.units == 8


async def test_a_create_that_may_have_landed_keeps_its_reservation() -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=None) as server:
        server.inject("drop_after", route="create")  # created, its answer lost
        server.inject("error", route="get", code=5000, times=None)  # and no lookup answers
        budget = UnitBudget(12)
        async with make_client(server, budget=budget) as client:
            with pytest.raises(kling_async.KlingError) as caught:
                await client.images.generate(prompt="a")
            assert "may exist" in str(caught.value.create_outcome)
            assert (budget.spent, budget.reserved) == units(0, 8)  # it may be billed
            server.clear_faults()
            with pytest.raises(BudgetExceededError):
                await client.images.generate(prompt="b")
    assert creates(server) == 1


async def test_an_unknown_price_under_a_budget_is_refused_never_guessed(
    server: FakeKlingServer,
) -> None:
    unknown = ImageGenerationRequest(prompt="p", model_name="kling-v9")
    async with make_client(server, budget=1000) as client:
        with pytest.raises(UnknownPriceError) as caught:
            await client.images.submit(unknown)
        assert caught.value.create_outcome == "nothing was sent"
        assert creates(server) == 0
        assert await client.budget.state() == BudgetState(  # type: ignore[union-attr]
            limit=Decimal(1000), spent=Decimal(0), reserved=Decimal(0)
        )
    async with make_client(server) as client:  # without a budget it is sent
        await client.images.run(unknown)
    assert creates(server) == 1


async def test_a_batch_stops_spending_at_max_units(server: FakeKlingServer) -> None:
    requests = [ImageGenerationRequest(prompt=str(i)) for i in range(5)]  # 8 units each
    async with make_client(server, max_concurrency=50) as client:
        batch = client.batch(requests, max_units=24)
        results = await batch.collect()
    refused = [r for r in results if isinstance(r.error, BudgetExceededError)]
    assert sum(r.ok for r in results) == 3
    assert len(refused) == 2
    assert all(r.error.name == "max_units" for r in refused)  # type: ignore[union-attr]
    assert server.billed_units == 24
    assert (batch.cost.estimated, batch.cost.deducted) == units(24, 24)  # refused: not counted
    assert creates(server) == 3


async def test_the_client_s_budget_and_a_batch_s_both_hold(server: FakeKlingServer) -> None:
    async with make_client(server, budget=16) as client:
        await client.images.run(ImageGenerationRequest(prompt="first"))
        results = await client.batch(
            [ImageGenerationRequest(prompt=str(i)) for i in range(3)], max_units=100
        ).collect()
    assert sum(r.ok for r in results) == 1  # 8 spent before, 8 left in the client's
    assert {r.error.name for r in results if r.error is not None} == {"budget"}  # type: ignore[attr-defined]
    assert server.billed_units == 16


async def test_a_resumed_batch_counts_what_its_earlier_runs_spent(
    server: FakeKlingServer, tmp_path: Path
) -> None:
    path = tmp_path / "journal.db"
    requests = [ImageGenerationRequest(prompt=str(i)) for i in range(3)]
    async with make_client(server) as client:
        first = await client.batch(requests, journal=path, max_units=32).collect()
    assert all(r.ok for r in first)
    assert server.billed_units == 24
    more = [*requests, *(ImageGenerationRequest(prompt=f"new {i}") for i in range(2))]
    async with make_client(server) as client:
        batch = client.batch(more, journal=path, max_units=32)
        second = await batch.collect()
    assert [r.resumed for r in second[:3]] == [True, True, True]
    assert sum(r.ok and not r.resumed for r in second) == 1  # 24 + 8 = 32
    assert isinstance(second[4].error, BudgetExceededError)
    assert second[4].error.spent + second[4].error.reserved == 32
    assert server.billed_units == 32
    assert batch.cost.deducted == 32


async def test_resume_counts_a_running_task_and_settles_it_when_it_ends(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.db"
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.4) as server:
        async with make_client(server, journal=path) as client:
            await client.images.generate(prompt="a", n=2)  # left running at close
        budget = UnitBudget(20)
        async with make_client(server, journal=path, budget=budget) as client:
            [handle] = await client.resume()
            assert (budget.spent, budget.reserved) == units(0, 16)  # counted, never refused
            with pytest.raises(BudgetExceededError):
                await client.images.generate(prompt="b")
            await handle.wait(timeout=5)
            await eventually(lambda: budget.spent == 16)
            assert budget.reserved == 0
    assert server.billed_units == 16


async def test_fifty_concurrent_creates_under_a_budget_of_ten_bill_ten() -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.5, prices=ONE_UNIT) as server:
        budget = UnitBudget(10)
        async with make_client(server, budget=budget, prices=ONE_UNIT) as client:
            started = time.monotonic()
            outcomes = await asyncio.gather(
                *(client.images.generate(prompt=str(i)) for i in range(50)),
                return_exceptions=True,
            )
            handles = [o for o in outcomes if isinstance(o, TaskHandle)]
            refused = [o for o in outcomes if isinstance(o, BudgetExceededError)]
            assert (len(handles), len(refused)) == (10, 40)
            assert time.monotonic() - started < 5
            await asyncio.gather(*(h.wait(timeout=5) for h in handles))
            await eventually(lambda: budget.spent == 10)
    assert creates(server) == 10
    assert server.billed_units == 10


async def test_one_budget_is_shared_by_two_clients(server: FakeKlingServer) -> None:
    budget = UnitBudget(8)
    async with make_client(server, budget=budget) as one, make_client(server, budget=budget) as two:
        await one.images.generate(prompt="a")
        with pytest.raises(BudgetExceededError):
            await two.images.generate(prompt="b")
    assert creates(server) == 1


def test_a_budget_is_a_finite_number_of_units() -> None:
    for bad in (-1, "nan", "inf"):
        with pytest.raises(ValueError, match="finite number of units"):
            UnitBudget(bad)
    with pytest.raises(TypeError):
        UnitBudget(1.5)  # type: ignore[arg-type]
    assert UnitBudget("2.5").limit == Decimal("2.5")
    assert isinstance(UnitBudget(1), kling_async.Budget)


async def test_budget_steps_are_idempotent_per_create() -> None:
    budget = UnitBudget(10)
    await budget.reserve("a", Decimal(6))
    await budget.reserve("a", Decimal(6))  # a re-queue of the same create
    assert budget.reserved == 6
    budget.settle("a", Decimal(4))
    budget.settle("a", Decimal(4))
    budget.release("a")  # after its end: nothing to give back
    assert (budget.spent, budget.reserved, budget.left) == units(4, 0, 6)
    budget.adopt("b", Decimal(7))  # counted, though over the limit
    assert (budget.reserved, budget.left) == units(7, 0)
    with pytest.raises(BudgetExceededError):
        await budget.reserve("c", Decimal(0) + 1)


async def test_a_budget_remembers_a_bounded_number_of_settled_creates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kling_async import _budget

    monkeypatch.setattr(_budget, "SETTLED_REMEMBERED", 3)
    budget = UnitBudget(100)
    for key in "abcd":
        await budget.reserve(key, Decimal(2))
        budget.settle(key, Decimal(1))
    budget.settle("d", Decimal(1))  # remembered: counted once
    assert budget.spent == 4
    assert len(budget._spent) == 3  # "a" is forgotten: memory does not grow per task
    budget.settle("a", Decimal(1))  # forgotten, so counted again: over, never under
    assert budget.spent == 5
