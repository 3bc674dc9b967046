"""What the server keeps and tells: recorded requests, /_fake/ routes, stats, scale,
shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from kling_async.testing import FakeKlingServer
from tests.helpers import eventually

from .helpers import AUTH, GEN, MULTI, Api, Receiver, gen_body


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
