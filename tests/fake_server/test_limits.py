"""The account's limits: the n-weighted concurrency quota (1303), the rate limit
(1302), a quota error on every create."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from kling_async.testing import FakeKlingServer, RateLimit
from kling_async.testing._quota import TokenBucket, UnitQuota
from tests.helpers import Clock, eventually

from .helpers import GEN, MULTI, Api, gen_body


async def test_concurrency_quota_is_n_weighted_and_released(
    serve: Callable[..., Awaitable[Api]],
) -> None:
    api = await serve(concurrency_limit=5, task_duration=None, processing_delay=0.0)
    first = await api.task_id(n=3)
    second = await api.task_id(MULTI, n=2)
    status, payload, _ = await api.create(GEN, gen_body(n=1, external_task_id="over"))
    assert (status, payload["code"]) == (429, 1303)
    assert len(api.server.tasks) == 2
    assert "over" not in {task.external_task_id for task in api.server.tasks.values()}
    assert (api.server.units_in_use, api.server.peak_units) == (5, 5)
    api.server.finish(first)
    assert api.server.units_in_use == 2
    assert (await api.create(GEN, gen_body(n=3)))[0] == 200
    assert (await api.create(GEN, gen_body(n=1)))[1]["code"] == 1303
    api.server.finish(second, failure="boom")  # a failure releases its units too
    assert api.server.units_in_use == 3
    # Positive and never above the quota; the exact figure depends on the wall
    # clock here (test_utilisation_integrates_units_over_the_quotas_clock checks it).
    utilisation = api.server.utilisation()
    assert 0.0 < utilisation <= 1.0
    stats = api.server.stats()
    assert stats["creates_accepted"] == 3
    assert stats["creates_rejected_concurrency"] == 2


async def test_utilisation_stops_at_last_terminal_when_idle(
    serve: Callable[..., Awaitable[Api]],
) -> None:
    api = await serve(concurrency_limit=2, processing_delay=0.0, task_duration=0.05)
    await api.task_id(n=2)
    await eventually(lambda: api.server.units_in_use == 0)
    settled = api.server.utilisation()
    await asyncio.sleep(0.05)
    assert api.server.utilisation() == settled
    assert 0.8 < settled <= 1.0
    with pytest.raises(ValueError, match="limit"):
        FakeKlingServer().utilisation()


async def test_rate_limit_answers_1302_with_retry_after(
    serve: Callable[..., Awaitable[Api]],
) -> None:
    api = await serve(rate_limit=RateLimit(3, 60, retry_after=0.2))
    for _ in range(3):
        assert (await api.list(GEN))[0] == 200
    status, payload, headers = await api.list(GEN)
    assert (status, payload["code"]) == (429, 1302)
    assert headers["Retry-After"] == "0.2"
    assert api.server.stats()["rate_limited"] == 1


async def test_rate_limit_refills(serve: Callable[..., Awaitable[Api]]) -> None:
    api = await serve(rate_limit=RateLimit(2, 0.1, retry_after=None))
    codes = [(await api.list(GEN))[1]["code"] for _ in range(3)]
    assert codes == [0, 0, 1302]
    assert "Retry-After" not in (await api.list(GEN))[2]
    await asyncio.sleep(0.1)
    assert (await api.list(GEN))[0] == 200


async def test_quota_error_option(serve: Callable[..., Awaitable[Api]]) -> None:
    api = await serve(quota_error=1102)
    status, payload, _ = await api.create(GEN, gen_body())
    assert (status, payload["code"]) == (429, 1102)
    assert api.server.tasks == {}
    assert (await api.list(GEN))[0] == 200


def test_token_bucket_refills_by_its_clock() -> None:
    clock = Clock(100.0)
    bucket = TokenBucket(RateLimit(2, 1.0), clock=clock)
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    clock.now += 0.5  # half the period: one token back
    assert [bucket.take() for _ in range(2)] == [True, False]
    clock.now += 10.0  # a long rest refills no more than the burst
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    clock.now += 0.5
    assert bucket.refusal() is None
    refusal = bucket.refusal()
    assert refusal is not None
    assert (refusal.status, refusal.code, refusal.headers) == (429, 1302, {"Retry-After": "1"})
    assert bucket.refused == 1


def test_utilisation_integrates_units_over_the_quotas_clock() -> None:
    clock = Clock(0.0)
    quota = UnitQuota(4, clock=clock)
    assert quota.utilisation() == 0.0  # before any create
    quota.change(2)
    clock.now = 1.0
    quota.change(2)
    clock.now = 2.0
    assert quota.utilisation() == (2 * 1 + 4 * 1) / (4 * 2)
    refusal = quota.refusal(1)
    assert refusal is not None
    assert (refusal.status, refusal.code, quota.rejected) == (429, 1303, 1)
    quota.change(-4)
    clock.now = 10.0  # idle since 2.0: the figure stops there instead of decaying
    assert quota.utilisation() == 0.75
    assert quota.utilisation(limit=8) == 0.375
    assert (quota.in_use, quota.peak) == (0, 4)
    assert quota.refusal(4) is None
