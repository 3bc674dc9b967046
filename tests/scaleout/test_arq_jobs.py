"""The arq integration in one process: a burst worker built by worker_settings
runs generate jobs against FakeKlingServer on loopback, on a real redis-server."""

from __future__ import annotations

import pytest

pytest.importorskip("arq", reason="the arq tests need the arq extra")

from arq import create_pool
from arq.connections import RedisSettings
from arq.constants import in_progress_key_prefix
from arq.worker import Worker
from redis.asyncio import Redis

from kling_async.contrib.arq import _rerun_dead_jobs, job_key, worker_settings
from kling_async.contrib.redis import RedisAccount
from kling_async.testing import FakeKlingServer, RedisServer
from tests.helpers import API_KEY, FAST_POLL


@pytest.mark.filterwarnings("ignore:Call to deprecated close:DeprecationWarning")  # arq's own
async def test_generate_jobs_run_once_per_job_id(
    redis_server: RedisServer, account_name: str
) -> None:
    async with FakeKlingServer(api_key=API_KEY, concurrency_limit=4, task_duration=0.1) as server:
        settings = worker_settings(
            capacity=4,
            redis_url=redis_server.url,
            account=account_name,
            member="in-process",
            client_options={"api_key": API_KEY, "base_url": server.url, "polling": FAST_POLL},
            queue_name=f"arq:{account_name}",
            burst=True,
            handle_signals=False,
            poll_delay=0.05,
        )
        pool = await create_pool(RedisSettings.from_dsn(redis_server.url))
        try:
            for number in range(6):
                await pool.enqueue_job(
                    "generate",
                    {"prompt": "[fail] nope" if number == 5 else f"p{number}", "n": 2},
                    _job_id=f"{account_name}:{number}",
                    _queue_name=f"arq:{account_name}",
                )
            worker = Worker(**settings)
            await worker.main()
            await worker.close()
            assert worker.jobs_complete == 6
            assert worker.jobs_failed == 0
            results = [
                await pool._get_job_result(f"arq:result:{account_name}:{number}".encode())
                for number in range(6)
            ]
        finally:
            await pool.aclose()
        statuses = sorted(result.result["status"] for result in results)
        assert statuses == ["failed", *["succeed"] * 5]  # a failed task is a result
        assert all(len(r.result["images"]) == 2 for r in results if r.result["status"] == "succeed")
        assert len(server.tasks) == 6
        assert server.peak_units <= 4
        assert job_key("x") == "arq:x"


async def test_a_dead_workers_jobs_are_released_to_run_again(
    redis: Redis, account_name: str
) -> None:
    async with RedisAccount(redis, name=account_name, lease=0.2) as survivor:
        await redis.sadd(survivor.key("arq-workers"), "dead-worker", survivor.member)  # type: ignore[misc]  # redis-py: reply or awaitable
        await redis.sadd(survivor.key("arq-jobs:dead-worker"), "job-1", "job-2")  # type: ignore[misc]  # redis-py: reply or awaitable
        await redis.hset(  # type: ignore[misc]  # redis-py: reply or awaitable
            survivor.key("arq-job-runner"), mapping={"job-1": "dead-worker", "job-2": "dead-worker"}
        )
        await redis.set(in_progress_key_prefix + "job-1", b"1")
        await redis.set(in_progress_key_prefix + "job-2", b"1")
        await _rerun_dead_jobs(survivor)
        assert await redis.exists(in_progress_key_prefix + "job-1") == 0
        assert await redis.exists(in_progress_key_prefix + "job-2") == 0
        assert await redis.smembers(survivor.key("arq-workers")) == {survivor.member.encode()}  # type: ignore[misc]  # redis-py: reply or awaitable


async def test_the_jobs_of_a_worker_that_holds_its_fence_are_not_run_again(
    redis: Redis, account_name: str
) -> None:
    # A worker whose lease looks expired (Redis paused, or nobody reaped it
    # yet) still holds its fence: its job may be running; it is not run again.
    async with (
        RedisAccount(redis, name=account_name, lease=0.2) as survivor,
        RedisAccount(redis, name=account_name, lease=0.2) as stalled,
    ):
        assert stalled._renewer is not None
        stalled._renewer.cancel()
        await redis.zadd(survivor.key("members"), {stalled.member: 0})  # lease "expired"
        await redis.sadd(survivor.key("arq-workers"), stalled.member)  # type: ignore[misc]  # redis-py: reply or awaitable
        await redis.sadd(survivor.key(f"arq-jobs:{stalled.member}"), "job-3")  # type: ignore[misc]  # redis-py: reply or awaitable
        await redis.hset(survivor.key("arq-job-runner"), "job-3", stalled.member)  # type: ignore[misc]  # redis-py: reply or awaitable
        await redis.set(in_progress_key_prefix + "job-3", b"1")
        await _rerun_dead_jobs(survivor)
        assert await redis.exists(in_progress_key_prefix + "job-3") == 1
        await survivor.renew()  # a script reaps it: now it is dead
        await _rerun_dead_jobs(survivor)
        assert await redis.exists(in_progress_key_prefix + "job-3") == 0


async def test_a_late_survivor_does_not_release_a_job_that_started_again(
    redis: Redis, account_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two survivors release a dead worker's jobs. The late one read the dead
    # worker's job set, then the early one released the jobs and a worker started
    # job-1 again (its arq mark set anew), then the late one deleted the marks it
    # had read: arq started job-1 a second time in the same worker, which failed it
    # with KeyError('job-1') while its task ran (nemesis seeds 3036, 3039).
    mark = in_progress_key_prefix + "job-1"
    async with (
        RedisAccount(redis, name=account_name, lease=0.2) as late,
        RedisAccount(redis, name=account_name, lease=0.2) as early,
    ):
        await redis.sadd(late.key("arq-workers"), "dead-worker")  # type: ignore[misc]  # redis-py: reply or awaitable
        await redis.sadd(late.key("arq-jobs:dead-worker"), "job-1")  # type: ignore[misc]  # redis-py: reply or awaitable
        await redis.hset(late.key("arq-job-runner"), "job-1", "dead-worker")  # type: ignore[misc]  # redis-py: reply or awaitable
        await redis.set(mark, b"1")
        started_again = False

        async def start_again() -> None:
            nonlocal started_again
            started_again = True
            await _rerun_dead_jobs(early)
            assert await redis.exists(mark) == 0  # released once
            await redis.set(mark, b"1")  # a worker picked job-1 up again
            await redis.hset(early.key("arq-job-runner"), "job-1", early.member)  # type: ignore[misc]  # redis-py: reply or awaitable

        real_delete = redis.delete

        async def delete_after_the_early_release(*names: str | bytes) -> int:
            if not started_again and any(str(name) == mark for name in names):
                await start_again()
            return await real_delete(*names)  # type: ignore[no-any-return]  # redis-py: untyped reply

        monkeypatch.setattr(redis, "delete", delete_after_the_early_release)
        await _rerun_dead_jobs(late)
        if not started_again:  # the late pass released atomically: the early one comes after
            await start_again()
        assert await redis.exists(mark) == 1


async def test_a_job_a_dead_worker_no_longer_runs_is_not_released(
    redis: Redis, account_name: str
) -> None:
    # The dead worker's set still names job-4: cancelled at its shutdown while
    # Redis paused, the removal was lost; arq ran it again on a live worker. Its
    # mark deleted, arq started it a second time in that worker, which failed it
    # with KeyError('job-4') while its task ran (nemesis seed 3043).
    async with (
        RedisAccount(redis, name=account_name, lease=0.2) as survivor,
        RedisAccount(redis, name=account_name, lease=0.2) as runner,
    ):
        await redis.sadd(survivor.key("arq-workers"), "dead-worker", runner.member)  # type: ignore[misc]  # redis-py: reply or awaitable
        await redis.sadd(survivor.key("arq-jobs:dead-worker"), "job-4", "job-5")  # type: ignore[misc]  # redis-py: reply or awaitable
        await redis.sadd(survivor.key(f"arq-jobs:{runner.member}"), "job-4")  # type: ignore[misc]  # redis-py: reply or awaitable
        await redis.hset(  # type: ignore[misc]  # redis-py: reply or awaitable
            survivor.key("arq-job-runner"), mapping={"job-4": runner.member, "job-5": "dead-worker"}
        )
        await redis.set(in_progress_key_prefix + "job-4", b"1")
        await redis.set(in_progress_key_prefix + "job-5", b"1")
        await _rerun_dead_jobs(survivor)
        assert await redis.exists(in_progress_key_prefix + "job-4") == 1  # runs on `runner`
        assert await redis.exists(in_progress_key_prefix + "job-5") == 0
        assert await redis.smembers(survivor.key("arq-jobs:dead-worker")) == set()  # type: ignore[misc]  # redis-py: reply or awaitable
