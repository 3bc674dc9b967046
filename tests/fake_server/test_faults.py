"""Injected faults: errors, ambiguous errors, dropped connections, delays, garbage."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from .helpers import GEN, MULTI, Api, assert_envelope, gen_body, multi_body


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
    # Created: still submitted, or already processing on a slow machine.
    assert status == 200
    assert payload["data"]["task_status"] in ("submitted", "processing")
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
    api.server.inject("delay", route="list", delay=0.5)
    started = time.monotonic()
    status, _, _ = await api.list(GEN)
    assert status == 200
    assert time.monotonic() - started >= 0.5
    started = time.monotonic()
    await api.list(GEN)
    assert time.monotonic() - started < 0.5  # once: a loopback answer, however loaded


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


async def test_garbage_after_creates_the_task_and_answers_an_unreadable_200(api: Api) -> None:
    fault = api.server.inject("garbage_after", route="create")
    url = api.server.url + f"/v1/{GEN}"
    body = gen_body(external_task_id="cut-short")
    async with api.session.post(url, json=body, headers={"Authorization": "Bearer t"}) as response:
        assert response.status == 200
        raw = await response.read()
    with pytest.raises(json.JSONDecodeError):
        json.loads(raw)
    assert raw.startswith(b'{"code":0')  # the real answer, cut in half
    assert api.server.task("cut-short").external_task_id == "cut-short"
    record = api.server.requests_for("create")[0]
    assert (record.http_status, record.code, record.fault) == (200, None, "garbage_after")
    assert fault.exhausted
    # Its own body and status, when given; a refused create is not acted on twice.
    api.server.inject("garbage_after", route="create", body="<html>", http_status=502)
    async with api.session.post(url, json=gen_body(), headers={"Authorization": "Bearer t"}) as r:
        assert (r.status, await r.read()) == (502, b"<html>")
    assert len(api.server.tasks) == 2


async def test_exists_creates_the_task_and_answers_1201_already_exists(api: Api) -> None:
    api.server.inject("exists", route="create")
    status, first, _ = await api.create(GEN, gen_body(external_task_id="raced"))
    assert (status, first["code"]) == (400, 1201)
    assert first["message"].endswith("external_task_id already exists")
    assert_envelope(first, 1201)
    status, payload, _ = await api.get(GEN, "raced")
    assert (status, payload["data"]["task_info"]["external_task_id"]) == (200, "raced")
    # Once used up, a create is served normally; a real duplicate gets the same answer.
    assert (await api.create(GEN, gen_body(external_task_id="fresh")))[0] == 200
    again, duplicate, _ = await api.create(GEN, gen_body(external_task_id="fresh"))
    assert (again, duplicate["code"], duplicate["message"]) == (400, 1201, first["message"])
    assert len(api.server.tasks) == 2
