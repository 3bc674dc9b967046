"""FakeKlingServer, driven over loopback with a plain aiohttp client (no SDK, no mocks)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import re
import signal
import struct
import sys
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import attrs
import jwt
import pytest
from aiohttp import web

from kling_async.testing import (
    CallbackFaults,
    FakeKlingServer,
    FakeTask,
    RateLimit,
    WireShapes,
    encode_png,
)
from kling_async.testing._files import byte_range
from kling_async.testing._handlers import FakeApi, Routing, routing_of
from kling_async.testing._http import Reply, Request
from kling_async.testing._options import Fault, ServerOptions
from kling_async.testing._quota import TokenBucket
from kling_async.testing._tasks import default_outcome

GEN = "images/generations"
MULTI = "images/multi-image2image"
AUTH = {"Authorization": "Bearer test-token"}
IMAGE_URL = "https://example.com/subject.png"
SECRET = "s" * 40

Json = dict[str, Any]


# --- helpers ----------------------------------------------------------------------


def png_b64(width: int = 400, height: int = 400) -> str:
    return base64.b64encode(encode_png(width, height)).decode()


def jpeg_b64(width: int, height: int) -> str:
    """A JPEG header (SOI + SOF0): enough for Kling's header-only checks."""
    frame = struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return base64.b64encode(b"\xff\xd8\xff\xc0" + frame + b"\xff\xd9").decode()


def gen_body(**fields: Any) -> Json:
    return {"model_name": "kling-v3", "prompt": "a red fox", **fields}


def multi_body(**fields: Any) -> Json:
    return {
        "model_name": "kling-v2",
        "subject_image_list": [{"subject_image": IMAGE_URL}],
        **fields,
    }


class Api:
    """A thin HTTP helper: every call returns (HTTP status, parsed JSON, headers)."""

    def __init__(self, session: aiohttp.ClientSession, server: FakeKlingServer) -> None:
        self.session = session
        self.server = server

    async def call(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> tuple[int, Any, Any]:
        async with self.session.request(
            method, self.server.url + path, headers=AUTH if headers is None else headers, **kwargs
        ) as response:
            body = await response.read()
            parsed = json.loads(body) if response.content_type == "application/json" else body
            return response.status, parsed, response.headers

    async def create(self, endpoint: str, body: Any, **kwargs: Any) -> tuple[int, Any, Any]:
        return await self.call("POST", f"/v1/{endpoint}", json=body, **kwargs)

    async def get(self, endpoint: str, ident: str, **kwargs: Any) -> tuple[int, Any, Any]:
        return await self.call("GET", f"/v1/{endpoint}/{ident}", **kwargs)

    async def list(
        self, endpoint: str, *, headers: dict[str, str] | None = None, **params: Any
    ) -> tuple[int, Any, Any]:
        return await self.call("GET", f"/v1/{endpoint}", params=params, headers=headers)

    async def task_id(self, endpoint: str = GEN, **fields: Any) -> str:
        body = gen_body(**fields) if endpoint == GEN else multi_body(**fields)
        status, payload, _ = await self.create(endpoint, body)
        assert status == 200, payload
        return str(payload["data"]["task_id"])

    async def wait_status(
        self, endpoint: str, ident: str, *wanted: str, timeout: float = 3
    ) -> Json:
        deadline = time.monotonic() + timeout
        while True:
            _, payload, _ = await self.get(endpoint, ident)
            if payload["data"]["task_status"] in wanted:
                return dict(payload["data"])
            assert time.monotonic() < deadline, payload
            await asyncio.sleep(0.01)


async def eventually(check: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def serve(
    session: aiohttp.ClientSession,
) -> AsyncIterator[Callable[..., Awaitable[Api]]]:
    """Start servers with given options; all are closed after the test."""
    servers: list[FakeKlingServer] = []

    async def start(**options: Any) -> Api:
        server = FakeKlingServer(**options)
        await server.start()
        servers.append(server)
        return Api(session, server)

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def api(serve: Callable[..., Awaitable[Api]]) -> Api:
    return await serve()


def assert_envelope(payload: Any, code: int) -> None:
    assert set(payload) == {"code", "message", "request_id", "data"}
    assert payload["code"] == code
    assert isinstance(payload["message"], str)
    uuid.UUID(payload["request_id"])


# --- create / get ---------------------------------------------------------------


async def test_create_returns_submitted_task_in_envelope(api: Api) -> None:
    before = int(time.time() * 1000)
    status, payload, headers = await api.create(GEN, gen_body(external_task_id="ext-1"))
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert_envelope(payload, 0)
    data = payload["data"]
    assert set(data) == {"task_id", "task_status", "task_info", "created_at", "updated_at"}
    assert data["task_status"] == "submitted"
    assert data["task_info"] == {"external_task_id": "ext-1"}
    assert before <= data["created_at"] == data["updated_at"] <= int(time.time() * 1000)
    assert len(data["task_id"]) >= 16
    assert api.server.tasks[data["task_id"]].external_task_id == "ext-1"


async def test_request_ids_and_task_ids_are_unique(api: Api) -> None:
    replies = [await api.create(GEN, gen_body()) for _ in range(5)]
    assert len({payload["request_id"] for _, payload, _ in replies}) == 5
    assert len({payload["data"]["task_id"] for _, payload, _ in replies}) == 5


async def test_get_by_task_id_and_by_external_id(api: Api) -> None:
    task_id = await api.task_id(external_task_id="mine-42")
    for ident in (task_id, "mine-42"):
        status, payload, _ = await api.get(GEN, ident)
        assert status == 200
        assert_envelope(payload, 0)
        data = payload["data"]
        assert data["task_id"] == task_id
        assert data["task_info"]["external_task_id"] == "mine-42"
        assert set(data) >= {
            "task_status",
            "task_status_msg",
            "created_at",
            "updated_at",
            "final_unit_deduction",
            "watermark_info",
            "task_result",
        }


async def test_multi_image_task_is_only_visible_under_its_endpoint(api: Api) -> None:
    task_id = await api.task_id(MULTI, external_task_id="multi-1")
    status, payload, _ = await api.get(MULTI, task_id)
    assert (status, payload["data"]["task_id"]) == (200, task_id)
    for ident in (task_id, "multi-1"):
        status, payload, _ = await api.get(GEN, ident)
        assert (status, payload["code"]) == (404, 1203)
    status, payload, _ = await api.get(GEN, "no-such-task")
    assert (status, payload["code"]) == (404, 1203)


async def test_duplicate_external_task_id_across_endpoints(api: Api) -> None:
    await api.task_id(GEN, external_task_id="dup")
    for endpoint, body in (
        (GEN, gen_body(external_task_id="dup")),
        (MULTI, multi_body(external_task_id="dup")),
    ):
        status, payload, _ = await api.create(endpoint, body)
        assert (status, payload["code"]) == (400, 1201)
        assert "external_task_id already exists" in payload["message"]
    assert len(api.server.tasks) == 1


async def test_unknown_path_and_method(api: Api) -> None:
    status, payload, _ = await api.call("GET", "/v1/videos/text2video")
    assert (status, payload["code"]) == (404, 1202)
    status, payload, _ = await api.call("DELETE", f"/v1/{GEN}")
    assert (status, payload["code"]) == (404, 1202)
    assert api.server.requests[-1].route == "other"


async def test_path_prefix_serves_under_gateway_root(serve: Callable[..., Awaitable[Api]]) -> None:
    api = await serve(path_prefix="/kling")
    assert api.server.url.endswith("/kling")
    status, _, _ = await api.create(GEN, gen_body())
    assert status == 200
    async with api.session.post(api.server.origin + f"/v1/{GEN}", json=gen_body()) as response:
        assert response.status == 404


# --- lifecycle --------------------------------------------------------------------


async def test_lifecycle_runs_on_timers(serve: Callable[..., Awaitable[Api]]) -> None:
    api = await serve(processing_delay=0.05, task_duration=0.15)
    started = time.monotonic()
    task_id = await api.task_id(n=3, watermark_info={"enabled": True})
    seen: list[str] = []
    while not seen or seen[-1] not in ("succeed", "failed"):
        _, payload, _ = await api.get(GEN, task_id)
        if not seen or seen[-1] != payload["data"]["task_status"]:
            seen.append(payload["data"]["task_status"])
        assert time.monotonic() - started < 3
        await asyncio.sleep(0.01)
    assert time.monotonic() - started >= 0.15
    assert seen[-2:] == ["processing", "succeed"]
    data = payload["data"]
    assert data["task_status_msg"] == ""
    assert data["final_unit_deduction"] == "3"
    assert data["watermark_info"] == {"enabled": True}
    assert data["updated_at"] > data["created_at"]
    images = data["task_result"]["images"]
    assert [image["index"] for image in images] == [0, 1, 2]
    assert all(image["url"].startswith(api.server.origin) for image in images)
    assert all("watermark_url" in image for image in images)


async def test_transitions_happen_without_polling(serve: Callable[..., Awaitable[Api]]) -> None:
    api = await serve(processing_delay=0.01, task_duration=0.05, concurrency_limit=2)
    await api.task_id(n=2)
    assert api.server.units_in_use == 2
    await eventually(lambda: api.server.units_in_use == 0)
    assert [task.status for task in api.server.tasks.values()] == ["succeed"]


async def test_fail_marker_and_no_watermark(api: Api) -> None:
    task_id = await api.task_id(prompt="a fox [fail]")
    data = await api.wait_status(GEN, task_id, "succeed", "failed")
    assert data["task_status"] == "failed"
    assert data["task_status_msg"] == "Content review failed (simulated)"
    assert data["task_result"]["images"] == []
    ok_id = await api.task_id()
    data = await api.wait_status(GEN, ok_id, "succeed", "failed")
    assert data["task_status"] == "succeed"
    assert "watermark_url" not in data["task_result"]["images"][0]
    assert data["watermark_info"] == {"enabled": False}


async def test_custom_outcome_and_duration(serve: Callable[..., Awaitable[Api]]) -> None:
    def outcome(task: FakeTask) -> str | None:
        return "too many" if task.n > 1 else None

    def duration(task: FakeTask) -> float:
        return 0.02 * task.n

    api = await serve(outcome=outcome, task_duration=duration, processing_delay=0.0)
    one = await api.task_id(MULTI, n=1)
    two = await api.task_id(MULTI, n=2)
    assert (await api.wait_status(MULTI, one, "succeed", "failed"))["task_status"] == "succeed"
    data = await api.wait_status(MULTI, two, "succeed", "failed")
    assert (data["task_status"], data["task_status_msg"]) == ("failed", "too many")


async def test_manual_finish_when_tasks_never_end(serve: Callable[..., Awaitable[Api]]) -> None:
    api = await serve(processing_delay=30, task_duration=None)
    a = await api.task_id(external_task_id="a")
    b = await api.task_id()
    assert (await api.get(GEN, a))[1]["data"]["task_status"] == "submitted"
    api.server.finish("a")
    api.server.finish(b, failure="nope")
    assert (await api.get(GEN, a))[1]["data"]["task_status"] == "succeed"
    data = (await api.get(GEN, b))[1]["data"]
    assert (data["task_status"], data["task_status_msg"]) == ("failed", "nope")
    with pytest.raises(ValueError, match="already ended"):
        api.server.finish(a)
    with pytest.raises(KeyError):
        api.server.finish("unknown")


async def test_updated_at_increases_under_a_frozen_clock(
    serve: Callable[..., Awaitable[Api]],
) -> None:
    api = await serve(clock=lambda: 1_700_000_000.0, processing_delay=0.0, task_duration=None)
    task_id = await api.task_id()
    await api.wait_status(GEN, task_id, "processing")
    api.server.finish(task_id)
    task = api.server.tasks[task_id]
    assert task.created_at_ms == 1_700_000_000_000
    assert task.updated_at_ms == task.created_at_ms + 2


# --- list -------------------------------------------------------------------------


async def test_list_pages_newest_first(api: Api) -> None:
    ids = [await api.task_id(external_task_id=f"t{i}") for i in range(5)]
    await api.task_id(MULTI)
    status, payload, _ = await api.list(GEN, pageNum=1, pageSize=2)
    assert status == 200
    assert_envelope(payload, 0)
    assert [task["task_id"] for task in payload["data"]] == [ids[4], ids[3]]
    _, payload, _ = await api.list(GEN, pageNum=3, pageSize=2)
    assert [task["task_id"] for task in payload["data"]] == [ids[0]]
    _, payload, _ = await api.list(GEN, pageNum=4, pageSize=2)
    assert payload["data"] == []
    _, payload, _ = await api.list(GEN)
    assert len(payload["data"]) == 5
    assert payload["data"][0]["task_info"]["external_task_id"] == "t4"
    _, payload, _ = await api.list(MULTI, pageSize=500)
    assert len(payload["data"]) == 1


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("pageNum", 0),
        ("pageNum", 1001),
        ("pageSize", 0),
        ("pageSize", 501),
        ("pageSize", "ten"),
    ],
)
async def test_list_page_bounds(api: Api, param: str, value: object) -> None:
    status, payload, _ = await api.call("GET", f"/v1/{GEN}", params={param: str(value)})
    assert (status, payload["code"]) == (400, 1201)
    assert param in payload["message"]


async def test_list_accepts_the_extreme_bounds(api: Api) -> None:
    for params in ({"pageNum": "1000", "pageSize": "1"}, {"pageNum": "1", "pageSize": "500"}):
        status, payload, _ = await api.call("GET", f"/v1/{GEN}", params=params)
        assert (status, payload["data"]) == (200, [])


# --- validation ---------------------------------------------------------------------

TOO_LONG = "x" * 2501
TEN_ELEMENTS = [{"element_id": i} for i in range(10)]

VALIDATION_CASES: list[tuple[str, str, Any, str]] = [
    ("not-an-object", GEN, [gen_body()], "body"),
    ("prompt-missing", GEN, {"model_name": "kling-v3"}, "prompt"),
    ("prompt-empty", GEN, gen_body(prompt=""), "prompt"),
    ("prompt-too-long", GEN, gen_body(prompt=TOO_LONG), "prompt"),
    ("negative-too-long", GEN, gen_body(negative_prompt=TOO_LONG), "negative_prompt"),
    (
        "negative-with-image",
        GEN,
        gen_body(negative_prompt="blur", image=IMAGE_URL),
        "negative_prompt",
    ),
    (
        "reference-unknown",
        GEN,
        gen_body(image=IMAGE_URL, image_reference="style"),
        "image_reference",
    ),
    ("reference-without-image", GEN, gen_body(image_reference="face"), "image"),
    ("image-fidelity-range", GEN, gen_body(image=IMAGE_URL, image_fidelity=1.5), "image_fidelity"),
    ("human-fidelity-type", GEN, gen_body(human_fidelity="high"), "human_fidelity"),
    ("element-list-type", GEN, gen_body(element_list=[{"id": 1}]), "element_list"),
    (
        "element-list-too-many",
        GEN,
        gen_body(element_list=TEN_ELEMENTS, image=IMAGE_URL),
        "element_list",
    ),
    ("resolution", GEN, gen_body(resolution="4k"), "resolution"),
    ("n-zero", GEN, gen_body(n=0), "n"),
    ("n-ten", GEN, gen_body(n=10), "n"),
    ("n-not-int", GEN, gen_body(n="2"), "n"),
    ("aspect-ratio", GEN, gen_body(aspect_ratio="5:4"), "aspect_ratio"),
    ("watermark-info", GEN, gen_body(watermark_info={"enabled": "yes"}), "watermark_info"),
    ("callback-url", GEN, gen_body(callback_url="ftp://example.com/hook"), "callback_url"),
    ("external-id-empty", GEN, gen_body(external_task_id=""), "external_task_id"),
    ("model-missing", GEN, {"prompt": "a fox"}, "model_name"),
    ("model-empty", MULTI, multi_body(model_name=""), "model_name"),
    ("image-data-prefix", GEN, gen_body(image="data:image/png;base64," + png_b64()), "image"),
    ("image-not-base64", GEN, gen_body(image="not base64 at all!"), "image"),
    (
        "image-not-jpeg-or-png",
        GEN,
        gen_body(image=base64.b64encode(b"GIF89a" + bytes(64)).decode()),
        "image",
    ),
    ("image-too-small", GEN, gen_body(image=png_b64(299, 400)), "image"),
    ("image-too-narrow", GEN, gen_body(image=jpeg_b64(1000, 300)), "image"),
    ("subjects-missing", MULTI, {"model_name": "kling-v2"}, "subject_image_list"),
    ("subjects-empty", MULTI, multi_body(subject_image_list=[]), "subject_image_list"),
    (
        "subjects-too-many",
        MULTI,
        multi_body(subject_image_list=[{"subject_image": IMAGE_URL}] * 5),
        "subject_image_list",
    ),
    (
        "subject-shape",
        MULTI,
        multi_body(subject_image_list=[{"image": IMAGE_URL}]),
        "subject_image_list[0]",
    ),
    (
        "subject-image-bad",
        MULTI,
        multi_body(subject_image_list=[{"subject_image": png_b64(100, 100)}]),
        "subject_image_list[0]",
    ),
    ("multi-prompt-too-long", MULTI, multi_body(prompt=TOO_LONG), "prompt"),
    ("scene-image", MULTI, multi_body(scene_image="data:image/jpeg;base64,AAAA"), "scene_image"),
    ("style-image", MULTI, multi_body(style_image=jpeg_b64(200, 400)), "style_image"),
]


@pytest.mark.parametrize(
    ("endpoint", "body", "field"),
    [case[1:] for case in VALIDATION_CASES],
    ids=[case[0] for case in VALIDATION_CASES],
)
async def test_validation_rejects_with_1201_naming_the_field(
    api: Api, endpoint: str, body: Any, field: str
) -> None:
    status, payload, _ = await api.create(endpoint, body)
    assert (status, payload["code"]) == (400, 1201), payload
    assert_envelope(payload, 1201)
    assert field in payload["message"]
    assert api.server.tasks == {}


async def test_body_that_is_not_json_is_rejected(api: Api) -> None:
    status, payload, _ = await api.call(
        "POST",
        f"/v1/{GEN}",
        data=b"{not json",
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert (status, payload["code"]) == (400, 1201)
    assert api.server.requests[-1].json is None


async def test_image_over_ten_megabytes_is_rejected(api: Api) -> None:
    big = encode_png(400, 400) + bytes(10 * 1024 * 1024)
    body = json.dumps(gen_body(image=base64.b64encode(big).decode())).encode()
    # A file-like body: aiohttp warns about sending megabytes of raw bytes at once.
    status, payload, _ = await api.call(
        "POST",
        f"/v1/{GEN}",
        data=io.BytesIO(body),
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert (status, payload["code"]) == (400, 1201)
    assert "10 MB" in payload["message"]


async def test_valid_images_and_full_bodies_are_accepted(api: Api) -> None:
    body = gen_body(
        image=png_b64(600, 400),
        image_reference="subject",
        image_fidelity=0.5,
        human_fidelity=1,
        element_list=[{"element_id": 7}] * 9,
        resolution="2k",
        n=9,
        aspect_ratio="21:9",
        watermark_info={"enabled": False},
        callback_url="https://example.com/hook",
        external_task_id="full",
    )
    assert (await api.create(GEN, body))[0] == 200
    multi = multi_body(
        subject_image_list=[{"subject_image": jpeg_b64(300, 750)}, {"subject_image": IMAGE_URL}],
        prompt="blend",
        scene_image=png_b64(),
        style_image=IMAGE_URL,
        n=2,
    )
    assert (await api.create(MULTI, multi))[0] == 200


async def test_unknown_model_is_1203(serve: Callable[..., Awaitable[Api]]) -> None:
    api = await serve(models={"kling-v3", "kling-v2"})
    status, payload, _ = await api.create(GEN, gen_body(model_name="kling-v9"))
    assert (status, payload["code"]) == (404, 1203)
    assert "model not found" in payload["message"]
    assert (await api.create(GEN, gen_body()))[0] == 200


# --- auth ---------------------------------------------------------------------------


async def test_any_bearer_token_without_configured_credentials(api: Api) -> None:
    status, _, _ = await api.list(GEN)
    assert status == 200
    status, payload, _ = await api.call("GET", f"/v1/{GEN}", headers={})
    assert (status, payload["code"]) == (401, 1001)
    status, payload, _ = await api.call("GET", f"/v1/{GEN}", headers={"Authorization": "Basic abc"})
    assert (status, payload["code"]) == (401, 1002)
    status, payload, _ = await api.call("GET", f"/v1/{GEN}", headers={"Authorization": "Bearer "})
    assert (status, payload["code"]) == (401, 1002)


async def test_static_api_key(serve: Callable[..., Awaitable[Api]]) -> None:
    api = await serve(api_key="right")
    status, payload, _ = await api.list(GEN, headers=None)
    assert (status, payload["code"]) == (401, 1002)
    status, _, _ = await api.call("GET", f"/v1/{GEN}", headers={"Authorization": "Bearer right"})
    assert status == 200
    assert api.server.requests[-1].authorization == "Bearer right"


async def test_jwt_auth_outcomes(serve: Callable[..., Awaitable[Api]]) -> None:
    now = [1_700_000_000.0]
    api = await serve(access_key="ak", secret_key=SECRET, clock=lambda: now[0])

    def token(secret: str = SECRET, **claims: Any) -> dict[str, str]:
        payload = {"iss": "ak", "exp": int(now[0]) + 1800, "nbf": int(now[0]) - 5, **claims}
        signed = jwt.encode(payload, secret, algorithm="HS256", headers={"typ": "JWT"})
        return {"Authorization": f"Bearer {signed}"}

    async def code(headers: dict[str, str]) -> tuple[int, int]:
        status, payload, _ = await api.call("GET", f"/v1/{GEN}", headers=headers)
        return status, payload["code"]

    good = token()
    assert await code(good) == (200, 0)
    assert await code(token(secret="t" * 40)) == (401, 1002)
    assert await code(token(iss="someone-else")) == (401, 1002)
    assert await code({"Authorization": "Bearer not.a.jwt"}) == (401, 1002)
    assert await code(token(nbf=int(now[0]) + 60)) == (401, 1003)
    now[0] += 1801  # the clock moves on and the good token expires
    assert await code(good) == (401, 1004)


# --- account limits ---------------------------------------------------------------


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
    utilisation = api.server.utilisation()
    assert 0.5 < utilisation <= 1.0
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


# --- fault injection ----------------------------------------------------------------


async def test_error_fault_answers_without_acting(api: Api) -> None:
    fault = api.server.inject("error", route="create", code=5001, retry_after=0.5)
    status, payload, headers = await api.create(GEN, gen_body(external_task_id="e1"))
    assert (status, payload["code"]) == (503, 5001)
    assert_envelope(payload, 5001)
    assert headers["Retry-After"] == "0.5"
    assert api.server.tasks == {}
    assert fault.hits == 1
    assert fault.exhausted
    assert (await api.create(GEN, gen_body(external_task_id="e1")))[0] == 200
    assert [r.fault for r in api.server.requests_for("create")] == ["error", None]


async def test_error_fault_with_custom_status_and_message(api: Api) -> None:
    api.server.inject("error", route="list", code=1304, http_status=403, message="ip blocked")
    status, payload, _ = await api.list(GEN)
    assert (status, payload["code"], payload["message"]) == (403, 1304, "ip blocked")


async def test_error_after_really_creates_the_task(api: Api) -> None:
    api.server.inject("error_after", route="create", code=5000)
    status, payload, _ = await api.create(GEN, gen_body(external_task_id="ambiguous"))
    assert (status, payload["code"]) == (500, 5000)
    status, payload, _ = await api.get(GEN, "ambiguous")
    assert status == 200
    assert payload["data"]["task_info"]["external_task_id"] == "ambiguous"
    assert len(api.server.requests_for("create", external_task_id="ambiguous")) == 1


async def test_drop_closes_connection_before_acting(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fault = api.server.inject("drop", route="create")
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await api.create(GEN, gen_body(external_task_id="dropped"))
    assert api.server.tasks == {}
    assert fault.hits == 1
    record = api.server.requests_for("create")[0]
    assert (record.http_status, record.code, record.fault) == (None, None, "drop")
    assert (await api.create(GEN, gen_body(external_task_id="dropped")))[0] == 200
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_drop_after_creates_the_task_then_disconnects(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    api.server.inject("drop_after", route="create", endpoint=MULTI)
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await api.create(MULTI, multi_body(external_task_id="lost-answer"))
    status, payload, _ = await api.get(MULTI, "lost-answer")
    assert (status, payload["data"]["task_status"]) == (200, "submitted")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_drop_of_a_get_needs_two_hits_to_reach_an_aiohttp_client(api: Api) -> None:
    task_id = await api.task_id()
    fault = api.server.inject("drop", route="get", times=1)
    assert (await api.get(GEN, task_id))[0] == 200  # aiohttp silently retried the GET once
    assert fault.hits == 1
    fault = api.server.inject("drop", route="get", times=2)
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await api.get(GEN, task_id)
    assert fault.hits == 2


async def test_delay_fault_slows_the_answer(api: Api) -> None:
    api.server.inject("delay", route="list", delay=0.15)
    started = time.monotonic()
    status, _, _ = await api.list(GEN)
    assert status == 200
    assert time.monotonic() - started >= 0.15
    started = time.monotonic()
    await api.list(GEN)
    assert time.monotonic() - started < 0.15


async def test_garbage_fault(api: Api) -> None:
    api.server.inject("garbage", route="get")
    status, body, _ = await api.get(GEN, "whatever")
    assert status == 502
    assert body.startswith(b"<html>")
    api.server.inject("garbage", body="{not json", http_status=200)
    status, body, _ = await api.list(GEN)
    assert (status, body) == (200, b"{not json")
    assert api.server.requests[-1].code is None


async def test_fault_endpoint_times_and_clear(api: Api) -> None:
    fault = api.server.inject("error", endpoint=MULTI, times=None, code=5002)
    assert (await api.create(GEN, gen_body()))[0] == 200
    for _ in range(3):
        status, payload, _ = await api.list(MULTI)
        assert (status, payload["code"]) == (504, 5002)
    assert fault.hits == 3
    assert api.server.faults == [fault]
    api.server.clear_faults()
    assert (await api.list(MULTI))[0] == 200
    with pytest.raises(ValueError, match="kind"):
        api.server.inject("explode")  # type: ignore[arg-type]


async def test_fault_probability_is_seeded(serve: Callable[..., Awaitable[Api]]) -> None:
    async def pattern(seed: int) -> list[int]:
        api = await serve(seed=seed)
        api.server.inject("error", probability=0.5, times=None)
        return [(await api.list(GEN))[0] for _ in range(20)]

    first, second = await pattern(3), await pattern(3)
    assert first == second
    assert {200, 500} == set(first)


async def test_download_faults(api: Api) -> None:
    task_id = await api.task_id()
    data = await api.wait_status(GEN, task_id, "succeed")
    api.server.inject("error", route="download", code=5000)
    async with api.session.get(data["task_result"]["images"][0]["url"]) as response:
        assert response.status == 500


# --- result files -------------------------------------------------------------------


def parse_png(data: bytes) -> tuple[int, int, bytes]:
    """Check every chunk's CRC and return width, height and the inflated pixels."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, chunks = 8, []
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        payload = data[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length : position + 12 + length])
        assert zlib.crc32(kind + payload) & 0xFFFFFFFF == crc, kind
        chunks.append((kind, payload))
        position += 12 + length
    assert chunks[0][0] == b"IHDR"
    assert chunks[-1] == (b"IEND", b"")
    width, height, depth, colour, _, _, _ = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour) == (8, 2)
    pixels = zlib.decompress(b"".join(p for k, p in chunks if k == b"IDAT"))
    assert len(pixels) == height * (1 + 3 * width)
    return width, height, pixels


async def test_result_png_is_valid_and_sized_by_aspect_ratio(api: Api) -> None:
    task_id = await api.task_id(aspect_ratio="16:9", n=2, watermark_info={"enabled": True})
    images = (await api.wait_status(GEN, task_id, "succeed"))["task_result"]["images"]
    async with api.session.get(images[1]["url"]) as response:
        assert response.status == 200
        assert response.content_type == "image/png"
        plain = await response.read()
    assert parse_png(plain)[:2] == (512, 288)
    async with api.session.get(images[1]["watermark_url"]) as response:
        marked = await response.read()
    assert parse_png(marked)[:2] == (512, 288)
    assert marked != plain
    tall_id = await api.task_id(aspect_ratio="9:16")
    tall = (await api.wait_status(GEN, tall_id, "succeed"))["task_result"]["images"][0]
    async with api.session.get(tall["url"]) as response:
        assert parse_png(await response.read())[:2] == (288, 512)


async def test_result_head_range_and_missing(api: Api) -> None:
    task_id = await api.task_id()
    url = (await api.wait_status(GEN, task_id, "succeed"))["task_result"]["images"][0]["url"]
    async with api.session.get(url) as response:
        full = await response.read()
    async with api.session.head(url) as response:
        assert response.status == 200
        assert int(response.headers["Content-Length"]) == len(full)
        assert response.headers["Accept-Ranges"] == "bytes"
    async with api.session.get(url, headers={"Range": "bytes=100-"}) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 100-{len(full) - 1}/{len(full)}"
        assert await response.read() == full[100:]
    async with api.session.get(url, headers={"Range": f"bytes={len(full)}-"}) as response:
        assert response.status == 416
    base = f"{api.server.origin}/results/{task_id}"
    for missing in (f"{base}/1.png", f"{base}/0-watermark.png", f"{base}/x.png", f"{base}/0.jpg"):
        async with api.session.get(missing) as response:
            assert response.status == 404, missing
    async with api.session.get(f"{api.server.origin}/results/nope/0.png") as response:
        assert response.status == 404
    assert api.server.requests_for("download")


# --- callbacks ----------------------------------------------------------------------


class Receiver:
    """A loopback HTTP endpoint collecting callback payloads."""

    def __init__(self) -> None:
        self.payloads: list[Json] = []
        self.status = 200
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.payloads.append(await request.json())
        return web.Response(status=self.status)

    def statuses(self) -> list[str]:
        return [payload["task_status"] for payload in self.payloads]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hook/{token}", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    receiver.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook/secret-token"
    yield receiver
    await runner.cleanup()


async def test_callbacks_delivered_on_every_status_change(
    serve: Callable[..., Awaitable[Api]], receiver: Receiver
) -> None:
    api = await serve(processing_delay=0.02, task_duration=0.06)
    task_id = await api.task_id(callback_url=receiver.url, external_task_id="cb")
    await eventually(lambda: len(receiver.payloads) == 2)
    await api.server.flush_callbacks()
    assert receiver.statuses() == ["processing", "succeed"]
    final = receiver.payloads[-1]
    _, payload, _ = await api.get(GEN, task_id)
    assert final == payload["data"]
    assert final["task_info"]["external_task_id"] == "cb"
    assert receiver.payloads[0]["updated_at"] < final["updated_at"]
    records = api.server.callbacks
    assert [(r.status, r.delivered, r.http_status) for r in records] == [
        ("processing", True, 200),
        ("succeed", True, 200),
    ]
    assert all(r.url == receiver.url and r.task_id == task_id for r in records)


async def test_callback_failures_are_recorded(
    serve: Callable[..., Awaitable[Api]], receiver: Receiver
) -> None:
    receiver.status = 500
    api = await serve(processing_delay=30, task_duration=None)
    task_id = await api.task_id(callback_url=receiver.url)
    api.server.finish(task_id)
    closed_port = "http://127.0.0.1:1/hook"
    other = await api.task_id(callback_url=closed_port)
    api.server.finish(other, failure="x")
    await api.server.flush_callbacks()
    by_task = {r.task_id: r for r in api.server.callbacks}
    assert (by_task[task_id].delivered, by_task[task_id].http_status) == (False, 500)
    assert by_task[other].delivered is False
    assert by_task[other].http_status is None
    assert by_task[other].error


async def test_callbacks_refuse_non_loopback_hosts(serve: Callable[..., Awaitable[Api]]) -> None:
    api = await serve(processing_delay=30, task_duration=None)
    for url in ("http://203.0.113.7/hook", "https://example.com/hook"):
        api.server.finish(await api.task_id(callback_url=url))
    await api.server.flush_callbacks()
    assert len(api.server.callbacks) == 2
    for record in api.server.callbacks:
        assert record.delivered is False
        assert record.http_status is None
        assert record.error is not None
        assert "loopback" in record.error


@pytest.mark.parametrize(
    ("faults", "expected"),
    [
        (CallbackFaults(drop=1.0), []),
        (CallbackFaults(duplicate=1.0), ["processing", "processing", "succeed", "succeed"]),
        (CallbackFaults(reorder=1.0), ["succeed", "processing"]),
        (CallbackFaults(delay=0.05), ["processing", "succeed"]),
    ],
    ids=["drop", "duplicate", "reorder", "delay"],
)
async def test_callback_faults(
    serve: Callable[..., Awaitable[Api]],
    receiver: Receiver,
    faults: CallbackFaults,
    expected: list[str],
) -> None:
    api = await serve(callback_faults=faults, seed=11, processing_delay=0.01, task_duration=None)
    task_id = await api.task_id(callback_url=receiver.url)
    await eventually(lambda: api.server.tasks[task_id].status == "processing")
    await api.server.flush_callbacks()
    api.server.finish(task_id)
    await api.server.flush_callbacks()
    assert receiver.statuses() == expected
    if faults.drop:
        assert [(r.status, r.delivered) for r in api.server.callbacks] == [
            ("processing", False),
            ("succeed", False),
        ]
        assert all("dropped" in (r.error or "") for r in api.server.callbacks)


async def test_callback_faults_are_reproducible_with_a_seed(
    serve: Callable[..., Awaitable[Api]], receiver: Receiver
) -> None:
    async def run(seed: int) -> list[tuple[str, str, bool]]:
        faults = CallbackFaults(drop=0.3, duplicate=0.3, reorder=0.3)
        api = await serve(
            callback_faults=faults, seed=seed, processing_delay=0.0, task_duration=None
        )
        for _ in range(8):
            task_id = await api.task_id(callback_url=receiver.url)
            await eventually(lambda: api.server.tasks[task_id].status == "processing")  # noqa: B023
            api.server.finish(task_id)
            await api.server.flush_callbacks()
        return [(r.status, r.error or "", r.delivered) for r in api.server.callbacks]

    first = await run(5)
    assert first == await run(5)
    assert any(not delivered for _, _, delivered in first)


# --- records, stats, scale ------------------------------------------------------------


async def test_requests_are_recorded(api: Api) -> None:
    await api.create(GEN, gen_body(external_task_id="rec"))
    await api.get(GEN, "rec")
    await api.list(MULTI, pageNum=1, pageSize=5)
    await api.call("GET", f"/v1/{GEN}", headers={})
    first, second, third, fourth = api.server.requests
    assert (first.method, first.route, first.endpoint, first.path) == (
        "POST",
        "create",
        GEN,
        f"/v1/{GEN}",
    )
    assert first.json == gen_body(external_task_id="rec")
    assert (first.http_status, first.code, first.authorization) == (200, 0, AUTH["Authorization"])
    assert first.external_task_id == "rec"
    assert (second.route, second.code) == ("get", 0)
    assert (third.route, third.endpoint, third.query) == (
        "list",
        MULTI,
        {"pageNum": "1", "pageSize": "5"},
    )
    assert (fourth.authorization, fourth.http_status, fourth.code) == (None, 401, 1001)
    assert first.arrived_at <= second.arrived_at <= third.arrived_at
    assert api.server.requests_for("create", endpoint=GEN, external_task_id="rec") == [first]
    assert api.server.requests_for(endpoint=MULTI) == [third]


async def test_stats_endpoint(serve: Callable[..., Awaitable[Api]]) -> None:
    api = await serve(concurrency_limit=4, task_duration=None)
    await api.task_id(n=3)
    await api.create(GEN, gen_body(n=2))
    await api.list(GEN)
    async with api.session.get(api.server.origin + "/_fake/stats") as response:
        stats = await response.json()
    assert stats["requests"]["create"] == 2
    assert stats["requests"]["list"] == 1
    assert stats["creates_accepted"] == 1
    assert stats["creates_rejected_concurrency"] == 1
    assert (stats["units_in_use"], stats["peak_units"], stats["live_tasks"]) == (3, 3, 1)
    assert 0 < stats["utilisation"] <= 0.75 + 1e-9


async def test_callback_sink_route(api: Api) -> None:
    async with api.session.post(
        api.server.origin + "/_fake/callbacks/t", json={"a": 1}
    ) as response:
        assert response.status == 200
    assert api.server.requests_for("callback")[0].json == {"a": 1}
    task_id = await api.task_id(callback_url=api.server.origin + "/_fake/callbacks/tok")
    await api.wait_status(GEN, task_id, "succeed")
    await api.server.flush_callbacks()
    received = [r.json["task_status"] for r in api.server.requests_for("callback")[1:]]
    assert received == ["processing", "succeed"]


async def test_thousands_of_live_tasks(serve: Callable[..., Awaitable[Api]]) -> None:
    api = await serve(concurrency_limit=20_000, processing_delay=0.2, task_duration=0.4)
    connector = aiohttp.TCPConnector(limit=50)
    async with aiohttp.ClientSession(connector=connector, headers=AUTH) as session:

        async def create(i: int) -> None:
            url = f"{api.server.url}/v1/{GEN}"
            async with session.post(url, json=gen_body(external_task_id=f"bulk-{i}")) as response:
                assert response.status == 200

        await asyncio.gather(*(create(i) for i in range(2000)))
        assert api.server.live_tasks >= 1
        started = time.monotonic()
        async with session.get(f"{api.server.url}/v1/{GEN}", params={"pageSize": 500}) as response:
            page = await response.json()
        assert len(page["data"]) == 500
        created = [task["created_at"] for task in page["data"]]
        assert created == sorted(created, reverse=True)
        assert time.monotonic() - started < 1.0
    await eventually(lambda: api.server.live_tasks == 0, timeout=10)
    assert api.server.units_in_use == 0


async def test_close_is_idempotent_and_cancels_pending_work(receiver: Receiver) -> None:
    server = FakeKlingServer(processing_delay=5, task_duration=None)
    async with server:
        async with aiohttp.ClientSession(headers=AUTH) as session:
            for _ in range(3):
                async with session.post(
                    f"{server.url}/v1/{GEN}", json=gen_body(callback_url=receiver.url)
                ) as response:
                    assert response.status == 200
        assert server.live_tasks == 3
    await server.close()
    with pytest.raises(RuntimeError):
        await server.start()
    with pytest.raises(RuntimeError):
        _ = FakeKlingServer().url


async def test_close_interrupts_slow_responses() -> None:
    server = FakeKlingServer()
    await server.start()
    server.inject("delay", delay=30)
    async with aiohttp.ClientSession(headers=AUTH) as session:
        request = asyncio.ensure_future(session.get(f"{server.url}/v1/{GEN}"))
        await eventually(lambda: bool(server.requests))
        started = time.monotonic()
        await server.close()
        assert time.monotonic() - started < 5
        # Answered late or cut off by the shutdown: either way, promptly.
        with contextlib.suppress(aiohttp.ClientError):
            response = await request
            response.release()


# --- separate process ---------------------------------------------------------------


async def test_module_runs_a_server_process_until_sigterm() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kling_async.testing",
        "--port",
        "0",
        "--task-duration",
        "0.05",
        "--concurrency-limit",
        "4",
        "--rate-limit",
        "1000/1",
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), timeout=30)
        url = json.loads(line)["url"]
        assert url.startswith("http://127.0.0.1:")
        async with aiohttp.ClientSession(headers=AUTH) as session:
            async with session.post(f"{url}/v1/{GEN}", json=gen_body(n=4)) as response:
                assert (await response.json())["code"] == 0
            async with session.get(f"{url}/_fake/stats") as response:
                stats = await response.json()
        assert stats["creates_accepted"] == 1
        assert stats["peak_units"] == 4
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=15) == 0
        assert await process.stdout.read() == b""
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


ODD_VALUES: list[Any] = [None, True, 0, -1, 1.5, "", "x", [], [1], {}, {"a": 1}, [{"a": 1}]]
FIELDS = [
    "model_name",
    "prompt",
    "negative_prompt",
    "image",
    "image_reference",
    "image_fidelity",
    "element_list",
    "resolution",
    "n",
    "aspect_ratio",
    "watermark_info",
    "callback_url",
    "external_task_id",
    "subject_image_list",
    "scene_image",
]


async def test_odd_json_values_never_crash_the_server(api: Api) -> None:
    for field in FIELDS:
        for value in ODD_VALUES:
            for endpoint, base in ((GEN, gen_body()), (MULTI, multi_body())):
                status, payload, _ = await api.create(endpoint, {**base, field: value})
                assert status in (200, 400), (endpoint, field, value, payload)
                assert payload["code"] in (0, 1201)


async def test_external_id_with_reserved_characters(api: Api) -> None:
    task_id = await api.task_id(external_task_id="order/7 é?")
    async with api.session.get(
        f"{api.server.url}/v1/{GEN}/order%2F7%20%C3%A9%3F", headers=AUTH
    ) as response:
        payload = await response.json()
    assert payload["data"]["task_id"] == task_id


# --- options --------------------------------------------------------------------------

WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"k" * 24).decode()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"access_key": "ak"}, "access_key and secret_key must be given together"),
        ({"secret_key": SECRET}, "access_key and secret_key must be given together"),
        ({"processing_delay": -0.01}, "processing_delay must not be negative"),
        ({"concurrency_limit": 0}, "concurrency_limit must be at least 1"),
        ({"path_prefix": "kling"}, "path_prefix must start with '/' and not end with one"),
        ({"path_prefix": "/kling/"}, "path_prefix must start with '/' and not end with one"),
        ({"webhook_secret": "whsec_"}, "'whsec_' followed by non-empty base64"),
        ({"webhook_secret": [WEBHOOK_SECRET, "whsec_n0t-base64!"]}, "non-empty base64"),
    ],
    ids=[
        "access-without-secret",
        "secret-without-access",
        "negative-delay",
        "zero-limit",
        "prefix-without-slash",
        "prefix-with-trailing-slash",
        "empty-webhook-secret",
        "bad-second-webhook-secret",
    ],
)
def test_invalid_options_are_refused_when_built(options: Json, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        FakeKlingServer(**options)
    assert "n0t-base64" not in str(caught.value)  # never the secret itself


def test_options_are_frozen_and_none_asks_for_the_default() -> None:
    options = ServerOptions(
        models=["kling-v3"],
        outcome=None,
        callback_faults=None,
        shapes=None,
        webhook_secrets=WEBHOOK_SECRET,
        path_prefix="/kling",
    )
    assert options.models == frozenset({"kling-v3"})
    assert options.outcome is default_outcome
    assert (options.callback_faults, options.shapes) == (CallbackFaults(), WireShapes())
    assert options.webhook_secrets == (WEBHOOK_SECRET,)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        options.port = 8080  # type: ignore[misc]


def test_token_bucket_refills_by_its_clock() -> None:
    now = [100.0]
    bucket = TokenBucket(RateLimit(2, 1.0), clock=lambda: now[0])
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    now[0] += 0.5  # half the period: one token back
    assert [bucket.take() for _ in range(2)] == [True, False]
    now[0] += 10.0  # a long rest refills no more than the burst
    assert [bucket.take() for _ in range(3)] == [True, True, False]


# --- the API without a socket ---------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "raw_path", "prefix", "expected"),
    [
        ("POST", f"/v1/{GEN}", "", Routing("create", GEN)),
        ("GET", f"/v1/{GEN}", "", Routing("list", GEN)),
        ("DELETE", f"/v1/{GEN}", "", Routing("other", GEN)),
        ("GET", f"/v1/{MULTI}/order%2F7", "", Routing("get", MULTI, "order/7")),
        ("GET", f"/v1/{GEN}/a/b", "", Routing("other", GEN)),
        ("GET", f"/v1/{GEN}/", "", Routing("other", GEN)),
        ("GET", "/v1/videos/text2video", "", Routing("other")),
        ("POST", f"/kling/v1/{GEN}", "/kling", Routing("create", GEN)),
        ("POST", f"/v1/{GEN}", "/kling", Routing("other")),
        (
            "HEAD",
            "/results/t1/0%2Dwatermark.png",
            "",
            Routing("download", None, "t1/0-watermark.png"),
        ),
        ("POST", "/results/t1/0.png", "", Routing("other")),
        ("GET", "/_fake/stats", "", Routing("stats")),
        ("GET", "/_fake/tasks", "", Routing("task_list")),
        ("POST", "/_fake/callbacks/any/thing", "", Routing("callback")),
    ],
)
def test_routing_splits_the_raw_path_before_decoding(
    method: str, raw_path: str, prefix: str, expected: Routing
) -> None:
    assert routing_of(method, raw_path, prefix) == expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-9", (0, 10)),
        ("bytes=90-", (90, 100)),
        ("bytes=5-200", (5, 100)),
        ("BYTES=5-5", (5, 6)),
        ("bytes=-10", (90, 100)),
        ("bytes=-500", (0, 100)),
        ("bytes=-0", (0, 100)),
        ("bytes=9-5", None),
        ("bytes=100-", None),
        ("bytes=-", None),
        ("bytes=0-1,5-6", None),
        ("items=0-1", None),
        ("", None),
    ],
)
def test_byte_ranges(header: str, expected: tuple[int, int] | None) -> None:
    assert byte_range(header, 100) == expected


async def test_the_api_answers_plain_requests_without_a_socket() -> None:
    api = FakeApi.build(ServerOptions(api_key="k", task_duration=None, concurrency_limit=2))
    api.book.open("http://fake.invalid", [])

    def send(method: str, raw_path: str, body: Any = None, token: str = "k") -> Reply | None:
        headers = {"Authorization": f"Bearer {token}"}
        request = Request(
            method=method, raw_path=raw_path, path=raw_path, headers=headers, body=body
        )
        return api.answer(api.receive(api.route(method, raw_path), request))

    created = send("POST", f"/v1/{GEN}", gen_body(n=2, external_task_id="plain"))
    assert created is not None
    assert (created.status, created.code) == (200, 0)
    task_id = json.loads(created.body)["data"]["task_id"]
    got = send("GET", f"/v1/{GEN}/plain")
    assert got is not None
    assert json.loads(got.body)["data"]["task_id"] == task_id
    over = send("POST", f"/v1/{GEN}", gen_body())
    assert over is not None
    assert (over.status, over.code) == (429, 1303)
    refused = send("GET", f"/v1/{GEN}", token="wrong")
    assert refused is not None
    assert (refused.status, refused.code) == (401, 1002)
    api.faults.active.append(Fault(kind="drop_after", route="get"))
    assert send("GET", f"/v1/{GEN}/plain") is None
    assert [(r.route, r.code, r.fault) for r in api.requests] == [
        ("create", 0, None),
        ("get", 0, None),
        ("create", 1303, None),
        ("list", 1002, None),
        ("get", None, "drop_after"),
    ]
    assert api.stats()["requests"] == {
        "create": 2,
        "get": 2,
        "list": 1,
        "download": 0,
        "callback": 0,
        "other": 0,
    }
    await api.book.close()
