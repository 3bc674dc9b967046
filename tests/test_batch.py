"""client.batch() against the fake server's n-weighted quota, and list-mode polling."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator

import pytest

import kling_async
from kling_async import (
    BatchResult,
    ConcurrencyLimiter,
    ContentPolicyError,
    ImageGenerationRequest,
    PermissionDeniedError,
    QuotaExceededError,
    TaskFailedError,
    TaskStatus,
)
from kling_async.testing import FakeKlingServer, FakeTask
from tests.helpers import API_KEY, as_generator, eventually, make_client


def prompt_of(result: BatchResult) -> str:
    """The prompt of a result's request (every request here is an image generation)."""
    assert isinstance(result.request, ImageGenerationRequest)
    return result.request.prompt


def requests(count: int, *, n: int = 1, prefix: str = "p") -> list[ImageGenerationRequest]:
    return [ImageGenerationRequest(prompt=f"{prefix}{i}", n=n) for i in range(count)]


def mixed(count: int) -> list[ImageGenerationRequest]:
    return [ImageGenerationRequest(prompt=f"m{i}", n=1 + (i * 7) % 9) for i in range(count)]


def fast_limiter(capacity: int | None) -> ConcurrencyLimiter:
    return ConcurrencyLimiter(capacity, min_cooldown=0.05, fairness_window=0.1)


async def test_results_come_in_completion_order_with_their_inputs() -> None:
    durations = {"slow": 0.5, "medium": 0.25, "quick": 0.05}

    def duration(task: FakeTask) -> float:
        return durations[str(task.prompt)]

    async with FakeKlingServer(api_key=API_KEY, task_duration=duration) as server:
        async with make_client(server) as client:
            batch = client.batch(
                [ImageGenerationRequest(prompt=p) for p in ("slow", "medium", "quick")]
            )
            results = [result async for result in batch]
    assert [r.index for r in results] == [2, 1, 0]
    for result in results:
        assert result.ok
        assert result.error is None
        assert result.task is not None
        assert result.handle is not None
        assert result.task.task_id == result.handle.task_id
        assert prompt_of(result) == ("slow", "medium", "quick")[result.index]
        assert result.request.external_task_id == result.handle.external_task_id


async def test_the_quota_is_never_exceeded_and_never_answers_1303() -> None:
    async with FakeKlingServer(
        api_key=API_KEY, concurrency_limit=20, task_duration=0.1, processing_delay=0.02
    ) as server:
        async with make_client(server, max_concurrency=fast_limiter(20)) as client:
            results = await client.batch(mixed(40)).collect()
    assert [r.index for r in results] == list(range(40))
    assert all(r.ok for r in results)
    assert server.peak_units <= 20
    assert server.peak_units >= 15  # and it was kept busy
    assert [r.code for r in server.requests_for("create")].count(1303) == 0
    assert len(server.tasks) == 40


async def test_concurrency_errors_are_recovered_without_losing_or_doubling_tasks() -> None:
    # The client believes in 30 units; the account really has 12.
    async with FakeKlingServer(
        api_key=API_KEY, concurrency_limit=12, task_duration=0.1, processing_delay=0.02
    ) as server:
        limiter = fast_limiter(30)
        async with make_client(server, max_concurrency=limiter) as client:
            results = await client.batch(requests(60, n=2)).collect()
    assert all(r.ok for r in results)
    codes = [r.code for r in server.requests_for("create")]
    assert 1303 in codes
    assert codes.count(0) == 60
    assert len(server.tasks) == 60
    assert limiter.rejected_creates == codes.count(1303)
    assert limiter.in_use == 0


async def test_an_unknown_quota_is_learned() -> None:
    async with FakeKlingServer(
        api_key=API_KEY, concurrency_limit=10, task_duration=0.1, processing_delay=0.02
    ) as server:
        async with make_client(server) as client:
            client._learned_limiter = fast_limiter(None)
            results = await client.batch(requests(60)).collect()
            learned = client._learned_limiter.limit
    assert all(r.ok for r in results)
    codes = [r.code for r in server.requests_for("create")]
    assert codes.count(0) == 60
    assert codes.count(1303) <= 15  # a few while probing, not one per task
    assert 8 <= learned <= 14


async def test_a_large_task_is_not_starved_in_a_batch() -> None:
    async with FakeKlingServer(
        api_key=API_KEY, concurrency_limit=10, task_duration=0.1, processing_delay=0.02
    ) as server:
        batch_requests = requests(5, prefix="a")
        batch_requests.append(ImageGenerationRequest(prompt="large", n=9))
        batch_requests += requests(60, prefix="b")
        async with make_client(server, max_concurrency=fast_limiter(10)) as client:
            order = [prompt_of(r) async for r in client.batch(batch_requests)]
    assert server.peak_units <= 10
    # It waits at most the fairness window for room, not for the 60 behind it.
    assert order.index("large") < 30


async def test_failures_are_results_and_do_not_stop_the_others(
    server: FakeKlingServer,
) -> None:
    server.inject("error", route="create", code=1301, message="unsafe prompt", times=1)
    async with make_client(server) as client:
        batch_requests = requests(6)
        batch_requests[3] = ImageGenerationRequest(prompt="[fail] please")
        results = await client.batch(batch_requests).collect()
    refused = [r for r in results if r.handle is None]
    assert len(refused) == 1
    assert isinstance(refused[0].error, ContentPolicyError)
    failed = results[3]
    assert isinstance(failed.error, TaskFailedError)
    assert failed.task is not None
    assert failed.task.status is TaskStatus.FAILED
    assert not failed.ok
    assert sum(r.ok for r in results) == 4


async def test_results_become_plain_json_ready_dicts(server: FakeKlingServer) -> None:
    server.inject("error", route="create", code=1301, message="unsafe prompt", times=1)
    async with make_client(server) as client:
        batch_requests = requests(3)
        batch_requests[2] = ImageGenerationRequest(prompt="[fail] please")
        # One at a time, so the injected 1301 meets the first request, not the failing one.
        results = await client.batch(batch_requests, max_in_flight=1).collect()
    records = [json.loads(json.dumps(result.to_dict())) for result in results]
    assert records == [json.loads(result.to_json()) for result in results]
    refused = records[0]
    assert refused["task_id"] is None
    assert refused["ok"] is False
    assert refused["task"] is None
    assert refused["error"]["type"] == "ContentPolicyError"
    assert refused["error"]["code"] == 1301
    assert "request_id" in refused["error"]
    assert refused["external_task_id"]
    failed = records[2]
    assert failed["error"] == {
        "type": "TaskFailedError",
        "message": f"task {failed['task_id']} failed: Content review failed (simulated)",
        "task_id": failed["task_id"],
    }
    assert failed["task"]["status"] == "failed"
    [good] = [r for r in records if r["ok"]]
    assert good["index"] == 1
    assert good["error"] is None
    assert good["task"]["status"] == "succeed"
    assert good["task"]["images"][0]["url"].startswith(server.origin)


@pytest.mark.parametrize(
    ("code", "cls"), [(1102, QuotaExceededError), (1304, PermissionDeniedError)]
)
async def test_account_problems_stop_the_batch(code: int, cls: type[Exception]) -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.3) as server:
        async with make_client(server, max_concurrency=fast_limiter(4)) as client:
            batch = client.batch(requests(50))
            seen = []

            async def consume() -> None:
                async for result in batch:
                    seen.append(result)
                    if len(seen) == 1:
                        server.inject("error", route="create", code=code, times=None)

            with pytest.raises(cls):
                await consume()
            await asyncio.sleep(0.05)  # creates already on the wire still arrive
            creates = server.requests_for("create")
            await asyncio.sleep(0.2)
            assert len(server.requests_for("create")) == len(creates)  # nothing more is sent
            assert len(creates) < 20
            # Every create that reached Kling is accounted for: a handle, a create
            # cut short (uncertain), or the refusal that stopped the batch.
            made = {h.external_task_id for h in batch.handles}
            refused = {r.external_task_id for r in creates if r.code == code}
            assert {r.external_task_id for r in creates} <= made | refused | set(batch.uncertain)


async def test_breaking_out_stops_submitting_and_leaves_tasks_attached(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="kling_async")
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.3) as server:
        limiter = fast_limiter(5)
        async with make_client(server, max_concurrency=limiter) as client:
            batch = client.batch(requests(40))
            async with contextlib.aclosing(as_generator(batch.__aiter__())) as results:
                async for _ in results:
                    break
            creates = len(server.requests_for("create"))
            assert creates <= 10
            # Creates on the wire at the break got their answer: every task Kling
            # created is attached, none is left uncertain.
            created = {r.external_task_id for r in server.requests_for("create") if r.code == 0}
            assert created == {handle.external_task_id for handle in batch.handles}
            assert batch.uncertain == []
            pending = batch.pending
            assert pending
            await asyncio.sleep(0.3)
            assert len(server.requests_for("create")) == creates
            # The running tasks are still polled, so their units come back.
            await asyncio.gather(*(handle.wait() for handle in pending))
            await eventually(lambda: limiter.in_use == 0)
    assert any("still running on Kling" in record.getMessage() for record in caplog.records)


async def test_breaking_out_while_creates_are_on_the_wire_loses_no_task() -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.2) as server:
        async with make_client(server, max_concurrency=fast_limiter(5)) as client:
            batch = client.batch(requests(20))
            async with contextlib.aclosing(as_generator(batch.__aiter__())) as results:
                async for _ in results:
                    server.inject("delay", route="create", delay=0.3, times=None)
                    sent = len(server.requests_for("create"))
                    # The next creates are on the wire now, their answers slow.
                    await eventually(lambda: len(server.requests_for("create")) > sent)  # noqa: B023
                    break
            await asyncio.sleep(0.4)  # any create cut short would have landed by now
            on_kling = {task.external_task_id for task in server.tasks.values()}
            assert on_kling == {handle.external_task_id for handle in batch.handles}
            assert batch.uncertain == []
            await asyncio.gather(*(handle.wait() for handle in batch.pending))


async def test_max_in_flight_caps_running_tasks() -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.1) as server:
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, server.live_tasks)
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        async with make_client(server) as client:
            results = await client.batch(requests(30), max_in_flight=4).collect()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    assert all(r.ok for r in results)
    assert peak <= 4


async def test_async_iterable_input_and_iterator_errors(client: kling_async.Client) -> None:
    async def generate() -> AsyncIterator[ImageGenerationRequest]:
        for i in range(3):
            yield ImageGenerationRequest(prompt=f"a{i}")

    assert len(await client.batch(generate()).collect()) == 3

    def broken() -> AsyncIterator[ImageGenerationRequest]:
        async def inner() -> AsyncIterator[ImageGenerationRequest]:
            yield ImageGenerationRequest(prompt="ok")
            raise RuntimeError("bad input file")

        return inner()

    with pytest.raises(RuntimeError, match="bad input file"):
        await client.batch(broken()).collect()


async def test_a_batch_is_iterated_once(client: kling_async.Client) -> None:
    batch = client.batch([])
    assert await batch.collect() == []
    with pytest.raises(RuntimeError, match="once"):
        batch.__aiter__()
    with pytest.raises(ValueError, match="max_in_flight"):
        client.batch([], max_in_flight=0)


async def test_generate_with_max_concurrency_queues_instead_of_failing() -> None:
    async with FakeKlingServer(api_key=API_KEY, concurrency_limit=3, task_duration=0.1) as server:
        async with make_client(server, max_concurrency=fast_limiter(3)) as client:
            handles = await asyncio.gather(
                *(client.images.generate(prompt=f"p{i}", n=1) for i in range(9))
            )
            tasks = await asyncio.gather(*handles)
    assert all(task.status is TaskStatus.SUCCEED for task in tasks)
    assert server.peak_units <= 3
    assert [r.code for r in server.requests_for("create")].count(1303) == 0


# --- the shared poller reads list pages when many tasks are in flight ---------------------


async def test_many_tasks_in_flight_are_polled_through_list_pages() -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.5, processing_delay=0.1) as server:
        async with make_client(server) as client:
            handles = [await client.images.generate(prompt=f"p{i}") for i in range(60)]
            tasks = await asyncio.gather(*handles)
    assert {task.status for task in tasks} == {TaskStatus.SUCCEED}
    lists = server.requests_for("list")
    gets = server.requests_for("get")
    assert lists
    # Pages sized to what is in flight: the first covers all 60, far short of 500.
    sizes = [int(r.query["pageSize"]) for r in lists]
    assert 60 <= sizes[0] <= 200
    assert max(sizes) <= 200
    # Per-task polling at this cadence would send several GETs per task.
    assert len(lists) + len(gets) < 60


async def test_tasks_missing_from_recent_pages_fall_back_to_single_gets() -> None:
    async with FakeKlingServer(
        api_key=API_KEY, task_duration=None, processing_delay=0.01
    ) as server:
        async with make_client(server) as client, make_client(server) as busy_neighbour:
            ours = [await client.images.generate(prompt=f"ours{i}") for i in range(25)]
            for start in range(0, 1600, 100):
                await asyncio.gather(
                    *(
                        busy_neighbour.images.generate(prompt=f"x{i}")
                        for i in range(start, start + 100)
                    )
                )
            waiters = asyncio.gather(*ours)
            await asyncio.sleep(0.3)
            for handle in ours:
                server.finish(handle.task_id)
            tasks = await asyncio.wait_for(waiters, 10)
    assert {task.status for task in tasks} == {TaskStatus.SUCCEED}
    got = {r.path.rsplit("/", 1)[-1] for r in server.requests_for("get")}
    assert {handle.task_id for handle in ours} <= got
