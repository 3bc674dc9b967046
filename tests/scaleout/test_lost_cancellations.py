"""Closing the shared account's parts when a cancellation is lost inside redis-py.

On Python 3.10 redis-py checks each pooled connection under async-timeout's
``timeout(0)``; a cancellation that lands there becomes a timeout that redis-py
ignores, and the command goes on as if nothing happened. CI hung on it for 120 s:
``RedisAccount.close()`` cancelled its lease renewer once and waited for it, and
the renewer, its cancellation lost, went on renewing. :class:`LosesCancellations`
loses a cancellation that lands while a command runs, on any Python; the account is
closed while its renewer, or its budget's writer, awaits such a command directly.
(The ledger's and limiter's calls sit inside ``wait_for``, which on 3.10 and 3.11
cancels them in a task of their own: a lost cancellation does not reach them.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest
from redis.asyncio import Redis

from kling_async.contrib.redis import RedisAccount, RedisBudget
from kling_async.contrib.redis._account import stop_tasks
from kling_async.testing import RedisServer
from tests.helpers import eventually


class LosesCancellations(Redis):
    """A Redis client whose commands, while ``pause`` is set, first wait that
    long and forget the first cancellation that arrives meanwhile, as redis-py
    on Python 3.10 does when one lands in its zero-timeout connection check
    (later ones are not lost: a test that fails ends)."""

    pause = 0.0
    lost = 0
    running: set[asyncio.Task[Any] | None]

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        task = asyncio.current_task()
        self.running.add(task)
        try:
            await asyncio.sleep(self.pause)
        except asyncio.CancelledError:
            if self.lost:
                raise
            self.lost += 1
        finally:
            self.running.discard(task)
        return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]  # redis-py: untyped


@pytest.fixture
async def losing(redis_server: RedisServer) -> AsyncIterator[LosesCancellations]:
    client = LosesCancellations.from_url(redis_server.url)
    client.running = set()
    yield client
    client.pause = 0.0
    await client.aclose()


async def closes_in_time(account: RedisAccount, client: LosesCancellations, task: Any) -> None:
    """Hold every command of ``client`` for 0.3 s once ``task`` runs one, then
    close ``account``: it must end though the cancellation of ``task`` is lost."""
    client.pause = 0.3
    await eventually(lambda: task in client.running, timeout=5.0)
    closing = asyncio.ensure_future(account.close())
    # Not wait_for: cancelling the close would cancel the task it waits for.
    await asyncio.wait({closing}, timeout=5.0)
    assert closing.done(), "close() waits for a task whose cancellation was lost"
    assert client.lost == 1  # the cancellation was lost, as on 3.10
    assert task.done()


async def test_close_ends_a_renewer_whose_cancellation_was_lost(
    losing: LosesCancellations, account_name: str
) -> None:
    account = RedisAccount(losing, name=account_name, lease=0.3)
    await account.start()
    await closes_in_time(account, losing, account._renewer)


async def test_close_ends_a_budget_writer_whose_cancellation_was_lost(
    losing: LosesCancellations, account_name: str
) -> None:
    async with RedisAccount(losing, name=account_name, lease=30.0, close_timeout=0.1) as account:
        budget = RedisBudget(account, 1000)
        for number in range(20):
            budget.settle(f"t-{number}", Decimal(1))
        await closes_in_time(account, losing, budget._writer)


async def test_stop_tasks_cancels_again_until_each_task_ends() -> None:
    cancellations = 0

    async def forgets_two_cancellations() -> str:
        nonlocal cancellations
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancellations += 1
                if cancellations == 3:
                    raise

    async def fails() -> None:
        raise ValueError("retrieved, never logged as lost")

    stubborn = asyncio.ensure_future(forgets_two_cancellations())
    failing = asyncio.ensure_future(fails())
    await asyncio.sleep(0)
    await asyncio.wait_for(stop_tasks(stubborn, failing, None), 5.0)
    assert stubborn.cancelled()
    assert cancellations == 3
    assert isinstance(failing.exception(), ValueError)
