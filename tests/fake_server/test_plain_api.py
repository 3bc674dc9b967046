"""The fake's API over plain data, with no socket: routing and handlers."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kling_async.testing import Fault
from kling_async.testing._handlers import FakeApi, Routing, routing_of
from kling_async.testing._http import Reply, Request
from kling_async.testing._options import ServerOptions

from .helpers import GEN, MULTI, gen_body


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
