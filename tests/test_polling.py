"""The shared poller over loopback: no unexpected error ever strands a task."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

import kling_async
from kling_async import TaskStatus
from kling_async.testing import FakeKlingServer
from tests.conftest import API_KEY, make_client


class FlakyCredentials:
    """A credentials provider (the ``Credentials`` protocol) that raises on demand:
    a token service hiccup, the kind of error no poll expects."""

    def __init__(self, secret: str = API_KEY) -> None:
        self.secret = secret
        self.failures = 0  # how many of the next calls raise (-1: all of them)

    def authorization(self) -> str:
        if self.failures:
            self.failures -= 1
            raise OSError(f"token service said no to {self.secret}")
        return f"Bearer {API_KEY}"

    def resign(self) -> bool:
        return False


async def eventually(condition: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not callable(condition) or not condition():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.01)


# --- review defect r06: an unexpected error in a sweep strands no task --------------------


async def test_an_unexpected_error_in_a_list_sweep_hands_its_tasks_to_single_gets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    credentials = FlakyCredentials()
    async with FakeKlingServer(
        api_key=API_KEY, task_duration=None, processing_delay=0.01
    ) as server:
        async with make_client(server, api_key=None, credentials=credentials) as client:
            handles = [await client.images.generate(prompt=f"p{i}") for i in range(25)]
            credentials.failures = 1  # the next request, the sweep of all 25, fails once
            with caplog.at_level(logging.ERROR, logger="kling_async"):
                waits = [asyncio.ensure_future(h.wait(timeout=3)) for h in handles]
                await eventually(lambda: len(server.requests_for("get")) >= 25)
            for handle in handles:
                server.finish(handle.task_id)  # every task is done on Kling
            tasks = await asyncio.gather(*waits)
    assert {task.status for task in tasks} == {TaskStatus.SUCCEED}
    assert any("unexpected error in a list sweep" in r.getMessage() for r in caplog.records)
    # The failed sweep's tasks were asked for one by one, each once.
    got = [r.path.rsplit("/", 1)[-1] for r in server.requests_for("get")]
    assert sorted(got[:25]) == sorted(handle.task_id for handle in handles)


async def test_an_unexpected_error_that_persists_ends_the_waits_chained_and_without_secrets() -> (
    None
):
    credentials = FlakyCredentials(secret="sk-do-not-log-me")
    async with FakeKlingServer(api_key=API_KEY, task_duration=None) as server:
        async with make_client(server, api_key=None, credentials=credentials) as client:
            handles = [await client.images.generate(prompt=f"p{i}") for i in range(25)]
            credentials.failures = -1  # from now on every request fails
            results = await asyncio.gather(
                *(h.wait(timeout=5) for h in handles), return_exceptions=True
            )
    for result in results:
        assert type(result) is kling_async.KlingError  # not a timeout: the wait ended
        assert isinstance(result.__cause__, OSError)
        assert "sk-do-not-log-me" not in str(result)
        assert "OSError" in str(result)
