"""FakeKlingServer(state_file=...): tasks outlive the server that made them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kling_async import Endpoint, TaskStatus
from kling_async.testing import FakeKlingServer
from tests.helpers import API_KEY, assert_valid_png, eventually, make_client
from tests.imagedata import png


async def test_a_later_server_knows_the_tasks_of_an_earlier_one(tmp_path: Path) -> None:
    state = tmp_path / "cache" / "state.json"
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.05, state_file=state) as first:
        async with make_client(first) as client:
            done = await (await client.images.generate(prompt="p", n=2, watermark=True))
            failed = await client.images.generate(prompt="[fail] p", external_task_id="mine-1")
            await eventually(lambda: first.tasks[failed.task_id].status == "failed")
            multi = await (
                await client.images.multi_image(subject_images=[png(400, 400)], prompt="m")
            )
    saved = state.read_text(encoding="utf-8")
    assert "iVBOR" not in saved  # the subject image is not kept

    async with FakeKlingServer(api_key=API_KEY, state_file=state) as second:
        assert second.origin != first.origin
        async with make_client(second) as client:
            again = await client.images.get(done.task_id)
            assert again.status is TaskStatus.SUCCEED
            assert [image.url.startswith(second.origin) for image in again.images] == [True] * 2
            paths = await client.download(again, tmp_path / "out", watermarked=True)
            for path in paths:
                assert_valid_png(path)
            by_external = await client.images.get("mine-1")
            assert by_external.task_id == failed.task_id
            assert by_external.status_message == "Content review failed (simulated)"
            listed = [task.task_id async for task in client.images.list()]
            assert listed == [failed.task_id, done.task_id]  # newest first
            [other] = [t async for t in client.images.list(endpoint=Endpoint.MULTI_IMAGE)]
            assert other.task_id == multi.task_id
            new = await client.images.generate(prompt="q")
    async with FakeKlingServer(api_key=API_KEY, state_file=state) as third:
        assert new.task_id in third.tasks
        assert len(third.tasks) == 4


async def test_a_task_still_running_resumes_where_it_was(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    async with FakeKlingServer(api_key=API_KEY, task_duration=None, state_file=state) as first:
        async with make_client(first) as client:
            handle = await client.images.generate(prompt="p", n=3)
    async with FakeKlingServer(
        api_key=API_KEY, task_duration=0.2, concurrency_limit=4, state_file=state
    ) as second:
        assert second.units_in_use == 3  # it holds its quota units again
        async with make_client(second) as client:
            task = await client.images.attach(handle.task_id)
        assert task.status is TaskStatus.SUCCEED
        assert second.units_in_use == 0


async def test_servers_saving_one_file_keep_each_other_s_tasks(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    one = FakeKlingServer(api_key=API_KEY, task_duration=0.01, state_file=state)
    two = FakeKlingServer(api_key=API_KEY, task_duration=0.01, state_file=state)
    async with one, two:
        async with make_client(one) as a, make_client(two) as b:
            ids = {(await a.images.generate(prompt="a")).task_id}
            ids.add((await b.images.generate(prompt="b")).task_id)
    async with FakeKlingServer(api_key=API_KEY, state_file=state) as later:
        assert set(later.tasks) == ids


@pytest.mark.parametrize(
    "content", ["not json", "[]", json.dumps({"format": "other", "tasks": []}), "\xff"]
)
async def test_an_unreadable_state_file_starts_empty_and_is_replaced(
    tmp_path: Path, content: str
) -> None:
    state = tmp_path / "state.json"
    state.write_text(content, encoding="latin-1")
    async with FakeKlingServer(api_key=API_KEY, state_file=state) as server:
        assert server.tasks == {}
        async with make_client(server) as client:
            await client.images.generate(prompt="p")
    assert json.loads(state.read_text(encoding="utf-8"))["tasks"][0]["status"] in (
        "submitted",
        "processing",
        "succeed",
    )
