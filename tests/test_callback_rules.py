"""Every callback-receiver rule has a test that fails when the rule is taken out (#5).

tests/test_callbacks.py covers the main paths; the tests here are the ones mutation
testing showed were missing: each fails when the rule it names is removed from the
receiver, the tracker or the poller. The tests at the end pin bugs found on the
way (and since fixed).
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from kling_async import CallbackReceiver, Endpoint, PollPolicy, Task, TaskHandle, TaskStatus
from kling_async.testing import CallbackFaults, FakeKlingServer, FakeTask
from tests.helpers import API_KEY, eventually, make_client

SECRET = "callback-secret-0123456789abcdef"
# The safety-net poll is 30 s away: whatever resolves a task within a test's time
# is a callback, unless the test says otherwise.
CALLBACK_POLLING = PollPolicy(
    initial_delay=0.02, max_delay=0.1, timeout=10.0, callback_delay=30.0, overdue_factor=50.0
)
MIB = 1024 * 1024


@pytest.fixture
async def receiver() -> AsyncIterator[CallbackReceiver]:
    receiver = CallbackReceiver(secret=SECRET)
    async with receiver.serve():
        yield receiver
    await receiver.close()


def now_ms() -> int:
    return int(time.time() * 1000)


def callback_body(
    external_task_id: str,
    *,
    task_id: str = "t-1",
    status: str = "processing",
    updated_at: int | None = None,
    size: int = 0,
) -> bytes:
    """A callback as Kling sends it, padded with whitespace to ``size`` bytes."""
    body = json.dumps(
        {
            "task_id": task_id,
            "task_status": status,
            "task_status_msg": "",
            "created_at": now_ms() - 1000,
            "updated_at": now_ms() if updated_at is None else updated_at,
            "task_info": {"external_task_id": external_task_id},
            "task_result": {},
        }
    ).encode()
    return body + b" " * (size - len(body))


def task_payload(task: Task, **changes: Any) -> bytes:
    data = dict(task.raw)
    data.update(changes)
    return json.dumps(data).encode()


def envelope(task: Task, **changes: Any) -> str:
    """A get response for ``task`` as it was (for a fault that answers an old state)."""
    data = dict(task.raw)
    data.update(changes)
    return json.dumps({"code": 0, "message": "SUCCEED", "request_id": "r-old", "data": data})


def path_of(receiver: CallbackReceiver, external_task_id: str) -> str:
    """The request path of ``external_task_id``'s callback URL."""
    url = receiver.url_for(external_task_id)
    return "/" + url.split("://", 1)[1].split("/", 1)[1]


async def post(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    data = io.BytesIO(body)  # aiohttp warns against large bodies given as bytes
    async with aiohttp.ClientSession() as session, session.post(url, data=data) as response:
        if response.content_type != "application/json":
            return response.status, {}
        return response.status, await response.json()


def recording_hook(receiver: CallbackReceiver) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    receiver.on_update(lambda task: seen.append((task.task_id, task.status.value)))
    return seen


async def call_asgi(
    receiver: CallbackReceiver, raw_path: bytes, chunks: list[bytes], *, path: str | None = None
) -> tuple[int, dict[str, Any], int]:
    """POST ``chunks`` to the ASGI app; return the status, the reply and the reads made."""
    sent: list[Any] = []
    reads = 0

    async def receive() -> Any:
        nonlocal reads
        reads += 1
        if reads > len(chunks):
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunks[reads - 1], "more_body": reads < len(chunks)}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": path if path is not None else raw_path.decode(),
        "raw_path": raw_path,
    }
    await receiver.asgi(scope, receive, send)
    return sent[0]["status"], json.loads(sent[1]["body"]), reads


async def mounted(receiver: CallbackReceiver) -> tuple[web.AppRunner, str]:
    """The receiver as an aiohttp sub-app of an application with the usual settings."""
    app = web.Application()
    app.add_subapp("/hooks/kling", receiver.aiohttp_app())
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    receiver.public_url = f"http://127.0.0.1:{runner.addresses[0][1]}/hooks/kling"
    return runner, receiver.public_url


async def first_get_after(server: FakeKlingServer, task_id: str, since: float) -> float:
    gets = [r for r in server.requests_for("get") if r.path.endswith(task_id)]
    assert gets
    return gets[0].arrived_at - since


# --- rule 2: the token ---------------------------------------------------------------------


async def test_tokens_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # Timing cannot be measured reliably here, so watch that the decision is made by
    # hmac.compare_digest (and not by ==, which stops at the first differing byte).
    compared: list[tuple[bytes, bytes]] = []
    compare_digest = hmac.compare_digest

    def watched(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return compare_digest(a, b)

    monkeypatch.setattr(hmac, "compare_digest", watched)
    receiver = CallbackReceiver("http://h/cb", secret=SECRET)
    good = path_of(receiver, "x")
    bad = good[:-1] + ("1" if good.endswith("0") else "0")
    assert (await receiver.handle(bad, callback_body("x")))[0] == 404
    assert (await receiver.handle(good, callback_body("x")))[0] == 200
    assert len(compared) == 2


async def test_handle_with_a_wrong_token_dispatches_nothing() -> None:
    receiver = CallbackReceiver("http://h/cb", secret=SECRET)
    seen = recording_hook(receiver)
    wrong = path_of(CallbackReceiver("http://h/cb", secret="another-secret-0123456789"), "x")
    status, reply = await receiver.handle(wrong, callback_body("x"))
    assert (status, json.loads(reply)["ok"]) == (404, False)
    assert seen == []


async def test_aiohttp_sub_app_refuses_a_wrong_token_before_reading_the_body() -> None:
    receiver = CallbackReceiver(secret=SECRET)
    seen = recording_hook(receiver)
    runner, base = await mounted(receiver)
    try:
        wrong = f"{base}/x/{receiver.token_for('y')}"
        assert await post(wrong, callback_body("x")) == (404, {"ok": False, "message": "not found"})
        assert seen == []
        # Larger than the application accepts: reading it first would answer 413.
        assert (await post(wrong, b" " * (MIB + MIB // 4)))[0] == 404
        assert (await post(receiver.url_for("x"), callback_body("x")))[0] == 200
        assert seen == [("t-1", "processing")]
    finally:
        await runner.cleanup()


async def test_asgi_refuses_a_wrong_token_without_reading_the_body() -> None:
    receiver = CallbackReceiver("http://h/cb", secret=SECRET)
    seen = recording_hook(receiver)
    wrong = f"/cb/x/{receiver.token_for('y')}".encode()
    status, reply, reads = await call_asgi(receiver, wrong, [callback_body("x")])
    assert (status, reply["ok"], reads) == (404, False, 0)
    assert seen == []
    status, _, reads = await call_asgi(
        receiver, path_of(receiver, "x").encode(), [callback_body("x")]
    )
    assert (status, reads) == (200, 1)
    assert seen == [("t-1", "processing")]


# --- rule 3: the size cap ------------------------------------------------------------------


async def test_serve_honours_a_max_body_size_above_aiohttps_default() -> None:
    receiver = CallbackReceiver(secret=SECRET, max_body_size=2 * MIB)
    seen = recording_hook(receiver)
    async with receiver.serve():
        url = receiver.url_for("x")
        assert (await post(url, callback_body("x", size=MIB + MIB // 2)))[0] == 200
        assert seen == [("t-1", "processing")]
        status, reply = await post(url, callback_body("x", size=2 * MIB + 1))
        assert (status, reply["ok"]) == (413, False)


async def test_asgi_stops_reading_once_the_body_is_too_large() -> None:
    receiver = CallbackReceiver("http://h/cb", secret=SECRET, max_body_size=1000)
    endless = [b" " * 400] * 1000
    status, reply, reads = await call_asgi(receiver, path_of(receiver, "x").encode(), endless)
    assert (status, reply["ok"]) == (413, False)
    assert reads == 3  # 1,200 bytes: over the cap, so the rest is never read


# --- rule 5: the task of the URL ------------------------------------------------------------


async def test_a_body_naming_another_external_task_id_is_refused(
    receiver: CallbackReceiver,
) -> None:
    seen = recording_hook(receiver)
    async with FakeKlingServer(api_key=API_KEY, task_duration=None, processing_delay=60) as server:
        async with make_client(server, callbacks=receiver, polling=CALLBACK_POLLING) as client:
            handle = await client.images.generate(prompt="p", external_task_id="ext-1")
            assert handle.task is not None
            # The task_id is right, but the body says it is about task ext-2.
            body = task_payload(
                handle.task,
                task_status="processing",
                updated_at=now_ms(),
                task_info={"external_task_id": "ext-2"},
            )
            assert (await post(receiver.url_for("ext-1"), body))[0] == 400
            assert handle.status is TaskStatus.SUBMITTED
    # Nor can the URL of a task nobody holds carry news about another task.
    assert (await post(receiver.url_for("a"), callback_body("b")))[0] == 400
    assert seen == []


# --- rule 7: duplicates and stale updates ----------------------------------------------------


async def test_stale_updates_of_unknown_tasks_are_not_passed_to_hooks() -> None:
    receiver = CallbackReceiver("http://h/cb", secret=SECRET)
    seen = recording_hook(receiver)
    path = path_of(receiver, "x")
    stamp = now_ms()
    assert (await receiver.handle(path, callback_body("x", updated_at=stamp)))[0] == 200
    status, reply = await receiver.handle(
        path, callback_body("x", status="submitted", updated_at=stamp - 1000)
    )
    assert (status, json.loads(reply)["message"]) == (200, "duplicate or stale update ignored")
    assert seen == [("t-1", "processing")]


async def test_a_poll_answer_older_than_a_callback_does_not_undo_it(
    receiver: CallbackReceiver,
) -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=None, processing_delay=60) as server:
        policy = PollPolicy(initial_delay=0.05, max_delay=0.05, callback_delay=0.05, timeout=10)
        async with make_client(server, callbacks=receiver, polling=policy) as client:
            handle = await client.images.generate(prompt="p")
            assert handle.task is not None
            # Every poll answers the task as it was at creation (a lagging replica).
            server.inject(
                "garbage", route="get", times=None, http_status=200, body=envelope(handle.task)
            )
            statuses: list[TaskStatus] = []

            async def watch() -> None:
                async for task in handle.updates():
                    statuses.append(task.status)

            watcher = asyncio.create_task(watch())
            await eventually(lambda: statuses == [TaskStatus.SUBMITTED])
            processing = task_payload(handle.task, task_status="processing", updated_at=now_ms())
            assert (await post(receiver.url_for(str(handle.external_task_id)), processing))[
                0
            ] == 200
            await eventually(lambda: len(server.requests_for("get")) >= 2)  # several polls
            assert handle.status is TaskStatus.PROCESSING
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
    assert statuses == [TaskStatus.SUBMITTED, TaskStatus.PROCESSING]


async def test_nothing_is_news_after_the_end(
    server: FakeKlingServer, receiver: CallbackReceiver
) -> None:
    async with make_client(server, callbacks=receiver, polling=CALLBACK_POLLING) as client:
        handle = await client.images.generate(prompt="p")
        task = await handle
        late = task_payload(task, task_status="processing", updated_at=now_ms() + 1000)
        status, reply = await post(receiver.url_for(str(handle.external_task_id)), late)
        assert (status, reply["message"]) == (200, "duplicate or stale update ignored")
        assert handle.status is TaskStatus.SUCCEED


# --- rule 8: terminal callbacks are confirmed --------------------------------------------------


async def test_after_a_contradicted_terminal_callback_the_task_is_polled_normally(
    receiver: CallbackReceiver,
) -> None:
    # Kling's own callbacks never arrive: only polling can see the task end.
    async with FakeKlingServer(
        api_key=API_KEY, task_duration=None, callback_faults=CallbackFaults(drop=1.0)
    ) as server:
        async with make_client(server, callbacks=receiver, polling=CALLBACK_POLLING) as client:
            handle = await client.images.generate(prompt="p")
            waiter = asyncio.create_task(handle.wait())
            assert handle.task is not None
            forged = task_payload(handle.task, task_status="succeed", updated_at=now_ms())
            assert (await post(receiver.url_for(str(handle.external_task_id)), forged))[0] == 200
            await asyncio.sleep(0.2)
            assert server.requests_for("get")  # confirmed: still running
            assert not waiter.done()
            server.finish(handle.task_id)
            # The task's callbacks are suspect now: polled at the normal pace, not the
            # 30 s safety net.
            task = await asyncio.wait_for(waiter, 2)
    assert task.status is TaskStatus.SUCCEED


async def test_a_terminal_callback_during_a_poll_is_confirmed_right_after_it(
    receiver: CallbackReceiver,
) -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=None, processing_delay=60) as server:
        # The first poll comes at 0.1 s; after that the normal pace is 2 s apart.
        policy = PollPolicy(
            initial_delay=0.1, max_delay=2.0, multiplier=5, jitter=0, callback_delay=0.1, timeout=10
        )
        async with make_client(server, callbacks=receiver, polling=policy) as client:
            handle = await client.images.generate(prompt="p")
            assert handle.task is not None
            # That first poll is slow, and answers the task as it was when it was sent.
            server.inject(
                "garbage", route="get", delay=0.4, http_status=200, body=envelope(handle.task)
            )
            waiter = asyncio.create_task(handle.wait())
            await eventually(lambda: server.requests_for("get"))
            server.finish(handle.task_id)  # the callback arrives while that poll is out
            await server.flush_callbacks()
            assert not waiter.done()
            # The old answer cannot confirm the callback: another poll follows at once.
            task = await asyncio.wait_for(waiter, 1.5)
    assert task.status is TaskStatus.SUCCEED


# --- rule 9: polling as the safety net -------------------------------------------------------


def _lose_callbacks_of(server: FakeKlingServer, handle: TaskHandle) -> None:
    server.task(handle.task_id).callback_url = None  # its callbacks go nowhere


async def test_overdue_is_overdue_factor_times_the_typical_duration(
    receiver: CallbackReceiver,
) -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.1) as server:
        policy = PollPolicy(
            initial_delay=0.02, max_delay=0.05, callback_delay=30, overdue_factor=4, timeout=10
        )
        async with make_client(server, callbacks=receiver, polling=policy) as client:
            await (await client.images.generate(prompt="teaches ~0.1 s"))
            typical = client._tracker.typical_duration
            assert typical is not None
            created = time.monotonic()
            handle = await client.images.generate(prompt="p")
            _lose_callbacks_of(server, handle)
            await handle.wait(timeout=3)
    # Not polled before it is 4 x typical old, then polled at the normal pace.
    first_get = await first_get_after(server, handle.task_id, created)
    assert 3 * typical <= first_get <= 4 * typical + 0.5


async def test_the_safety_net_poll_comes_every_callback_delay_even_before_overdue(
    receiver: CallbackReceiver,
) -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.1) as server:
        policy = PollPolicy(
            initial_delay=0.02, max_delay=0.05, callback_delay=0.3, overdue_factor=1000, timeout=10
        )
        async with make_client(server, callbacks=receiver, polling=policy) as client:
            await (await client.images.generate(prompt="teaches ~0.1 s: overdue after ~100 s"))
            handle = await client.images.generate(prompt="p")
            _lose_callbacks_of(server, handle)
            task = await handle.wait(timeout=3)
    assert task.status is TaskStatus.SUCCEED


async def test_the_typical_duration_follows_recent_tasks(receiver: CallbackReceiver) -> None:
    def duration(task: FakeTask) -> float:
        return 0.5 if task.prompt == "slow" else 0.05

    async with FakeKlingServer(api_key=API_KEY, task_duration=duration) as server:
        async with make_client(server, callbacks=receiver, polling=CALLBACK_POLLING) as client:
            await (await client.images.generate(prompt="slow"))
            after_slow = client._tracker.typical_duration
            assert after_slow is not None
            assert after_slow >= 0.4
            await (await client.images.generate(prompt="fast"))
            after_fast = client._tracker.typical_duration
    assert after_fast is not None
    assert after_fast < after_slow - 0.05


# --- rule 11: hooks for tasks nobody holds --------------------------------------------------


async def test_a_failing_hook_is_logged_and_the_callback_still_acknowledged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver = CallbackReceiver("http://h/cb", secret=SECRET)

    @receiver.on_update
    def broken(task: Task) -> None:
        raise RuntimeError("sync hook broke")

    @receiver.on_update
    async def broken_later(task: Task) -> None:
        await asyncio.sleep(0)
        raise RuntimeError("async hook broke")

    seen = recording_hook(receiver)
    with caplog.at_level(logging.ERROR, logger="kling_async"):
        status, _ = await receiver.handle(path_of(receiver, "x"), callback_body("x"))

        def failures() -> list[logging.LogRecord]:
            return [r for r in caplog.records if "on_update hook failed" in r.getMessage()]

        await eventually(lambda: len(failures()) == 2)
    assert status == 200
    assert seen == [("t-1", "processing")]  # the hooks after a broken one still run
    assert [str(r.exc_info[1]) for r in failures() if r.exc_info] == [
        "sync hook broke",
        "async hook broke",
    ]
    await receiver.close()


async def test_hooks_do_not_hear_of_tasks_a_handle_holds(
    server: FakeKlingServer, receiver: CallbackReceiver
) -> None:
    seen = recording_hook(receiver)
    async with make_client(server, callbacks=receiver, polling=CALLBACK_POLLING) as client:
        handle = await client.images.generate(prompt="p")
        await handle
        await server.flush_callbacks()
    assert [r.status for r in server.callbacks if r.delivered] == ["processing", "succeed"]
    assert seen == []


async def test_one_receiver_serves_several_clients(
    server: FakeKlingServer, receiver: CallbackReceiver
) -> None:
    async with (
        make_client(server, callbacks=receiver, polling=CALLBACK_POLLING) as first,
        make_client(server, callbacks=receiver, polling=CALLBACK_POLLING) as second,
    ):
        handles = [
            await first.images.generate(prompt="a"),
            await second.images.generate(prompt="b"),
        ]
        tasks = await asyncio.wait_for(asyncio.gather(*handles), 3)
    assert [task.status for task in tasks] == [TaskStatus.SUCCEED] * 2


async def hook_tasks(receiver: CallbackReceiver) -> list[Task]:
    seen: list[Task] = []
    receiver.on_update(seen.append)
    return seen


async def test_a_forged_terminal_callback_for_a_task_nobody_holds_never_reaches_hooks(
    receiver: CallbackReceiver,
) -> None:
    """Review r13: the leaked URL of a task no handle holds fed hooks a forged result."""
    seen = await hook_tasks(receiver)
    evil = {"images": [{"index": 0, "url": "https://evil.example/x.png"}]}
    async with FakeKlingServer(api_key=API_KEY, task_duration=None) as server:
        async with (
            make_client(server, callbacks=receiver, polling=CALLBACK_POLLING),
            make_client(server) as other_process,
        ):
            # A task Kling never heard of: every endpoint answers 404.
            forged = callback_body("job-123", status="succeed")
            assert (await post(receiver.url_for("job-123"), forged))[0] == 200
            await eventually(lambda: len(server.requests_for("get")) == len(Endpoint))
            # A task another process runs: Kling says it is still processing.
            handle = await other_process.images.generate(
                prompt="p", external_task_id="job-7", callback_url=receiver.url_for("job-7")
            )
            await eventually(lambda: [s.status for s in seen] == ["processing"])
            assert handle.task is not None
            forged = task_payload(
                handle.task, task_status="succeed", updated_at=now_ms(), task_result=evil
            )
            assert (await post(receiver.url_for("job-7"), forged))[0] == 200
            await eventually(lambda: len(server.requests_for("get")) == len(Endpoint) + 1)
            await asyncio.sleep(0.05)
            assert [task.status for task in seen] == [TaskStatus.PROCESSING]
            # The genuine end is confirmed, and hooks get the task as Kling's API has it.
            server.finish(handle.task_id)
            await eventually(lambda: len(seen) == 2)
    assert seen[1].status is TaskStatus.SUCCEED
    assert seen[1].images
    assert all(image.url.startswith(server.origin) for image in seen[1].images)


async def test_hooks_get_the_confirmed_task_not_the_callbacks_claims(
    receiver: CallbackReceiver,
) -> None:
    seen = await hook_tasks(receiver)
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.05) as server:
        async with make_client(server, callbacks=receiver), make_client(server) as other_process:
            task = await (await other_process.images.generate(prompt="p", external_task_id="j"))
            claims = task_payload(
                task,
                task_status="succeed",
                updated_at=now_ms(),
                task_result={"images": [{"index": 0, "url": "https://evil.example/x.png"}]},
            )
            assert (await post(receiver.url_for("j"), claims))[0] == 200
            await eventually(lambda: seen)
            await asyncio.sleep(0.05)
    assert len(seen) == 1  # Kling's own succeed callback went nowhere: no URL
    assert seen[0].images == task.images
    assert seen[0].raw == task.raw


async def test_a_terminal_callback_nobody_can_confirm_is_503_and_reaches_no_hook() -> None:
    receiver = CallbackReceiver("http://h/cb", secret=SECRET)
    seen = recording_hook(receiver)
    body = callback_body("x", status="succeed")
    assert (await receiver.handle(path_of(receiver, "x"), body))[0] == 503
    assert seen == []
    unconfirmed = CallbackReceiver("http://h/cb", secret=SECRET, confirm=False)
    seen = recording_hook(unconfirmed)
    assert (await unconfirmed.handle(path_of(unconfirmed, "x"), body))[0] == 200
    assert seen == [("t-1", "succeed")]


# --- rule 12: callbacks that beat the create response ----------------------------------------


async def create_overtaken_by_callback(
    server: FakeKlingServer, receiver: CallbackReceiver, body: Callable[[FakeTask], bytes]
) -> TaskHandle:
    """Create a task whose callback (``body``) arrives before the create returns."""
    server.inject("drop_after", route="create")  # the task is made, the answer lost...
    server.inject("delay", route="get", delay=0.3)  # ...and the lookup finding it is slow
    async with make_client(server, callbacks=receiver, polling=CALLBACK_POLLING) as client:
        creating = asyncio.create_task(
            client.images.generate(prompt="p", external_task_id="early-1")
        )
        await eventually(lambda: server.tasks)
        (fake,) = server.tasks.values()
        assert (await post(receiver.url_for("early-1"), body(fake)))[0] == 200
        assert not creating.done()
        return await creating


async def test_a_callback_that_beats_the_create_response_is_applied(
    receiver: CallbackReceiver,
) -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=None, processing_delay=60) as server:
        handle = await create_overtaken_by_callback(
            server,
            receiver,
            lambda fake: callback_body(
                "early-1", task_id=fake.task_id, updated_at=fake.updated_at_ms + 10
            ),
        )
    assert handle.status is TaskStatus.PROCESSING  # the lookup still said submitted


async def test_an_early_callback_naming_another_task_id_is_not_applied(
    receiver: CallbackReceiver,
) -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=None, processing_delay=60) as server:
        handle = await create_overtaken_by_callback(
            server,
            receiver,
            lambda fake: callback_body(
                "early-1", task_id="other", updated_at=fake.updated_at_ms + 10
            ),
        )
    assert handle.status is TaskStatus.SUBMITTED


# --- rule 13: mounting ------------------------------------------------------------------------


async def test_asgi_reads_escaped_slashes_from_the_raw_path() -> None:
    receiver = CallbackReceiver("http://h/cb", secret=SECRET)
    seen = recording_hook(receiver)
    raw_path = path_of(receiver, "a/b")
    assert "a%2Fb" in raw_path
    status, _, _ = await call_asgi(
        receiver,
        raw_path.encode(),
        [callback_body("a/b")],
        path=raw_path.replace("%2F", "/"),  # what the server decoded
    )
    assert status == 200
    assert seen == [("t-1", "processing")]


async def test_serve_keeps_a_given_public_url_and_listens_under_its_path() -> None:
    receiver = CallbackReceiver("https://example.test/hooks/kling/", secret=SECRET)
    seen = recording_hook(receiver)
    async with receiver.serve() as url:
        assert url.endswith("/hooks/kling")
        assert receiver.public_url == "https://example.test/hooks/kling"
        assert (await post(f"{url}/x/{receiver.token_for('x')}", callback_body("x")))[0] == 200
    assert seen == [("t-1", "processing")]


async def test_serve_keeps_callback_tokens_out_of_the_access_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver = CallbackReceiver(secret=SECRET)
    with caplog.at_level(logging.DEBUG):
        async with receiver.serve():
            assert (await post(receiver.url_for("x"), callback_body("x")))[0] == 200
    assert receiver.token_for("x") not in caplog.text


# --- bugs found while writing the tests above ------------------------------------------------


async def test_a_deeply_nested_body_is_400() -> None:
    receiver = CallbackReceiver("http://h/cb", secret=SECRET)
    status, _ = await receiver.handle(path_of(receiver, "x"), b"[" * 100_000)
    assert status == 400


async def test_a_forged_future_stamp_does_not_stop_the_task_resolving(
    receiver: CallbackReceiver,
) -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=None) as server:
        policy = PollPolicy(initial_delay=0.02, max_delay=0.1, callback_delay=0.2, timeout=10)
        async with make_client(server, callbacks=receiver, polling=policy) as client:
            handle = await client.images.generate(prompt="p")
            assert handle.task is not None
            forged = task_payload(
                handle.task, task_status="processing", updated_at=now_ms() + 60_000
            )
            assert (await post(receiver.url_for(str(handle.external_task_id)), forged))[0] == 200
            server.finish(handle.task_id)
            task = await handle.wait(timeout=1.5)
    assert task.status is TaskStatus.SUCCEED


async def test_a_forged_terminal_callback_before_the_create_returns_is_not_believed(
    receiver: CallbackReceiver,
) -> None:
    def forged(fake: FakeTask) -> bytes:
        data = fake.to_data()
        data.update(
            task_status="succeed",
            updated_at=fake.updated_at_ms + 10,
            task_result={"images": [{"index": 0, "url": "https://evil.example/x.png"}]},
        )
        return json.dumps(data).encode()

    async with FakeKlingServer(api_key=API_KEY, task_duration=None, processing_delay=60) as server:
        handle = await create_overtaken_by_callback(server, receiver, forged)
    assert not handle.done()  # Kling says the task is still submitted


async def test_an_early_terminal_callback_is_confirmed_as_soon_as_someone_waits(
    receiver: CallbackReceiver,
) -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=None, processing_delay=60) as server:
        server.inject("drop_after", route="create")
        server.inject("delay", route="get", delay=0.3)
        async with make_client(server, callbacks=receiver, polling=CALLBACK_POLLING) as client:
            creating = asyncio.create_task(
                client.images.generate(prompt="p", external_task_id="early-1")
            )
            await eventually(lambda: server.tasks)
            (fake,) = server.tasks.values()
            said = fake.to_data()
            said.update(task_status="succeed", updated_at=fake.updated_at_ms + 10)
            assert (await post(receiver.url_for("early-1"), json.dumps(said).encode()))[0] == 200
            handle = await creating
            assert not handle.done()  # not believed before a poll confirms it
            _lose_callbacks_of(server, handle)
            server.finish(handle.task_id)
            # Confirmed by a poll due at once, not by the safety net 30 s away.
            task = await handle.wait(timeout=1.5)
    assert task.status is TaskStatus.SUCCEED


async def test_aiohttp_sub_app_honours_a_max_body_size_above_aiohttps_default() -> None:
    receiver = CallbackReceiver(secret=SECRET, max_body_size=2 * MIB)
    runner, _ = await mounted(receiver)
    try:
        body = callback_body("x", size=MIB + MIB // 2)
        assert (await post(receiver.url_for("x"), body))[0] == 200
    finally:
        await runner.cleanup()


async def test_serve_forgets_the_address_it_filled_in() -> None:
    receiver = CallbackReceiver(secret=SECRET)

    def public_url() -> str | None:
        return receiver.public_url  # read afresh: serving sets and clears it

    async with receiver.serve() as first:
        assert public_url() == first
    assert public_url() is None  # that port is gone: no URLs pointing at it
    async with receiver.serve() as second:
        assert receiver.url_for("x").startswith(second)


async def test_a_middleware_that_reads_the_body_first_changes_nothing(
    server: FakeKlingServer,
) -> None:
    """Logging and tracing middlewares often read the body before any handler."""
    seen: list[int] = []

    @web.middleware
    async def read_first(request: web.Request, handler: Any) -> web.StreamResponse:
        seen.append(len(await request.read()))
        response: web.StreamResponse = await handler(request)
        return response

    receiver = CallbackReceiver(secret=SECRET)
    app = web.Application(middlewares=[read_first])
    app.add_subapp("/kling", receiver.aiohttp_app())
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        receiver.public_url = f"http://127.0.0.1:{runner.addresses[0][1]}/kling"
        policy = PollPolicy(initial_delay=0.02, max_delay=0.1, callback_delay=30, timeout=5)
        async with make_client(server, callbacks=receiver, polling=policy) as client:
            task = await (await client.images.generate(prompt="p")).wait(timeout=5)
        assert task.status is TaskStatus.SUCCEED  # resolved by callback, not the 30 s net
        assert seen
        assert all(record.http_status == 200 for record in server.callbacks)
    finally:
        await runner.cleanup()
