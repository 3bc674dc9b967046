"""Callbacks: one per status change, failures recorded, loopback only, faults."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from kling_async.testing import CallbackFaults
from tests.helpers import eventually

from .helpers import GEN, Api, Receiver


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
