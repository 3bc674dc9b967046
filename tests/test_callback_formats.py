"""Callbacks in every shape Kling documents (#16): the legacy task, with or without
``task_info``, and the new-design ``{id, status, outputs, ...}`` body the console's
"test callback" sends."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from kling_async import CallbackReceiver, PollPolicy, Task, TaskStatus
from kling_async.testing import FakeKlingServer
from tests.helpers import API_KEY, make_client

SECRET = "callback-secret-0123456789abcdef"
CALLBACK_POLLING = PollPolicy(
    initial_delay=0.02, max_delay=0.1, timeout=10.0, callback_delay=30.0, overdue_factor=50.0
)
# The body of the console's "test callback", as Kling's callback page shows it.
CONSOLE_TEST = (
    b'{"id":"913827032734642185","status":"submitted","outputs":[],"message":"",'
    b'"create_time":1785901861504,"update_time":1785901861504}'
)


@pytest.fixture
async def receiver() -> AsyncIterator[CallbackReceiver]:
    receiver = CallbackReceiver(secret=SECRET)
    async with receiver.serve():
        yield receiver
    await receiver.close()


def now_ms() -> int:
    return int(time.time() * 1000)


async def post(url: str, body: bytes | dict[str, Any]) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as session, session.post(url, data=data) as response:
        return response.status, await response.json()


def new_design(task_id: str, status: str, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": task_id,
        "status": status,
        "message": "",
        "outputs": [],
        "create_time": now_ms() - 1000,
        "update_time": now_ms(),
    }
    body.update(fields)
    return body


async def test_the_consoles_test_callback_is_accepted(receiver: CallbackReceiver) -> None:
    seen: list[Task] = []
    receiver.on_update(seen.append)
    status, reply = await post(receiver.url_for("console-test"), CONSOLE_TEST)
    assert (status, reply) == (200, {"ok": True, "message": "accepted"})
    assert [(t.task_id, t.status, t.external_task_id) for t in seen] == [
        ("913827032734642185", TaskStatus.SUBMITTED, "console-test")
    ]


async def test_new_design_callbacks_move_a_handle_on(receiver: CallbackReceiver) -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=None, processing_delay=60) as server:
        async with make_client(server, callbacks=receiver, polling=CALLBACK_POLLING) as client:
            handle = await client.images.generate(prompt="p", n=2)
            url = receiver.url_for(str(handle.external_task_id))
            processing = new_design(
                handle.task_id, "processing", external_id=handle.external_task_id
            )
            assert (await post(url, processing))[0] == 200
            assert handle.status is TaskStatus.PROCESSING
            # A terminal one is confirmed like any other: Kling's GET has the last word.
            server.task(handle.task_id).callback_url = None  # no legacy callback of its own
            server.finish(handle.task_id)
            done = new_design(
                handle.task_id,
                "succeeded",
                outputs=[{"type": "image", "url": "https://x/0.png"}] * 2,
            )
            assert (await post(url, done))[0] == 200
            task = await handle.wait(timeout=2)
    assert task.status is TaskStatus.SUCCEED
    assert [image.url for image in task.images] == [
        image["url"] for image in server.task(handle.task_id).images
    ]


async def test_an_unconfirmed_new_design_result_resolves_with_its_outputs(
    server: FakeKlingServer,
) -> None:
    receiver = CallbackReceiver("http://h/cb", secret=SECRET, confirm=False)
    async with make_client(server, callbacks=receiver, polling=CALLBACK_POLLING) as client:
        handle = await client.images.generate(prompt="p", n=2)
        path = receiver.url_for(str(handle.external_task_id)).removeprefix("http://h")
        outputs = [
            {"type": "image", "url": "https://x/0.png", "watermark_url": "https://x/0w.png"},
            {"type": "image", "url": "https://x/1.png"},
        ]
        body = json.dumps(new_design(handle.task_id, "succeeded", outputs=outputs)).encode()
        assert (await receiver.handle(path, body))[0] == 200
        task = await handle.wait(timeout=1)
    assert task.status is TaskStatus.SUCCEED
    assert [(i.index, i.url, i.watermark_url) for i in task.images] == [
        (0, "https://x/0.png", "https://x/0w.png"),
        (1, "https://x/1.png", None),
    ]
    assert task.external_task_id == handle.external_task_id  # named by the URL


async def test_a_callback_without_task_info_is_matched_by_task_id(
    receiver: CallbackReceiver,
) -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=None, processing_delay=60) as server:
        async with make_client(server, callbacks=receiver, polling=CALLBACK_POLLING) as client:
            handle = await client.images.generate(prompt="p")
            url = receiver.url_for(str(handle.external_task_id))
            bare = {"task_id": handle.task_id, "task_status": "processing", "updated_at": now_ms()}
            other = {**bare, "task_id": "someone-elses"}
            assert await post(url, other) == (
                400,
                {"ok": False, "message": "the task in the body is not the task of this URL"},
            )

            def status() -> TaskStatus | None:
                return handle.status  # read afresh: the callback changes it

            assert status() is TaskStatus.SUBMITTED
            assert await post(url, bare) == (200, {"ok": True, "message": "accepted"})
            assert status() is TaskStatus.PROCESSING
            assert handle.task is not None
            assert handle.task.external_task_id == handle.external_task_id
            # The same rule for the new design's missing external_id.
            assert (await post(url, new_design("someone-elses", "processing")))[0] == 400


async def test_a_body_naming_another_external_id_is_refused_in_either_format(
    receiver: CallbackReceiver,
) -> None:
    seen: list[Task] = []
    receiver.on_update(seen.append)
    url = receiver.url_for("a")
    legacy = {"task_id": "t", "task_status": "processing", "task_info": {"external_task_id": "b"}}
    assert (await post(url, legacy))[0] == 400
    assert (await post(url, new_design("t", "processing", external_id="b")))[0] == 400
    assert (await post(url, new_design("t", "processing", external_id="a")))[0] == 200
    await asyncio.sleep(0)
    assert [task.external_task_id for task in seen] == ["a"]
