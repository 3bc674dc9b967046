"""Creating tasks and getting them by task_id or external_task_id."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from .helpers import AUTH, GEN, MULTI, Api, assert_envelope, gen_body, multi_body


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


async def test_external_id_with_reserved_characters(api: Api) -> None:
    task_id = await api.task_id(external_task_id="order/7 é?")
    async with api.session.get(
        f"{api.server.url}/v1/{GEN}/order%2F7%20%C3%A9%3F", headers=AUTH
    ) as response:
        payload = await response.json()
    assert payload["data"]["task_id"] == task_id
