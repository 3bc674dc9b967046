"""The arq integration in one process: a burst worker built by worker_settings
runs generate jobs against FakeKlingServer on loopback, on a real redis-server."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytest.importorskip("arq", reason="the arq tests need the arq extra")

from arq import create_pool
from arq.connections import RedisSettings
from arq.constants import in_progress_key_prefix
from arq.worker import Worker
from redis.asyncio import Redis

from kling_async.contrib.arq import _rerun_dead_jobs, _Unstarted, job_key, worker_settings
from kling_async.contrib.redis import RedisAccount, RedisLedger
from kling_async.testing import FakeKlingServer, RedisServer
from tests.helpers import API_KEY, FAST_POLL, eventually
from tests.scaleout.test_redis_shared import stall


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
        await stall(stalled)
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


def _settings(server: FakeKlingServer, redis_server: RedisServer, name: str, **options: Any) -> Any:
    return worker_settings(
        capacity=4,
        redis_url=redis_server.url,
        account=name,
        member=f"worker-{name}",
        client_options={"api_key": API_KEY, "base_url": server.url, "polling": FAST_POLL},
        queue_name=f"arq:{name}",
        handle_signals=False,
        poll_delay=0.02,
        **options,
    )


@pytest.mark.filterwarnings("ignore:Call to deprecated close:DeprecationWarning")  # arq's own
async def test_a_job_started_again_in_its_own_worker_returns_its_result(
    redis_server: RedisServer, account_name: str
) -> None:
    # The job's in-progress mark is deleted while it runs (the arq of a worker
    # taken for dead, restarted while its stale run of the job was going on,
    # deletes it as it cancels that run): arq starts the job again in the worker
    # that runs it, and the later of the two runs to end failed with
    # KeyError(job_id) (nemesis seed 6023) while its task ran.
    async with FakeKlingServer(api_key=API_KEY, concurrency_limit=4, task_duration=0.6) as server:
        worker = Worker(**_settings(server, redis_server, account_name))
        pool = await create_pool(RedisSettings.from_dsn(redis_server.url))
        running = asyncio.ensure_future(worker.main())
        try:
            job = await pool.enqueue_job(
                "generate", {"prompt": "once", "n": 1}, _job_id=f"{account_name}:1",
                _queue_name=f"arq:{account_name}",
            )  # fmt: skip
            assert job is not None
            await eventually(lambda: len(server.tasks) == 1)
            await pool.delete(in_progress_key_prefix + f"{account_name}:1")
            await eventually(lambda: worker.jobs_complete >= 1, timeout=10)
            result = await job.result(timeout=10, poll_delay=0.05)
            await eventually(lambda: not worker.tasks, timeout=10)
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
            await worker.close()
            await pool.aclose()
        assert result["status"] == "succeed"
        assert worker.jobs_failed == 0
        assert len(server.tasks) == 1


async def test_a_job_picked_by_a_worker_that_never_started_it_is_released(
    redis: Redis, account_name: str
) -> None:
    # A worker died between arq's pick (the in-progress mark set) and
    # on_job_start (its runner recorded): no worker's set names the job, and it
    # ran again only when the mark expired, job timeout + 10 s later (seed 5021).
    queue = f"arq:{account_name}"
    async with RedisAccount(redis, name=account_name, lease=0.2) as survivor:
        runner = survivor.key("arq-job-runner")
        await redis.zadd(queue, {"picked": 1, "running": 2, "waiting": 3})
        await redis.psetex(in_progress_key_prefix + "picked", 60_000, b"1")
        await redis.psetex(in_progress_key_prefix + "running", 60_000, b"1")
        await redis.hset(runner, "running", "a-live-worker")  # type: ignore[misc]  # redis-py: reply or awaitable
        unstarted = _Unstarted(survivor, queue)
        assert await unstarted.release() == 0  # seen once: a live worker may start it now
        assert set(unstarted.seen) == {"picked"}
        await asyncio.sleep(0.25)
        assert await unstarted.release() == 1
        assert await redis.exists(in_progress_key_prefix + "picked") == 0
        assert await redis.exists(in_progress_key_prefix + "running") == 1
        # A mark set again (picked anew) is watched anew.
        await redis.psetex(in_progress_key_prefix + "picked", 60_000, b"1")
        assert await unstarted.release() == 0
        await redis.psetex(in_progress_key_prefix + "picked", 70_000, b"1")
        await asyncio.sleep(0.25)
        assert await unstarted.release() == 0
        assert await redis.exists(in_progress_key_prefix + "picked") == 1


@pytest.mark.filterwarnings("ignore:Call to deprecated close:DeprecationWarning")  # arq's own
async def test_a_job_runs_on_the_endpoint_it_names(
    redis_server: RedisServer, account_name: str
) -> None:
    # Every declared task endpoint runs as a job, named by the job's argument
    # or its request's "endpoint"; the ledger counts the units the endpoint
    # declares (an omni-image series of 3: 3). A job that failed with a
    # ValidationError left a result arq could not read back.
    async with FakeKlingServer(api_key=API_KEY, concurrency_limit=4, task_duration=0.1) as server:
        worker = Worker(**_settings(server, redis_server, account_name, burst=True))
        pool = await create_pool(RedisSettings.from_dsn(redis_server.url))
        try:
            series = {
                "prompt": "a fox", "model_name": "kling-v3-omni", "result_type": "series",
                "series_amount": 3, "aspect_ratio": "1:1",
            }  # fmt: skip
            await pool.enqueue_job(
                "generate", series, "omni-image", _job_id=f"{account_name}:omni",
                _queue_name=f"arq:{account_name}",
            )  # fmt: skip
            await pool.enqueue_job(
                "generate", {"element_frontal_image": "https://example.com/front.png"},
                "multi-shot", _job_id=f"{account_name}:shot", _queue_name=f"arq:{account_name}",
            )  # fmt: skip
            await pool.enqueue_job(
                "generate", {"prompt": "no such", "endpoint": "images/nowhere"},
                _job_id=f"{account_name}:bad", _queue_name=f"arq:{account_name}",
            )  # fmt: skip
            await worker.main()
            await worker.close()
            omni = await pool._get_job_result(f"arq:result:{account_name}:omni".encode())
            shot = await pool._get_job_result(f"arq:result:{account_name}:shot".encode())
            bad = await pool._get_job_result(f"arq:result:{account_name}:bad".encode())
            redis = Redis.from_url(redis_server.url)
            async with RedisAccount(redis, name=account_name) as account:
                entry = await RedisLedger(account).by_key(job_key(f"{account_name}:omni"))
            await redis.aclose()
        finally:
            await pool.aclose()
        assert omni.result["status"] == "succeed"
        assert len(omni.result["images"]) == 3
        assert shot.result["status"] == "succeed"  # a request without n: one unit
        assert sorted(task.endpoint for task in server.tasks.values()) == [
            "general/ai-multi-shot",
            "images/omni-image",
        ]
        assert entry is not None
        assert entry.units == 3
        assert not bad.success  # reported, readable: nothing was sent
        assert "endpoint" in str(bad.result)
