"""Callbacks: verified, deduplicated, confirmed, with polling as the safety net."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from kling_async import (
    CallbackReceiver,
    Client,
    ConfigurationError,
    ImageGenerationRequest,
    PollPolicy,
    Task,
    TaskStatus,
    ValidationError,
)
from kling_async.testing import CallbackFaults, FakeKlingServer
from tests.helpers import API_KEY, make_client

SECRET = "callback-secret-0123456789abcdef"
# Callbacks on: the safety-net poll is far away, so whatever resolves a task
# within a test's time is a callback (unless the test makes a task overdue).
CALLBACK_POLLING = PollPolicy(
    initial_delay=0.02, max_delay=0.1, timeout=10.0, callback_delay=30.0, overdue_factor=50.0
)


@pytest.fixture
async def receiver() -> AsyncIterator[CallbackReceiver]:
    receiver = CallbackReceiver(secret=SECRET)
    async with receiver.serve() as url:
        assert receiver.public_url == url
        yield receiver
    await receiver.close()


def task_payload(task: Task, **changes: Any) -> bytes:
    data = dict(task.raw)
    data.update(changes)
    return json.dumps(data).encode()


async def post(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.post(url, data=body) as response:
        if response.content_type != "application/json":
            return response.status, {}
        return response.status, await response.json()


# --- resolution by callback ---------------------------------------------------------------


async def test_callbacks_resolve_handles_without_polling(
    server: FakeKlingServer, receiver: CallbackReceiver
) -> None:
    async with make_client(server, callbacks=receiver, polling=CALLBACK_POLLING) as client:
        handles = [await client.images.generate(prompt=f"p{i}") for i in range(5)]
        started = time.monotonic()
        tasks = await asyncio.gather(*(handle.wait() for handle in handles))
    assert time.monotonic() - started < 5  # the safety-net poll is 30 s away
    assert {task.status for task in tasks} == {TaskStatus.SUCCEED}
    for handle in handles:
        callback_url = server.task(handle.task_id).callback_url
        assert callback_url is not None
        assert callback_url.startswith(str(receiver.public_url))
        assert receiver.token_for(str(handle.external_task_id)) in callback_url
        # At most the GET confirming the terminal callback (confirmations due
        # together may share one list page instead).
        gets = [r for r in server.requests_for("get") if r.path.endswith(handle.task_id)]
        assert len(gets) <= 1
    # Nothing but confirmations: one request per task at most.
    assert len(server.requests_for("get")) + len(server.requests_for("list")) <= 5
    assert all(record.delivered for record in server.callbacks)


async def test_updates_yield_callback_updates(
    server: FakeKlingServer, receiver: CallbackReceiver
) -> None:
    async with make_client(server, callbacks=receiver, polling=CALLBACK_POLLING) as client:
        handle = await client.images.generate(prompt="p")
        statuses = [task.status async for task in handle.updates()]
    assert statuses == [TaskStatus.SUBMITTED, TaskStatus.PROCESSING, TaskStatus.SUCCEED]


async def test_failed_task_by_callback(server: FakeKlingServer, receiver: CallbackReceiver) -> None:
    async with make_client(server, callbacks=receiver, polling=CALLBACK_POLLING) as client:
        handle = await client.images.generate(prompt="[fail]")
        with pytest.raises(Exception, match="Content review failed"):
            await handle


async def test_a_callers_own_callback_url_is_left_alone(
    server: FakeKlingServer, receiver: CallbackReceiver
) -> None:
    own = f"{server.origin}/_fake/callbacks/mine"
    async with make_client(server, callbacks=receiver) as client:
        handle = await client.images.generate(prompt="p", callback_url=own)
        await handle
    assert server.task(handle.task_id).callback_url == own


# --- the safety net -----------------------------------------------------------------------


async def test_lost_callbacks_are_caught_by_polling_once_the_task_is_overdue(
    receiver: CallbackReceiver,
) -> None:
    async with FakeKlingServer(
        api_key=API_KEY, task_duration=0.1, callback_faults=CallbackFaults(drop=1.0)
    ) as server:
        policy = PollPolicy(initial_delay=0.02, max_delay=0.1, callback_delay=0.4, timeout=10)
        async with make_client(server, callbacks=receiver, polling=policy) as client:
            handle = await client.images.generate(prompt="p")
            started = time.monotonic()
            task = await handle
            waited = time.monotonic() - started
    assert task.status is TaskStatus.SUCCEED
    assert 0.3 <= waited < 3  # no callback came: the overdue poll at ~0.4 s found it
    assert not any(record.delivered for record in server.callbacks)


async def test_polling_stays_slow_while_callbacks_are_expected(
    receiver: CallbackReceiver,
) -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=None) as server:
        async with make_client(server, callbacks=receiver, polling=CALLBACK_POLLING) as client:
            handle = await client.images.generate(prompt="p")
            waiter = asyncio.create_task(handle.wait())
            await asyncio.sleep(0.5)
            assert server.requests_for("get") == []  # polling alone would have sent ~10
            server.finish(handle.task_id)
            assert (await waiter).status is TaskStatus.SUCCEED


async def test_overdue_is_learned_from_finished_tasks(receiver: CallbackReceiver) -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.1) as server:
        policy = PollPolicy(
            initial_delay=0.02, max_delay=0.05, callback_delay=30, overdue_factor=3, timeout=10
        )
        async with make_client(server, callbacks=receiver, polling=policy) as client:
            await (await client.images.generate(prompt="teaches ~0.1 s"))
            typical = client._tracker.typical_duration
            assert typical is not None
            assert typical < 1
            handle = await client.images.generate(prompt="p", callback_url=None)
            server.task(handle.task_id).callback_url = None  # its callbacks go nowhere
            started = time.monotonic()
            await handle
    assert time.monotonic() - started < 3  # not the 30 s safety net


# --- the receiver's rules -----------------------------------------------------------------


async def test_wrong_or_missing_token_is_404_and_dispatches_nothing(
    server: FakeKlingServer, receiver: CallbackReceiver
) -> None:
    # The server never moves the task on: only a forged callback could.
    async with FakeKlingServer(
        api_key=API_KEY, task_duration=None, processing_delay=60
    ) as slow_server:
        async with make_client(slow_server, callbacks=receiver, polling=CALLBACK_POLLING) as c:
            handle = await c.images.generate(prompt="p")
            ext = str(handle.external_task_id)
            finished = task_payload(handle.task or pytest.fail("no task"), task_status="succeed")
            base = str(receiver.public_url)
            other = receiver.token_for("someone-else")
            for url in (
                f"{base}/{ext}/{'0' * 64}",
                f"{base}/{ext}/{other}",
                f"{base}/{ext}",
                f"{base}/{ext}/{receiver.token_for(ext)[:-1]}",
            ):
                status, _ = await post(url, finished)
                assert status == 404, url
            assert handle.status is TaskStatus.SUBMITTED
            assert slow_server.requests_for("get") == []


async def test_token_is_an_hmac_of_the_external_id_and_secrets_can_be_shared(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    random_a, random_b = CallbackReceiver("http://h/cb"), CallbackReceiver("http://h/cb")
    assert random_a.token_for("x") != random_b.token_for("x")  # random per receiver
    monkeypatch.setenv("KLING_CALLBACK_SECRET", SECRET)
    shared_a, shared_b = CallbackReceiver("http://h/cb"), CallbackReceiver("http://h/cb")
    assert (
        shared_a.token_for("x")
        == shared_b.token_for("x")
        == CallbackReceiver("http://h/cb", secret=SECRET).token_for("x")
    )
    assert shared_a.token_for("x") != shared_a.token_for("y")
    assert len(shared_a.token_for("x")) == 64
    assert shared_a.url_for("a/b") == f"http://h/cb/a%2Fb/{shared_a.token_for('a/b')}"
    assert SECRET not in repr(shared_a)
    with pytest.raises(Exception, match="16 bytes"):
        CallbackReceiver("http://h", secret="short")


async def test_callback_tokens_stay_out_of_reprs_and_errors(
    server: FakeKlingServer, receiver: CallbackReceiver
) -> None:
    async with make_client(server, callbacks=receiver, polling=CALLBACK_POLLING) as client:
        handle = await client.images.generate(prompt="p", external_task_id="ext-r")
        token = receiver.token_for("ext-r")
        assert handle.request is not None
        assert handle.request.callback_url == receiver.url_for("ext-r")  # sent in full
        assert token not in repr(handle.request)
        assert token not in repr(handle)
        await handle
    with pytest.raises(ValidationError) as caught:
        ImageGenerationRequest(prompt="p", callback_url=f"ftp://h/cb/ext-r/{token}")
    assert token not in str(caught.value)
    assert "ftp://h/..." in str(caught.value)
    with pytest.raises(ConfigurationError, match="public_url must be an http"):
        CallbackReceiver("ftp://example.invalid/kling")


async def test_oversize_malformed_and_mismatched_bodies(
    server: FakeKlingServer, receiver: CallbackReceiver
) -> None:
    async with make_client(server, callbacks=receiver, polling=CALLBACK_POLLING) as client:
        handle = await client.images.generate(prompt="p", external_task_id="ext-1")
        other = await client.images.generate(prompt="q", external_task_id="ext-2")
        url = receiver.url_for("ext-1")
        assert handle.task is not None
        assert other.task is not None
        cases = [
            (b"x" * (receiver.max_body_size + 1), 413),
            (b"not json", 400),
            (b"[1, 2]", 400),
            (json.dumps({"task_id": handle.task_id}).encode(), 400),
            # the body speaks of another task than the URL's
            (task_payload(other.task), 400),
            (task_payload(handle.task, task_id=other.task_id), 400),
            (task_payload(handle.task, updated_at=int(time.time() * 1000) + 86_400_000), 400),
        ]
        for body, expected in cases:
            status, reply = await post(url, body)
            assert (status, reply["ok"]) == (expected, False), body[:60]
        await handle
        assert handle.task is not None
        assert handle.task.status is TaskStatus.SUCCEED


async def test_duplicates_and_stale_updates_are_acknowledged_and_ignored(
    receiver: CallbackReceiver,
) -> None:
    # The server leaves the task alone; the test plays Kling's callbacks itself.
    async with FakeKlingServer(api_key=API_KEY, task_duration=None, processing_delay=60) as server:
        async with make_client(server, callbacks=receiver, polling=CALLBACK_POLLING) as client:
            handle = await client.images.generate(prompt="p")
            assert handle.task is not None
            url = receiver.url_for(str(handle.external_task_id))
            now = int(time.time() * 1000)
            processing = task_payload(handle.task, task_status="processing", updated_at=now + 10)
            seen: list[TaskStatus] = []

            async def watch() -> None:
                async for task in handle.updates():
                    seen.append(task.status)

            watcher = asyncio.create_task(watch())
            await asyncio.sleep(0.05)
            assert await post(url, processing) == (200, {"ok": True, "message": "accepted"})
            status, reply = await post(url, processing)  # a duplicate
            assert (status, reply["message"]) == (200, "duplicate or stale update ignored")
            stale = task_payload(handle.task, task_status="submitted", updated_at=now - 1000)
            status, reply = await post(url, stale)
            assert (status, reply["message"]) == (200, "duplicate or stale update ignored")
            assert handle.status is TaskStatus.PROCESSING
            server.finish(handle.task_id)
            await server.flush_callbacks()
            await asyncio.wait_for(watcher, 5)
    assert seen == [TaskStatus.SUBMITTED, TaskStatus.PROCESSING, TaskStatus.SUCCEED]


async def test_a_forged_terminal_callback_is_not_believed(
    receiver: CallbackReceiver,
) -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=None) as server:
        async with make_client(server, callbacks=receiver, polling=CALLBACK_POLLING) as client:
            handle = await client.images.generate(prompt="p")
            waiter = asyncio.create_task(handle.wait())
            assert handle.task is not None
            url = receiver.url_for(str(handle.external_task_id))
            await asyncio.sleep(0.1)
            assert server.requests_for("get") == []  # callbacks expected: no polling yet
            forged = task_payload(
                handle.task,
                task_status="succeed",
                updated_at=int(time.time() * 1000) + 1000,  # newer than anything genuine
                task_result={"images": [{"index": 0, "url": "https://evil.example/x.png"}]},
            )
            posted = time.monotonic()
            assert (await post(url, forged))[0] == 200  # authentic URL, so acknowledged
            await asyncio.sleep(0.2)
            gets = server.requests_for("get")
            assert gets  # a confirming poll came at once, not after the 30 s safety net...
            assert gets[0].arrived_at - posted < 0.15
            assert not handle.done()  # ...and said the task is still running
            assert not waiter.done()
            server.finish(handle.task_id)
            task = await waiter
    assert "evil" not in task.images[0].url


async def test_terminal_callbacks_of_many_tasks_are_confirmed_by_list_pages(
    receiver: CallbackReceiver,
) -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.3) as server:
        async with make_client(server, callbacks=receiver, polling=CALLBACK_POLLING) as client:
            # Created together so they end together, with 20+ in flight.
            handles = await asyncio.gather(
                *(client.images.generate(prompt=f"p{i}") for i in range(40))
            )
            tasks = await asyncio.gather(*handles)
    assert {task.status for task in tasks} == {TaskStatus.SUCCEED}
    confirmations = len(server.requests_for("get")) + len(server.requests_for("list"))
    assert server.requests_for("list")
    assert confirmations < 20  # not one GET per task


async def test_a_few_confirmations_among_many_in_flight_cost_a_request_each_at_most(
    receiver: CallbackReceiver,
) -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=None) as server:
        async with make_client(server, callbacks=receiver, polling=CALLBACK_POLLING) as client:
            handles = await asyncio.gather(
                *(client.images.generate(prompt=f"p{i}") for i in range(30))
            )
            waits = [asyncio.create_task(handle.wait()) for handle in handles]
            await asyncio.sleep(0.1)  # all 30 polled, on the slow callback schedule
            lists_before = len(server.requests_for("list"))
            for handle in handles[:3]:
                server.finish(handle.task_id)
            tasks = await asyncio.wait_for(asyncio.gather(*waits[:3]), 5)
            for wait in waits[3:]:
                wait.cancel()
    assert {task.status for task in tasks} == {TaskStatus.SUCCEED}
    # Three tasks to confirm: single GETs, or a page sized to the 30 in flight
    # when that is cheaper; never a 500-task page, never more than three requests.
    lists = server.requests_for("list")[lists_before:]
    assert all(int(r.query["pageSize"]) < 100 for r in lists)
    confirmed = {r.path.rsplit("/", 1)[-1] for r in server.requests_for("get")}
    assert confirmed <= {handle.task_id for handle in handles[:3]}
    assert len(lists) + len(confirmed) <= 3


async def test_without_confirmation_a_terminal_callback_resolves_at_once(
    server: FakeKlingServer,
) -> None:
    receiver = CallbackReceiver(secret=SECRET, confirm=False)
    async with receiver.serve():
        async with make_client(server, callbacks=receiver, polling=CALLBACK_POLLING) as client:
            task = await (await client.images.generate(prompt="p"))
    assert task.status is TaskStatus.SUCCEED
    assert server.requests_for("get") == []


async def test_callbacks_for_unknown_tasks_go_to_the_hook_once(
    server: FakeKlingServer, receiver: CallbackReceiver
) -> None:
    sync_seen: list[tuple[str, str]] = []
    async_seen: list[str] = []
    receiver.on_update(lambda task: sync_seen.append((task.task_id, task.status.value)))

    @receiver.on_update
    async def remember(task: Task) -> None:
        await asyncio.sleep(0)
        async_seen.append(task.status.value)

    # Another process (here: a client without the receiver) created the task with
    # a URL from the shared secret; this process (a client with the receiver, which
    # confirms terminal updates) holds no handle for it.
    async with make_client(server, callbacks=receiver), make_client(server) as other_process:
        handle = await other_process.images.generate(
            prompt="p",
            external_task_id="elsewhere",
            callback_url=receiver.url_for("elsewhere"),
        )
        await handle
        await server.flush_callbacks()
        task = await other_process.images.get(handle.task_id)
        url = receiver.url_for("elsewhere")
        assert (await post(url, json.dumps(dict(task.raw)).encode()))[0] == 200  # a duplicate
        await asyncio.sleep(0.1)
    assert sync_seen == [(handle.task_id, "processing"), (handle.task_id, "succeed")]
    assert async_seen == ["processing", "succeed"]


@pytest.mark.parametrize(
    "faults",
    [
        CallbackFaults(duplicate=1.0),
        CallbackFaults(reorder=0.5),
        CallbackFaults(delay=0.2),
        CallbackFaults(drop=0.5, duplicate=0.3, reorder=0.3, delay=0.05),
    ],
)
async def test_misbehaving_deliveries_still_resolve_every_handle_exactly(
    faults: CallbackFaults, receiver: CallbackReceiver
) -> None:
    async with FakeKlingServer(
        api_key=API_KEY, task_duration=0.1, callback_faults=faults, seed=7
    ) as server:
        policy = PollPolicy(initial_delay=0.02, max_delay=0.1, callback_delay=0.5, timeout=10)
        async with make_client(server, callbacks=receiver, polling=policy) as client:
            handles = [await client.images.generate(prompt=f"p{i}") for i in range(20)]
            histories = await asyncio.gather(*(_statuses(handle) for handle in handles))
    for history in histories:
        assert history[-1] is TaskStatus.SUCCEED
        assert len(history) == len(set(history))  # no status twice, none after the end
    assert len(server.tasks) == 20


async def _statuses(handle: Any) -> list[TaskStatus]:
    return [task.status async for task in handle.updates()]


# --- mounting -------------------------------------------------------------------------------


async def test_mounted_as_an_aiohttp_sub_app(server: FakeKlingServer) -> None:
    receiver = CallbackReceiver(secret=SECRET)
    app = web.Application()
    app.add_subapp("/hooks/kling", receiver.aiohttp_app())
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        port = runner.addresses[0][1]
        receiver.public_url = f"http://127.0.0.1:{port}/hooks/kling"
        async with make_client(server, callbacks=receiver, polling=CALLBACK_POLLING) as client:
            handle = await client.images.generate(prompt="p", external_task_id="with/slash")
            task = await handle.wait(timeout=5)
        assert task.status is TaskStatus.SUCCEED
        assert all(record.delivered for record in server.callbacks)
        status, _ = await post(f"http://127.0.0.1:{port}/hooks/kling/x/y", b"{}")
        assert status == 404
        status, _ = await post(receiver.url_for("with/slash"), b"z" * 300_000)
        assert status == 413
    finally:
        await runner.cleanup()


async def test_mounted_in_starlette_over_asgi(server: FakeKlingServer) -> None:
    uvicorn = pytest.importorskip("uvicorn")
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    receiver = CallbackReceiver(secret=SECRET)
    app = Starlette(
        routes=[
            Route("/health", lambda _: PlainTextResponse("ok")),
            Mount("/hooks/kling", app=receiver.asgi),
        ]
    )
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error", lifespan="off")
    asgi_server = uvicorn.Server(config)
    serving = asyncio.create_task(asgi_server.serve())
    try:
        for _ in range(500):  # uvicorn offers a flag, not an event; give it 5 s at most
            if asgi_server.started:
                break
            await asyncio.sleep(0.01)
        port = asgi_server.servers[0].sockets[0].getsockname()[1]
        receiver.public_url = f"http://127.0.0.1:{port}/hooks/kling"
        async with make_client(server, callbacks=receiver, polling=CALLBACK_POLLING) as client:
            task = await (await client.images.generate(prompt="p")).wait(timeout=5)
        assert task.status is TaskStatus.SUCCEED
        assert all(record.delivered for record in server.callbacks)
        assert (await post(f"http://127.0.0.1:{port}/hooks/kling/x/y", b"{}"))[0] == 404
        too_big = b"z" * (receiver.max_body_size + 10)
        assert (await post(receiver.url_for("anything"), too_big))[0] == 413
    finally:
        asgi_server.should_exit = True
        await serving


async def test_asgi_protocol_details() -> None:
    receiver = CallbackReceiver("http://h/cb", secret=SECRET)
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    lifespan = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

    async def receive_lifespan() -> Any:
        return next(lifespan)

    await receiver.asgi({"type": "lifespan"}, receive_lifespan, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    sent.clear()

    async def no_body() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    await receiver.asgi({"type": "http", "method": "GET", "path": "/cb/a/b"}, no_body, send)
    assert sent[0]["status"] == 405


async def test_handle_directly_for_any_framework() -> None:
    receiver = CallbackReceiver("http://h/cb", secret=SECRET)
    status, body = await receiver.handle("/cb/x/wrong", b"{}")
    assert (status, json.loads(body)["ok"]) == (404, False)
    url_path = receiver.url_for("x").removeprefix("http://h")
    status, _ = await receiver.handle(url_path, b"{bad")
    assert status == 400
    payload = {
        "task_id": "t",
        "task_status": "processing",
        "task_info": {"external_task_id": "x"},
        "updated_at": 1,
    }
    status, body = await receiver.handle(url_path, json.dumps(payload).encode())
    assert status == 200


async def test_a_callback_that_beats_the_create_response_is_kept(
    server: FakeKlingServer,
) -> None:
    receiver = CallbackReceiver("http://h/cb", secret=SECRET, confirm=False)
    async with make_client(server, callbacks=receiver) as client:
        tracker = client._tracker
        tracker.creating("early")
        payload = {
            "task_id": "t-early",
            "task_status": "processing",
            "task_info": {"external_task_id": "early"},
            "updated_at": 5,
        }
        path = receiver.url_for("early").removeprefix("http://h")
        assert (await receiver.handle(path, json.dumps(payload).encode()))[0] == 200
        from kling_async._models import Endpoint

        state = tracker.state(Endpoint.GENERATIONS, "t-early", external_task_id="early")
        assert state.latest is not None
        assert state.latest.status is TaskStatus.PROCESSING
        tracker.created("early")


async def test_closing_the_client_detaches_it(server: FakeKlingServer) -> None:
    receiver = CallbackReceiver("http://h/cb", secret=SECRET)
    client = Client(API_KEY, base_url=server.url, callbacks=receiver)
    assert receiver._trackers == [client._tracker]
    await client.close()
    assert receiver._trackers == []
