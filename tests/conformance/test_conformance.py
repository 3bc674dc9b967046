"""The conformance corpus: real-world Kling payloads through the public API (#16).

Every payload in ``corpus.json`` (official documentation examples, answers
recorded from the live API, community SDK fixtures, gateway examples; each
with its source) is served byte for byte by a plain aiohttp stub on loopback,
not by FakeKlingServer, whose answers the SDK's authors wrote. Create, get and
list answers go through ``client.images``; error answers through a get;
callbacks are POSTed to a served ``CallbackReceiver``. What the SDK must make of
each is in the manifest beside it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import kling_async
from kling_async import CallbackReceiver, Client, Endpoint, PollPolicy, RetryPolicy, Task
from tests.helpers import eventually

HERE = Path(__file__).parent
CORPUS = json.loads((HERE / "corpus.json").read_text(encoding="utf-8"))["payloads"]
SUBJECT = "https://example.com/subject.png"
SECRET = "conformance-callback-secret-0123"


KINDS = ("create", "get", "list", "error", "callback", "request", "recognize", "costs")
#: The least each endpoint's create needs, to drive its create answers.
MINIMAL: dict[str, dict[str, Any]] = {
    "images/generations": {"prompt": "p"},
    "images/multi-image2image": {"subject_images": [SUBJECT], "prompt": "p"},
    "images/omni-image": {"prompt": "p"},
    "images/editing/expand": {
        "image": SUBJECT,
        **{f"{side}_expansion_ratio": 0.1 for side in ("up", "down", "left", "right")},
    },
    "general/ai-multi-shot": {"element_frontal_image": SUBJECT},
    "images/kolors-virtual-try-on": {"human_image": SUBJECT, "cloth_image": SUBJECT},
}


def payload(entry: Mapping[str, Any]) -> bytes:
    name: str = entry["file"]
    return (HERE / "payloads" / name).read_bytes()


def by_kind(*kinds: str) -> list[Any]:
    return [pytest.param(entry, id=entry["name"]) for entry in CORPUS if entry["kind"] in kinds]


@dataclass
class Stub:
    """A plain aiohttp server answering each route with fixed bytes."""

    url: str = ""
    answers: dict[tuple[str, str], tuple[int, bytes]] = field(default_factory=dict)
    seen: list[tuple[str, str]] = field(default_factory=list)
    bodies: list[Any] = field(default_factory=list)

    def answer(self, route: str, endpoint: str, body: bytes, status: int = 200) -> None:
        self.answers[(route, endpoint)] = (status, body)

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append((request.method, request.path))
        if request.can_read_body:
            self.bodies.append(await request.json())
        rest = request.path.removeprefix("/v1/").removeprefix("/")
        if ("sync", rest) in self.answers:  # image recognition, account costs
            status, body = self.answers[("sync", rest)]
            return web.Response(status=status, body=body, content_type="application/json")
        for endpoint in (e.value for e in Endpoint):
            if rest == endpoint:
                route = "create" if request.method == "POST" else "list"
            elif rest.startswith(endpoint + "/"):
                route = "get"
            else:
                continue
            if (route, endpoint) in self.answers:
                status, body = self.answers[(route, endpoint)]
                return web.Response(status=status, body=body, content_type="application/json")
        return web.Response(
            status=404,
            body=b'{"code":1203,"message":"not served by the stub","request_id":"stub"}',
            content_type="application/json",
        )


@pytest.fixture
async def stub() -> AsyncIterator[Stub]:
    served = Stub()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", served.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    served.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield served
    finally:
        await runner.cleanup()


def client_for(stub: Stub, **options: Any) -> Client:
    settings: dict[str, Any] = {
        "api_key": "sk-conformance",
        "base_url": stub.url,
        "retry": RetryPolicy(initial_delay=0.01, max_delay=0.02, max_attempts=1),
        "polling": PollPolicy(initial_delay=0.02, max_delay=0.05, timeout=5),
    }
    settings.update(options)
    return Client(**settings)


def check_task(task: Task, expect: Mapping[str, Any]) -> None:
    """Assert the fields ``expect`` names (and only those)."""
    if "task_id" in expect:
        assert task.task_id == expect["task_id"]
    if "status" in expect:
        assert task.status == expect["status"]
    if "external_task_id" in expect:
        assert task.external_task_id == expect["external_task_id"]
    if "status_message" in expect:
        assert task.status_message == expect["status_message"]
    if "images" in expect:
        assert [[i.index, i.url, i.watermark_url] for i in task.images] == expect["images"]
    if "result_type" in expect:
        assert task.result_type == expect["result_type"]
    if "final_unit_deduction" in expect:
        assert task.final_unit_deduction == expect["final_unit_deduction"]
    if "final_balance_deduction" in expect:
        balance = task.final_balance_deduction
        wanted = expect["final_balance_deduction"]
        assert (None if balance is None else [balance.quota, balance.list_price]) == wanted
    if "created_at_ms" in expect:
        millis = expect["created_at_ms"]
        assert task.created_at == datetime.fromtimestamp(millis / 1000, tz=timezone.utc)


def check_error(error: BaseException, expect: Mapping[str, Any]) -> None:
    assert type(error).__name__ == expect["error"]
    assert isinstance(error, kling_async.APIError)
    assert error.code == expect["code"]
    assert error.http_status == expect["http_status"]
    if "request_id" in expect:
        assert error.request_id == expect["request_id"]
    if "message_contains" in expect:
        assert expect["message_contains"] in str(error)


def test_the_corpus_is_what_it_says() -> None:
    files = {path.name for path in (HERE / "payloads").iterdir()}
    assert {entry["file"] for entry in CORPUS} == files  # every file is used, none missing
    for entry in CORPUS:
        assert entry["source"]
        assert entry["kind"] in KINDS
        json.loads(payload(entry))  # each is JSON as stored


@pytest.mark.parametrize("entry", by_kind("create"))
async def test_create_answers(stub: Stub, entry: dict[str, Any]) -> None:
    endpoint, expect = entry["endpoint"], entry["expect"]
    stub.answer("create", endpoint, payload(entry), entry["http_status"])
    async with client_for(stub) as client:
        request = kling_async.request_from_mapping(MINIMAL[endpoint], endpoint=endpoint)
        creating = client.images.submit(request)
        if "error" in expect:
            with pytest.raises(kling_async.APIError) as caught:
                await creating
            check_error(caught.value, expect)
            return
        handle = await creating
    assert handle.task is not None
    assert handle.task_id == expect["task_id"]
    check_task(handle.task, expect)


@pytest.mark.parametrize("entry", by_kind("get", "error"))
async def test_get_and_error_answers(stub: Stub, entry: dict[str, Any]) -> None:
    endpoint, expect = entry["endpoint"], entry["expect"]
    stub.answer("get", endpoint, payload(entry), entry["http_status"])
    async with client_for(stub) as client:
        if "error" in expect:
            with pytest.raises(kling_async.APIError) as caught:
                await client.images.get("t", endpoint=endpoint)
            check_error(caught.value, expect)
            return
        task = await client.images.get("t", endpoint=endpoint)
    check_task(task, expect)
    assert task.raw == json.loads(payload(entry))["data"]


@pytest.mark.parametrize("entry", by_kind("list"))
async def test_list_answers(stub: Stub, entry: dict[str, Any]) -> None:
    endpoint = entry["endpoint"]
    stub.answer("list", endpoint, payload(entry), entry["http_status"])
    async with client_for(stub) as client:
        tasks = [task async for task in client.images.list(endpoint=endpoint)]
    assert len(tasks) == len(entry["expect"]["tasks"])
    for task, expect in zip(tasks, entry["expect"]["tasks"], strict=True):
        check_task(task, expect)


@pytest.mark.parametrize("entry", by_kind("request"))
async def test_request_examples_go_out_as_documented(stub: Stub, entry: dict[str, Any]) -> None:
    # The reference page's request body, read into the endpoint's request model
    # and sent: Kling receives the page's body (and the SDK's external_task_id).
    endpoint, example = entry["endpoint"], json.loads(payload(entry))
    answer = (HERE / "payloads" / entry["answer"]).read_bytes()
    stub.answer("create", endpoint, answer)
    request = kling_async.request_from_mapping(example, endpoint=endpoint)
    async with client_for(stub) as client:
        handle = await client.images.submit(request)
    assert handle.endpoint.value == endpoint
    (sent,) = stub.bodies
    assert sent.pop("external_task_id")
    assert sent == example


@pytest.mark.parametrize("entry", by_kind("recognize"))
async def test_image_recognition_answers(stub: Stub, entry: dict[str, Any]) -> None:
    stub.answer("sync", entry["endpoint"], payload(entry), entry["http_status"])
    async with client_for(stub) as client:
        found = await client.images.recognize(SUBJECT)
    expect = entry["expect"]
    assert [[r.type, r.is_contain, r.url] for r in found.regions] == expect["regions"]
    assert found.final_unit_deduction == expect["final_unit_deduction"]
    assert stub.seen == [("POST", "/v1/videos/image-recognize")]


@pytest.mark.parametrize("entry", by_kind("costs"))
async def test_account_costs_answers(stub: Stub, entry: dict[str, Any]) -> None:
    stub.answer("sync", entry["endpoint"], payload(entry), entry["http_status"])
    async with client_for(stub) as client:
        costs = await client.account.costs(start_time=1726124664368, end_time=1727366400000)
    packs = [
        [p.resource_pack_name, p.resource_pack_type, p.total_quantity, p.remaining_quantity,
         p.status]
        for p in costs.packs
    ]  # fmt: skip
    assert packs == entry["expect"]["packs"]
    assert costs.packs[0].invalid_time == datetime.fromtimestamp(1727366400, tz=timezone.utc)
    assert stub.seen == [("GET", "/account/costs")]


@pytest.mark.parametrize("entry", by_kind("callback"))
async def test_callbacks(entry: dict[str, Any]) -> None:
    webhook = entry.get("webhook") or {}
    options: dict[str, Any] = {"secret": SECRET, "confirm": False}
    if webhook:
        options.update(webhook_secret=webhook["secret"], clock=lambda: webhook["clock"])
    receiver = CallbackReceiver(**options)
    seen: list[Task] = []
    receiver.on_update(seen.append)
    async with receiver.serve():
        url = receiver.url_for(entry["url_external_task_id"])
        async with aiohttp.ClientSession() as session:
            headers = {"Content-Type": "application/json", **webhook.get("headers", {})}
            async with session.post(url, data=payload(entry), headers=headers) as response:
                reply = await response.json()
                status = response.status
    await receiver.close()
    assert (status, reply) == (200, {"ok": True, "message": "accepted"})
    assert len(seen) == 1
    check_task(seen[0], entry["expect"])


async def test_a_documented_terminal_callback_is_confirmed_against_a_documented_get(
    stub: Stub,
) -> None:
    """The legacy callback example, confirmed by the image-generation get example:
    the hook gets the API's task (with the watermark_url the callback lacks)."""
    entries = {entry["name"]: entry for entry in CORPUS}
    query = entries["aself101-image-generation-query"]
    stub.answer("get", Endpoint.GENERATIONS.value, payload(query))
    receiver = CallbackReceiver(secret=SECRET)
    seen: list[Task] = []
    receiver.on_update(seen.append)
    async with receiver.serve(), client_for(stub, callbacks=receiver):
        callback = entries["aself101-legacy-callback"]
        async with aiohttp.ClientSession() as session:
            url = receiver.url_for(callback["url_external_task_id"])
            async with session.post(url, data=payload(callback)) as response:
                assert response.status == 200
        await eventually(lambda: seen)
    await receiver.close()
    assert stub.seen == [("GET", "/v1/images/generations/string")]
    assert len(seen) == 1
    check_task(seen[0], query["expect"])
