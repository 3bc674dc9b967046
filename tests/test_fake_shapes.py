"""FakeKlingServer speaks the shapes real Kling answers take (#16), and the SDK copes.

``WireShapes`` bends answers and callbacks the way recorded and documented answers
do; ``webhook_secret`` signs callbacks as Kling does for an account with a webhook
secret. Each test runs the SDK against them over loopback.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import aiohttp
import pytest

from kling_async import (
    CallbackReceiver,
    InvalidRequestError,
    PollPolicy,
    QuotaExceededError,
    Task,
    TaskStatus,
)
from kling_async._wire import Envelope, parse_created
from kling_async.testing import CallbackFaults, FakeKlingServer, WireShapes
from tests.helpers import API_KEY, eventually, make_client

SECRET = "callback-secret-0123456789abcdef"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"webhook-key-0123456789abcdefghij").decode()
OLD_WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"an old key, being rotated out").decode()
CALLBACK_POLLING = PollPolicy(
    initial_delay=0.02, max_delay=0.1, timeout=10.0, callback_delay=30.0, overdue_factor=50.0
)


async def raw(method: str, url: str, body: Any = None) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as session:
        async with session.request(method, url, json=body) as response:
            return response.status, await response.json()


async def resolve_by_callbacks(server: FakeKlingServer, receiver: CallbackReceiver) -> Task:
    async with receiver.serve():
        async with make_client(server, callbacks=receiver, polling=CALLBACK_POLLING) as client:
            started = time.monotonic()
            task = await (await client.images.generate(prompt="p", n=2)).wait(timeout=5)
    assert time.monotonic() - started < 5  # callbacks, not the 30 s safety net
    await receiver.close()
    return task


# --- callbacks --------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["legacy", "legacy_without_task_info", "new_design"])
async def test_every_callback_format_resolves_handles(style: Any) -> None:
    shapes = WireShapes(callback_format=style)
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.1, shapes=shapes) as server:
        task = await resolve_by_callbacks(server, CallbackReceiver(secret=SECRET))
        assert [r.http_status for r in server.callbacks] == [200, 200]
    assert task.status is TaskStatus.SUCCEED
    assert [image.index for image in task.images] == [0, 1]


async def test_new_design_bodies_are_what_the_fake_posts() -> None:
    shapes = WireShapes(callback_format="new_design")
    async with FakeKlingServer(
        api_key=API_KEY, task_duration=0.05, processing_delay=0.01, shapes=shapes
    ) as server:
        async with make_client(server) as client:
            handle = await client.images.generate(
                prompt="p", external_task_id="e-1", callback_url=f"{server.origin}/_fake/callbacks"
            )
            await handle
            await server.flush_callbacks()
    bodies = [r.json for r in server.requests_for("callback")]
    assert [body["status"] for body in bodies] == ["processing", "succeeded"]
    final = bodies[-1]
    assert set(final) == {
        "id", "status", "message", "outputs", "create_time", "update_time", "external_id",
        "billing",
    }  # fmt: skip
    assert (final["id"], final["external_id"]) == (handle.task_id, "e-1")
    assert final["outputs"][0]["type"] == "image"
    # kling-v3 (the default model): 8 units an image
    assert final["billing"] == [{"charge_type": "unit", "amount": "8", "package_type": "image"}]


async def test_signed_callbacks_are_verified() -> None:
    async with FakeKlingServer(
        api_key=API_KEY, task_duration=0.1, webhook_secret=WEBHOOK_SECRET
    ) as server:
        receiver = CallbackReceiver(secret=SECRET, webhook_secret=WEBHOOK_SECRET)
        task = await resolve_by_callbacks(server, receiver)
        assert [r.http_status for r in server.callbacks] == [200, 200]
    assert task.status is TaskStatus.SUCCEED


async def test_during_a_rotation_either_secret_verifies() -> None:
    async with FakeKlingServer(
        api_key=API_KEY, task_duration=0.1, webhook_secret=[OLD_WEBHOOK_SECRET, WEBHOOK_SECRET]
    ) as server:
        for secret in (OLD_WEBHOOK_SECRET, WEBHOOK_SECRET):
            receiver = CallbackReceiver(secret=SECRET, webhook_secret=secret)
            assert (await resolve_by_callbacks(server, receiver)).status is TaskStatus.SUCCEED
        assert all(r.http_status == 200 for r in server.callbacks)


@pytest.mark.parametrize(
    ("fake_options", "reason"),
    [
        ({"webhook_secret": OLD_WEBHOOK_SECRET}, "another secret"),
        ({}, "unsigned"),
        ({"webhook_secret": WEBHOOK_SECRET, "clock": lambda: time.time() - 600}, "stale"),
    ],
)
async def test_deliveries_that_fail_verification_are_401_and_polling_still_resolves(
    fake_options: dict[str, Any], reason: str
) -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.1, **fake_options) as server:
        receiver = CallbackReceiver(secret=SECRET, webhook_secret=WEBHOOK_SECRET)
        policy = PollPolicy(initial_delay=0.02, max_delay=0.1, callback_delay=0.3, timeout=10)
        async with receiver.serve():
            async with make_client(server, callbacks=receiver, polling=policy) as client:
                task = await (await client.images.generate(prompt="p")).wait(timeout=5)
            await server.flush_callbacks()
        await receiver.close()
        assert [r.http_status for r in server.callbacks] == [401, 401], reason
        assert not any(r.delivered for r in server.callbacks)
    assert task.status is TaskStatus.SUCCEED


async def test_duplicated_signed_deliveries_are_acknowledged_and_heard_once() -> None:
    async with FakeKlingServer(
        api_key=API_KEY,
        task_duration=0.1,
        webhook_secret=WEBHOOK_SECRET,
        callback_faults=CallbackFaults(duplicate=1.0),
    ) as server:
        receiver = CallbackReceiver(secret=SECRET, webhook_secret=WEBHOOK_SECRET)
        seen: list[Task] = []
        receiver.on_update(seen.append)
        async with (
            receiver.serve(),
            make_client(server, callbacks=receiver),
            make_client(server) as other_process,
        ):
            # Another process's task: this process's hooks hear of it, once per update.
            handle = await other_process.images.generate(
                prompt="p", external_task_id="foreign", callback_url=receiver.url_for("foreign")
            )
            await handle
            await server.flush_callbacks()
            await eventually(lambda: len(seen) >= 2)
        await receiver.close()
        assert len(server.callbacks) == 4
        assert all(r.http_status == 200 for r in server.callbacks)
    assert [task.status for task in seen] == [TaskStatus.PROCESSING, TaskStatus.SUCCEED]


def test_an_unusable_webhook_secret_is_refused() -> None:
    for bad in ("whsec_", "whsec_***", ""):
        with pytest.raises(ValueError, match="whsec_"):
            FakeKlingServer(webhook_secret=bad)


# --- answers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("indexing", ["id", "none"])
async def test_images_without_an_index_keep_their_places(indexing: Any) -> None:
    shapes = WireShapes(image_index=indexing)
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.05, shapes=shapes) as server:
        async with make_client(server) as client:
            task = await (await client.images.generate(prompt="p", n=3))
        stored = server.task(task.task_id).images
    assert all("index" not in image for image in stored)
    assert [image.index for image in task.images] == [0, 1, 2]
    assert len({image.url for image in task.images}) == 3


async def test_a_create_answered_with_only_a_task_id() -> None:
    shapes = WireShapes(create_answer="task_id_only")
    async with FakeKlingServer(api_key=API_KEY, shapes=shapes) as server:
        status, answer = await raw(
            "POST", f"{server.url}/v1/images/generations", {"prompt": "p", "model_name": "kling-v3"}
        )
    assert status == 200
    assert set(answer["data"]) == {"task_id"}
    task = parse_created(Envelope(data=answer["data"], request_id=answer["request_id"]))
    assert (task.task_id, task.status) == (answer["data"]["task_id"], TaskStatus.SUBMITTED)


async def test_answers_without_request_id_or_data_and_errors_with_http_200() -> None:
    shapes = WireShapes(request_id=False, error_data=False, error_http_status=200)
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.05, shapes=shapes) as server:
        status, answer = await raw("GET", f"{server.url}/v1/images/generations/nope")
        assert (status, set(answer)) == (200, {"code", "message"})
        assert answer["code"] == 1203
        status, answer = await raw("GET", f"{server.url}/v1/images/generations")
        assert (status, set(answer)) == (200, {"code", "message", "data"})
        async with make_client(server) as client:
            task = await (await client.images.generate(prompt="p"))  # successes still read
            assert task.status is TaskStatus.SUCCEED
            server.inject("error", route="create", code=1102)
            with pytest.raises(QuotaExceededError) as quota:
                await client.images.generate(prompt="p")
            server.inject("error", route="create", code=1201, message="bad field")
            with pytest.raises(InvalidRequestError) as invalid:
                await client.images.generate(prompt="p")
    for error in (quota.value, invalid.value):
        assert (error.http_status, error.request_id) == (200, None)
    assert len(server.requests_for("create")) == 3  # neither was retried


def test_shapes_are_checked() -> None:
    with pytest.raises(ValueError, match="callback_format"):
        WireShapes(callback_format="xml")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="error_http_status"):
        WireShapes(error_http_status=700)
    assert not WireShapes().bends_envelopes
    assert json.dumps(WireShapes().image_index) == '"index"'
