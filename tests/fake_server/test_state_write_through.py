"""FakeKlingServer(state_file=...) writes through: a server killed with SIGKILL
right after it answered a create still knows the task when started again on the
same file (the CLI's offline simulation resumes "whatever stopped it")."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

from kling_async import Client, TaskStatus
from kling_async.testing import FakeKlingServer
from tests.helpers import (
    API_KEY,
    FAST_POLL,
    FAST_RETRY,
    eventually,
    fake_server_process,
    make_client,
)


def client_for(url: str) -> Client:
    return Client(API_KEY, base_url=url, polling=FAST_POLL, retry=FAST_RETRY)


def kill(process: object) -> None:
    popen = process.process  # type: ignore[attr-defined]
    popen.send_signal(signal.SIGKILL)
    popen.wait(timeout=10)


async def test_a_create_answered_before_a_sigkill_is_known_after_it(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    with fake_server_process("--task-duration", "none", "--state-file", str(state)) as first:
        async with client_for(first.url) as client:
            handle = await client.images.generate(prompt="made just before the kill")
        kill(first)  # at once: no clean stop, no save at exit
    with fake_server_process("--task-duration", "none", "--state-file", str(state)) as second:
        async with client_for(second.url) as client:
            task = await client.images.get(handle.task_id)
        assert task.status in (TaskStatus.SUBMITTED, TaskStatus.PROCESSING)
        assert [t["task_id"] for t in second.tasks()] == [handle.task_id]


async def test_a_task_that_ended_before_a_sigkill_is_known_as_ended(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    with fake_server_process("--task-duration", "0.05", "--state-file", str(state)) as first:
        async with client_for(first.url) as client:
            task = await (await client.images.generate(prompt="ends, then the kill"))
        assert task.status is TaskStatus.SUCCEED
        kill(first)
    with fake_server_process("--task-duration", "30", "--state-file", str(state)) as second:
        async with client_for(second.url) as client:
            again = await client.images.get(task.task_id)
        # Ended as it was, not running again (its 30 s would not be up yet).
        assert again.status is TaskStatus.SUCCEED


async def test_a_change_no_answer_follows_is_written_within_moments(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    async with FakeKlingServer(
        api_key=API_KEY, task_duration=0.05, processing_delay=0.01, state_file=state
    ) as server:
        async with make_client(server) as client:
            handle = await client.images.generate(prompt="p")

        # Nobody asks any more: the task's timer ends it, and the file follows.
        def saved_statuses() -> list[str]:
            saved = json.loads(state.read_text(encoding="utf-8"))["tasks"]
            return [t["status"] for t in saved if t["task_id"] == handle.task_id]

        await eventually(lambda: saved_statuses() == ["succeed"])


async def test_writes_replace_the_file_whole(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.05, state_file=state) as server:
        async with make_client(server) as client:
            await asyncio.gather(*(client.images.generate(prompt=f"p{i}") for i in range(20)))
            assert len(json.loads(state.read_text(encoding="utf-8"))["tasks"]) == 20
    assert [path.name for path in tmp_path.iterdir()] == ["state.json"]  # no temp file left
    assert os.stat(state).st_size > 0
