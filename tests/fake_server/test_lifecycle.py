"""Tasks move through their life on timers, or end when a test says."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from kling_async.testing import FakeTask
from tests.helpers import eventually

from .helpers import GEN, MULTI, Api


async def test_lifecycle_runs_on_timers(serve: Callable[..., Awaitable[Api]]) -> None:
    # A processing phase of about a second: a loaded machine (CI) once let the
    # first poll come after a phase of 0.1 s had ended.
    api = await serve(processing_delay=0.05, task_duration=1.0)
    started = time.monotonic()
    task_id = await api.task_id(n=3, watermark_info={"enabled": True})
    seen: list[str] = []
    while not seen or seen[-1] not in ("succeed", "failed"):
        _, payload, _ = await api.get(GEN, task_id)
        if not seen or seen[-1] != payload["data"]["task_status"]:
            seen.append(payload["data"]["task_status"])
        assert time.monotonic() - started < 10
        await asyncio.sleep(0.01)
    assert time.monotonic() - started >= 1.0
    assert seen[-2:] == ["processing", "succeed"]
    data = payload["data"]
    assert data["task_status_msg"] == ""
    assert data["final_unit_deduction"] == "24"  # kling-v3: 8 units an image, 3 images
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
