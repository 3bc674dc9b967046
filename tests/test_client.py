"""Both endpoints end to end, and TaskHandle's contract, over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

import kling_async
from kling_async import (
    ClientClosedError,
    Endpoint,
    ImageGenerationRequest,
    MultiImageRequest,
    NotFoundError,
    PollPolicy,
    Task,
    TaskFailedError,
    TaskStatus,
    TaskTimeoutError,
    ValidationError,
)
from kling_async._tracking import TaskState
from kling_async.testing import FakeKlingServer
from tests.helpers import (
    API_KEY,
    FAST_POLL,
    FAST_RETRY,
    as_generator,
    assert_valid_png,
    eventually,
    fake_server_process,
    make_client,
)
from tests.imagedata import png


async def test_generate_end_to_end(client: kling_async.Client, server: FakeKlingServer) -> None:
    handle = await client.images.generate(prompt="a red fox", n=2, aspect_ratio="1:1")
    assert handle.task_id in server.tasks
    assert handle.status is TaskStatus.SUBMITTED
    assert handle.endpoint is Endpoint.GENERATIONS
    task = await handle
    assert task.status is TaskStatus.SUCCEED
    assert handle.done()
    assert [image.index for image in task.images] == [0, 1]
    assert all(image.url.startswith(server.origin) for image in task.images)
    assert task.external_task_id == handle.external_task_id
    assert task.created_at is not None
    assert task.updated_at is not None
    assert task.created_at <= task.updated_at
    sent = server.requests_for("create")[0].json
    assert sent == {
        "model_name": "kling-v3",
        "prompt": "a red fox",
        "n": 2,
        "aspect_ratio": "1:1",
        "external_task_id": handle.external_task_id,
    }


async def test_multi_image_end_to_end(client: kling_async.Client, server: FakeKlingServer) -> None:
    handle = await client.images.multi_image(
        subject_images=[png(400, 400), png(300, 600)], prompt="blend", style_image=png(500, 500)
    )
    assert handle.endpoint is Endpoint.MULTI_IMAGE
    task = await handle
    assert task.status is TaskStatus.SUCCEED
    assert len(task.images) == 1
    paths = {request.path for request in server.requests_for(endpoint="images/multi-image2image")}
    assert "/v1/images/multi-image2image" in paths
    assert f"/v1/images/multi-image2image/{task.task_id}" in paths
    assert not server.requests_for(endpoint="images/generations")


async def test_request_objects_are_accepted_and_keep_a_given_external_id(
    client: kling_async.Client, server: FakeKlingServer
) -> None:
    request = ImageGenerationRequest(prompt="p", external_task_id="order-42")
    handle = await client.images.generate(request)
    assert handle.external_task_id == "order-42"
    assert handle.request == request
    multi = await client.images.submit(MultiImageRequest(subject_images=[png(400, 400)]))
    assert multi.endpoint is Endpoint.MULTI_IMAGE
    assert server.task("order-42").task_id == handle.task_id


async def test_a_request_object_with_keyword_fields_beside_it_is_refused(
    client: kling_async.Client, server: FakeKlingServer
) -> None:
    request = ImageGenerationRequest(prompt="p")
    with pytest.raises(TypeError, match="not both; got the request and n, watermark"):
        await client.images.generate(request, n=4, watermark=False)
    multi = MultiImageRequest(subject_images=[png(400, 400)])
    with pytest.raises(TypeError, match=r"MultiImageRequest or keyword fields.*prompt"):
        await client.images.multi_image(multi, prompt="ignored otherwise")
    assert server.requests == []


async def test_missing_required_field_is_a_validation_error_before_sending(
    client: kling_async.Client, server: FakeKlingServer
) -> None:
    with pytest.raises(ValidationError, match="prompt: is required"):
        await client.images.generate(n=2)
    with pytest.raises(ValidationError, match="subject_images"):
        await client.images.multi_image(prompt="no subjects")
    with pytest.raises(ValidationError) as caught:
        await client.images.generate(prompt="p", image=png(100, 100))
    assert caught.value.field == "image"
    assert server.requests == []


async def test_failed_task_raises_with_kling_message(client: kling_async.Client) -> None:
    handle = await client.images.generate(prompt="please [fail]")
    with pytest.raises(TaskFailedError) as caught:
        await handle
    assert caught.value.task.status is TaskStatus.FAILED
    assert caught.value.task.status_message
    assert caught.value.task.status_message in str(caught.value)
    with pytest.raises(TaskFailedError):  # the outcome is remembered, no new request
        await handle.wait()


async def test_wait_timeout_leaves_the_handle_usable() -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=None) as server:
        async with make_client(server) as client:
            handle = await client.images.generate(prompt="slow")
            with pytest.raises(TaskTimeoutError) as caught:
                await handle.wait(timeout=0.1)
            assert caught.value.handle is handle
            assert isinstance(caught.value, TimeoutError)
            assert handle.task_id in str(caught.value)
            server.finish(handle.task_id)
            task = await caught.value.handle.wait(timeout=5)
            assert task.status is TaskStatus.SUCCEED


async def test_default_wait_deadline_comes_from_the_poll_policy() -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=None) as server:
        policy = kling_async.PollPolicy(initial_delay=0.02, max_delay=0.05, timeout=0.15)
        async with make_client(server, polling=policy) as client:
            handle = await client.images.generate(prompt="slow")
            with pytest.raises(TaskTimeoutError):
                await handle
            server.finish(handle.task_id)
            assert (await handle.wait(timeout=None)).status is TaskStatus.SUCCEED


async def test_cancelling_the_waiter_stops_polling() -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=None) as server:
        async with make_client(server) as client:
            handle = await client.images.generate(prompt="slow")
            waiter = asyncio.create_task(handle.wait())
            await eventually(lambda: len(server.requests_for("get")) >= 2)
            polls_before = len(server.requests_for("get"))
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            await asyncio.sleep(0.3)
            assert len(server.requests_for("get")) == polls_before
            server.finish(handle.task_id)
            assert (await handle).status is TaskStatus.SUCCEED  # still usable


async def test_unawaited_handles_cost_no_polls(
    client: kling_async.Client, server: FakeKlingServer
) -> None:
    await client.images.generate(prompt="fire and forget")
    await asyncio.sleep(0.3)
    assert server.requests_for("get") == []


async def test_many_waiters_share_one_session_and_leave_no_tasks_behind(
    server: FakeKlingServer,
) -> None:
    before = set(asyncio.all_tasks())
    async with make_client(server) as client:
        handles = [await client.images.generate(prompt=f"p{i}") for i in range(40)]
        session = client._transport.session()
        results = await asyncio.gather(*(handle.wait() for handle in handles * 2))
        assert {task.status for task in results} == {TaskStatus.SUCCEED}
        assert client._transport.session() is session
    await asyncio.sleep(0)
    assert set(asyncio.all_tasks()) - before == set()


async def test_updates_yield_each_status_change_in_order(client: kling_async.Client) -> None:
    handle = await client.images.generate(prompt="watch me")
    seen = [task.status async for task in handle.updates()]
    assert seen == [TaskStatus.SUBMITTED, TaskStatus.PROCESSING, TaskStatus.SUCCEED]
    again = [task.status async for task in handle.updates()]
    assert again == [TaskStatus.SUCCEED]


async def test_updates_yield_a_failure_without_raising(client: kling_async.Client) -> None:
    handle = await client.images.generate(prompt="[fail]")
    statuses = [task.status async for task in handle.updates()]
    assert statuses[-1] is TaskStatus.FAILED


async def test_refresh_is_one_get_and_feeds_waiters(
    client: kling_async.Client, server: FakeKlingServer
) -> None:
    handle = await client.images.generate(prompt="p")
    await eventually(lambda: server.tasks[handle.task_id].status == "succeed")
    task = await handle.refresh()
    assert task.status is TaskStatus.SUCCEED
    assert len(server.requests_for("get")) == 1
    assert handle.done()
    assert (await handle) is handle.task
    assert len(server.requests_for("get")) == 1


async def test_attach_sends_nothing_until_awaited(
    client: kling_async.Client, server: FakeKlingServer
) -> None:
    async with make_client(server) as other_process:
        original = await other_process.images.generate(prompt="p")
    count = len(server.requests)
    attached = client.images.attach(original.task_id)
    assert len(server.requests) == count
    assert attached.task is None
    assert attached.status is None
    assert "unknown" in repr(attached)
    task = await attached
    assert task.task_id == original.task_id
    multi = await client.images.multi_image(subject_images=[png(400, 400)])
    other = client.images.attach(multi.task_id, endpoint="images/multi-image2image")
    assert (await other).status is TaskStatus.SUCCEED


async def test_attaching_a_missing_task_raises_not_found_and_stays_usable(
    client: kling_async.Client,
) -> None:
    handle = client.images.attach("no-such-task")
    with pytest.raises(NotFoundError) as caught:
        await handle
    assert caught.value.code == 1203
    with pytest.raises(NotFoundError):
        await handle.wait(timeout=2)


async def test_get_by_task_id_and_external_id(
    client: kling_async.Client, server: FakeKlingServer
) -> None:
    handle = await client.images.generate(prompt="p", external_task_id="ext-7")
    by_id = await client.images.get(handle.task_id)
    by_external = await client.images.get("ext-7")
    assert by_id.task_id == by_external.task_id == handle.task_id
    assert handle.task is not None  # a get also updates the client's own handle
    with pytest.raises(NotFoundError):
        await client.images.get("nope")


async def test_list_pages_newest_first_and_honours_limit(
    client: kling_async.Client, server: FakeKlingServer
) -> None:
    ids = [(await client.images.generate(prompt=f"p{i}")).task_id for i in range(7)]
    listed = [task.task_id async for task in client.images.list(page_size=3)]
    assert listed == ids[::-1]
    assert len(server.requests_for("list")) == 3
    limited = [task.task_id async for task in client.images.list(page_size=2, limit=3)]
    assert limited == ids[::-1][:3]
    assert [t async for t in client.images.list(endpoint=Endpoint.MULTI_IMAGE)] == []
    with pytest.raises(ValueError, match="page_size"):
        [t async for t in client.images.list(page_size=501)]


async def test_close_ends_pending_waits_and_is_idempotent() -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=None) as server:
        client = make_client(server)
        handle = await client.images.generate(prompt="slow")
        waiter = asyncio.create_task(handle.wait())
        iterator = asyncio.ensure_future(anext(handle.updates().__aiter__()))
        await eventually(iterator.done)  # both are waiting on the handle by now
        await client.close()
        with pytest.raises(ClientClosedError, match="attach"):
            await waiter
        assert (await iterator).status is TaskStatus.SUBMITTED
        await client.close()
        assert client.closed
        with pytest.raises(ClientClosedError):
            await client.images.generate(prompt="after close")
        with pytest.raises(ClientClosedError):
            await handle.wait()


async def test_a_client_outside_async_with_is_lazy() -> None:
    client = kling_async.Client("k", base_url="http://127.0.0.1:9")
    assert client._transport._session is None  # nothing made in __init__
    await client.close()


async def test_handles_do_not_keep_client_state_alive() -> None:
    async with FakeKlingServer(api_key=API_KEY) as server, make_client(server) as client:
        handle = await client.images.generate(prompt="p")
        await handle
        key = (Endpoint.GENERATIONS, handle.task_id)
        assert client._tracker._states.get(key) is not None
        del handle
        gc.collect()
        assert client._tracker._states.get(key) is None


async def test_updates_can_be_closed_early(
    client: kling_async.Client, server: FakeKlingServer
) -> None:
    handle = await client.images.generate(prompt="p")
    async with contextlib.aclosing(as_generator(handle.updates())) as updates:
        async for _ in updates:
            break
    state = client._tracker.find(Endpoint.GENERATIONS, handle.task_id)
    assert state is not None
    assert state.interest == 0


# --- one client, several event loops; per-call options ---------------------------------------


@pytest.fixture
def fake_process_url() -> Iterator[str]:
    """A fake Kling server in its own process: it outlives the test's event loops."""
    with fake_server_process("--task-duration", "0.1") as server:
        yield server.url


def test_a_client_used_by_two_asyncio_runs_works_in_both_and_leaks_nothing(
    fake_process_url: str,
) -> None:
    # Defect: the second asyncio.run() failed with aiohttp's raw "Event loop is
    # closed", and the first session's socket leaked (a ResourceWarning, an error
    # under this suite's settings).
    client = make_client_for(fake_process_url)

    async def generate() -> str:
        task = await (await client.images.generate(prompt="a fox"))
        return task.task_id

    first = asyncio.run(generate())
    second = asyncio.run(generate())
    assert first != second
    asyncio.run(client.close())
    assert client.closed
    gc.collect()


def test_a_client_in_use_on_a_running_loop_refuses_a_second_one(fake_process_url: str) -> None:
    client = make_client_for(fake_process_url)
    started = threading.Event()
    release = threading.Event()

    async def hold() -> None:
        await client.images.generate(prompt="a fox")
        started.set()
        await asyncio.to_thread(release.wait)
        await client.close()

    thread = threading.Thread(target=asyncio.run, args=(hold(),))
    thread.start()
    try:
        assert started.wait(10)
        with pytest.raises(kling_async.EventLoopError, match="one event loop at a time"):
            asyncio.run(client.images.generate(prompt="elsewhere"))
    finally:
        release.set()
        thread.join(10)


def make_client_for(url: str) -> kling_async.Client:
    return kling_async.Client(API_KEY, base_url=url, polling=FAST_POLL, retry=FAST_RETRY)


async def test_with_options_overrides_timeout_and_retry_per_call(
    client: kling_async.Client, server: FakeKlingServer
) -> None:
    handle = await client.images.generate(prompt="a fox")
    server.inject("delay", route="get", delay=0.5, times=None)
    hasty = client.with_options(timeout=0.1, retry=kling_async.RetryPolicy(max_attempts=1))
    with pytest.raises(kling_async.TransportError):
        await hasty.images.get(handle.task_id)
    assert len(server.requests_for("get")) == 1  # one try: the copy's retry policy
    task = await client.images.get(handle.task_id)  # the client itself is unchanged
    assert task.task_id == handle.task_id
    server.clear_faults()
    made = await hasty.images.generate(prompt="through the copy")
    assert made.task_id in server.tasks
    await hasty.close()  # a copy owns nothing
    assert not client.closed
    await client.close()
    assert hasty.closed
    with pytest.raises(kling_async.ClientClosedError):
        await hasty.images.generate(prompt="after close")


async def test_run_submits_and_returns_the_finished_task_in_one_call(
    client: kling_async.Client, server: FakeKlingServer
) -> None:
    task = await client.images.run(kling_async.ImageGenerationRequest(prompt="a fox", n=2))
    assert task.status is TaskStatus.SUCCEED
    assert len(task.images) == 2
    assert [t.task_id for t in server.tasks.values()] == [task.task_id]
    with pytest.raises(TaskFailedError) as caught:
        await client.images.run(kling_async.ImageGenerationRequest(prompt="please [fail]"))
    assert caught.value.task.status is TaskStatus.FAILED


async def test_run_times_out_like_wait_and_its_handle_keeps_following() -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=None) as server:
        async with make_client(server) as client:
            request = kling_async.ImageGenerationRequest(prompt="slow")
            with pytest.raises(TaskTimeoutError) as caught:
                await client.images.run(request, timeout=0.1)
            handle = caught.value.handle
            server.finish(handle.task_id)
            assert (await handle.wait(timeout=5)).status is TaskStatus.SUCCEED
            assert len(server.tasks) == 1  # one create, however the wait ended


async def test_the_library_runs_offline_against_an_embedded_simulation(tmp_path: Path) -> None:
    """No key, no second process: ``Client.offline()`` starts and stops its own fake."""
    async with kling_async.Client.offline(task_seconds=0.05, polling=FAST_POLL) as client:
        assert client.base_url.startswith("http://127.0.0.1:")
        task = await client.images.run(kling_async.ImageGenerationRequest(prompt="a fox"))
        paths = await client.download(task, tmp_path)
    assert task.status is TaskStatus.SUCCEED
    assert_valid_png(Path(paths[0]))
    with pytest.raises(TypeError, match="chooses base_url"):
        async with kling_async.Client.offline(base_url="https://example.com"):
            pass
    async with FakeKlingServer(api_key=API_KEY) as server:
        async with kling_async.Client(base_url=server.url) as keyless:
            with pytest.raises(kling_async.ConfigurationError, match=r"Client\.offline\(\)"):
                await keyless.images.generate(prompt="p")


# --- what counts as news, and handles that end (mutation tests trk01-04, hdl10, pol03-05) ---------


def envelope_body(data: Any) -> bytes:
    return json.dumps({"code": 0, "message": "SUCCEED", "request_id": "r", "data": data}).encode()


def at(millis: int) -> datetime:
    return datetime.fromtimestamp(millis / 1000, tz=timezone.utc)


def task(status: str, updated: int) -> Task:
    return Task(task_id="t", status=TaskStatus(status), updated_at=at(updated), raw={"u": updated})


def test_is_news_rules() -> None:
    state = TaskState(Endpoint.GENERATIONS, "t", latest=task("processing", 1000))
    assert state.is_news(task("processing", 1001))  # newer
    assert not state.is_news(task("processing", 1000))  # duplicate
    assert not state.is_news(task("submitted", 999))  # stale
    assert not state.is_news(task("submitted", 1000))  # earlier stage, same millisecond
    assert state.is_news(task("succeed", 1000))  # later stage, same millisecond
    state.latest = task("succeed", 1000)
    assert not state.is_news(task("processing", 5000))  # nothing after a terminal state
    assert not state.is_news(task("failed", 6000))


async def test_a_terminal_task_stays_terminal(
    client: kling_async.Client, server: FakeKlingServer
) -> None:
    handle = await client.images.generate(prompt="p")
    done = await handle
    later = dict(done.raw, task_status="processing", updated_at=int(time.time() * 1000) + 60_000)
    server.inject("garbage", route="get", http_status=200, body=envelope_body(later))
    await handle.refresh()
    assert handle.status is TaskStatus.SUCCEED


async def test_stale_and_same_time_earlier_updates_do_not_roll_back() -> None:
    async with (
        FakeKlingServer(api_key=API_KEY, task_duration=None, processing_delay=0.01) as server,
        make_client(server) as client,
    ):
        handle = await client.images.generate(prompt="p")
        await eventually(lambda: server.tasks[handle.task_id].status == "processing")
        current = await handle.refresh()
        assert current.status is TaskStatus.PROCESSING
        stamp = int(current.raw["updated_at"])
        for updated in (stamp - 1000, stamp):
            older = dict(current.raw, task_status="submitted", updated_at=updated)
            server.inject("garbage", route="get", http_status=200, body=envelope_body(older))
            await handle.refresh()
            assert handle.status is TaskStatus.PROCESSING


async def test_updates_raise_errors_that_end_polling(client: kling_async.Client) -> None:
    with pytest.raises(NotFoundError):
        [task async for task in client.images.attach("nope").updates()]


async def test_updates_raise_when_the_client_closes() -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=None) as server:
        client = make_client(server)
        handle = await client.images.generate(prompt="p")

        async def drain() -> list[Task]:
            return [task async for task in handle.updates()]

        draining = asyncio.create_task(drain())
        await asyncio.sleep(0.05)
        await client.close()
        with pytest.raises(ClientClosedError):
            await draining


async def test_an_unexpected_bug_while_polling_ends_the_wait(
    client: kling_async.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = await client.images.generate(prompt="p")

    def broken(_: object) -> Task:
        raise RuntimeError("bug")

    monkeypatch.setattr("kling_async._polling.parse_task", broken)
    with pytest.raises(kling_async.KlingError, match="bug"):
        await handle.wait(timeout=5)


async def test_no_poll_before_the_first_delay_and_gaps_grow_with_age() -> None:
    policy = PollPolicy(initial_delay=0.05, multiplier=3.0, max_delay=0.4, jitter=0.0, timeout=10)
    async with (
        FakeKlingServer(api_key=API_KEY, task_duration=None) as server,
        make_client(server, polling=policy) as client,
    ):
        handle = await client.images.generate(prompt="p")
        with pytest.raises(kling_async.TaskTimeoutError):
            await handle.wait(timeout=0.03)
        assert server.requests_for("get") == []
        with pytest.raises(kling_async.TaskTimeoutError):
            await handle.wait(timeout=1.2)
        times = [r.arrived_at for r in server.requests_for("get")]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert len(gaps) >= 3
    assert gaps[-1] > gaps[0] * 1.5  # older task, longer gap
    assert max(gaps) <= 0.4 + 0.1  # never beyond max_delay
