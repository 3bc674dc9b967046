"""``kling-async mcp``, driven as an agent's MCP client drives it: the official ``mcp``
client library talks to the server in a real subprocess, over stdio (and once over
streamable HTTP on loopback), and the server talks to a FakeKlingServer on loopback
(one in this test's event loop, given with --base-url, or the embedded offline one)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import attrs
import jsonschema  # type: ignore[import-untyped]
import pytest
from mcp import Client, MCPError, StdioServerParameters
from mcp.types import CallToolResult

from kling_async import Client as KlingClient
from kling_async import (
    ImageGenerationRequest,
    MultiImageRequest,
    Task,
    TaskHandle,
    TaskStatus,
    _mcp,
)
from kling_async._endpoints import EndpointDeclaration, by_mcp_name, declarations
from kling_async._models import ASPECT_RATIOS, MAX_PROMPT_LENGTH, MAX_SUBJECT_IMAGES
from kling_async.testing import FakeKlingServer
from tests.helpers import API_KEY, assert_valid_png, clean_env
from tests.imagedata import png
from tests.test_cli_endpoints import EXAMPLES, with_image

#: A create tool per declared endpoint, and the tools about tasks and costs.
TOOLS = {d.mcp_name for d in declarations()} | {
    "get_task",
    "list_tasks",
    "download_task",
    "estimate",
}
#: Long enough for a progress tick (one a second) to happen before the task ends.
SLOW_MARKER = "[slow]"


def _duration(task: Any) -> float:
    return 2.5 if SLOW_MARKER in (task.prompt or "") else 0.2


@contextlib.asynccontextmanager
async def fake_kling(**options: Any) -> AsyncIterator[FakeKlingServer]:
    """A FakeKlingServer in this test's loop: the MCP server process reaches it
    over loopback, and the test reads what it received and injects faults."""
    settings: dict[str, Any] = {
        "api_key": API_KEY,
        "task_duration": _duration,
        "processing_delay": 0.05,
    }
    settings.update(options)
    async with FakeKlingServer(**settings) as server:
        yield server


@contextlib.asynccontextmanager
async def mcp_server(
    *args: str, env: dict[str, str] | None = None, mode: str = "auto"
) -> AsyncIterator[Client]:
    """``kling-async [ARGS] mcp`` as a subprocess, with an MCP client session on it.

    Entered and left inside the test's own task: the client's anyio task groups
    must be exited by the task that entered them.
    """
    parameters = StdioServerParameters(
        command=sys.executable,
        args=["-m", "kling_async", *args],
        env=env if env is not None else clean_env(),
    )
    async with Client(parameters, mode=mode, read_timeout_seconds=60) as client:
        yield client


def online(server: FakeKlingServer, *mcp_args: str) -> tuple[list[str], dict[str, str]]:
    """Arguments and environment of an MCP server for ``server``, keyed as an agent
    setup would give it (the key in the environment, never on the command line)."""
    return ["--base-url", server.url, "mcp", *mcp_args], clean_env(KLING_API_KEY=API_KEY)


def text_of(result: CallToolResult) -> str:
    return "\n".join(getattr(block, "text", "") for block in result.content)


def data_of(result: CallToolResult) -> dict[str, Any]:
    """The structured result, checked against the JSON the text content carries."""
    data = result.structured_content
    assert isinstance(data, dict)
    text = text_of(result)
    assert json.loads(text[text.index("{") :]) == data
    return data


# --- tools and schemas ----------------------------------------------------------------


async def test_tools_are_listed_with_schemas_generated_from_the_request_models() -> None:
    async with fake_kling() as kling:
        args, env = online(kling)
        async with mcp_server(*args, env=env) as session:
            listed = {tool.name: tool for tool in (await session.list_tools()).tools}
    assert set(listed) == TOOLS
    for cls, name in (
        (ImageGenerationRequest, "generate_image"),
        (MultiImageRequest, "multi_image"),
    ):
        schema = listed[name].input_schema
        offered = {field.name for field in attrs.fields(cls)} - {"callback_url"}
        assert set(schema["properties"]) == offered | {"timeout", "confirm"}
        assert schema["properties"]["confirm"]["default"] is False
        assert schema["additionalProperties"] is False
        required = [field.name for field in attrs.fields(cls) if field.default is attrs.NOTHING]
        assert schema["required"] == required
        properties = schema["properties"]
        assert properties["n"] == {**properties["n"], "type": "integer", "minimum": 1, "maximum": 9}
        assert properties["aspect_ratio"]["enum"] == list(ASPECT_RATIOS)
        assert properties["aspect_ratio"]["default"] == "16:9"
        assert properties["model_name"]["default"] == attrs.fields_dict(cls)["model_name"].default
        assert properties["timeout"]["default"] == 50
        assert all(prop.get("description") for prop in properties.values())
        annotations = listed[name].annotations
        assert annotations is not None
        assert annotations.read_only_hint is False
    generate = listed["generate_image"].input_schema["properties"]
    assert generate["prompt"]["maxLength"] == MAX_PROMPT_LENGTH
    assert generate["prompt"]["minLength"] == 1
    assert generate["resolution"]["enum"] == ["1k", "2k"]
    assert generate["image_reference"]["enum"] == ["subject", "face"]
    assert generate["image_fidelity"]["maximum"] == 1
    assert generate["element_ids"]["items"]["type"] == "integer"
    assert "10 MB" in generate["image"]["description"]
    subjects = listed["multi_image"].input_schema["properties"]["subject_images"]
    assert subjects["type"] == "array"
    assert subjects["minItems"] == 1
    assert subjects["maxItems"] == MAX_SUBJECT_IMAGES
    assert listed["get_task"].input_schema["required"] == ["task_id"]
    assert listed["get_task"].annotations is not None
    assert listed["get_task"].annotations.read_only_hint is True
    assert listed["list_tasks"].input_schema["properties"]["limit"]["maximum"] == 100


# --- creates ---------------------------------------------------------------------------


async def test_a_generate_that_succeeds_returns_urls_and_saved_paths(tmp_path: Path) -> None:
    async with fake_kling() as kling:
        args, env = online(kling, "--out", str(tmp_path))
        async with mcp_server(*args, env=env) as session:
            result = await session.call_tool(
                "generate_image", {"prompt": "a lighthouse", "n": 2, "aspect_ratio": "1:1"}
            )
        assert len(kling.requests_for("create")) == 1
        sent = kling.requests_for("create")[0].json
    assert result.is_error is False, text_of(result)
    data = data_of(result)
    assert data["kind"] == "generate_image"
    assert data["status"] == "succeed"
    assert "offline_simulation" not in data
    assert [image["index"] for image in data["images"]] == [0, 1]
    assert all(image["url"].startswith(kling.origin) for image in data["images"])
    assert sent["prompt"] == "a lighthouse"
    assert sent["n"] == 2
    assert sent["aspect_ratio"] == "1:1"
    assert sent["external_task_id"] == data["external_task_id"]
    paths = [Path(path) for path in data["paths"]]
    assert paths == [tmp_path.resolve() / f"{data['task_id']}_{i}.png" for i in (0, 1)]
    for path in paths:
        assert_valid_png(path)


async def test_a_generate_whose_task_fails_is_a_tool_error_with_kling_s_reason() -> None:
    async with fake_kling() as kling:
        args, env = online(kling)
        async with mcp_server(*args, env=env) as session:
            result = await session.call_tool("generate_image", {"prompt": "a fox [fail]"})
    assert result.is_error is True
    assert text_of(result).startswith("error: task ")
    error = data_of(result)["error"]
    assert error["type"] == "TaskFailedError"
    assert error["task"]["status"] == "failed"
    assert error["task"]["status_message"] == "Content review failed (simulated)"
    assert "Content review failed (simulated)" in error["message"]


async def test_a_validation_error_names_the_field_and_sends_nothing() -> None:
    async with fake_kling() as kling:
        args, env = online(kling)
        async with mcp_server(*args, env=env) as session:
            too_many = await session.call_tool("generate_image", {"prompt": "p", "n": 12})
            both = await session.call_tool(
                "generate_image",
                {
                    "prompt": "p",
                    "negative_prompt": "blur",
                    "image": base64.b64encode(png(400, 400)).decode(),
                },
            )
            misspelt = await session.call_tool("generate_image", {"promt": "p"})
            no_subjects = await session.call_tool("multi_image", {"prompt": "p"})
            bad_wait = await session.call_tool("get_task", {"task_id": "t", "timeout": -1})
            # A tool that does not exist is the client's mistake: a protocol error.
            with pytest.raises(MCPError, match="unknown tool 'make_video'"):
                await session.call_tool("make_video", {"prompt": "p"})
        assert kling.requests_for("create") == []
    expected = [
        (too_many, "n", "invalid n: must be between 1 and 9; got 12; nothing was sent to Kling"),
        (both, "negative_prompt", "invalid negative_prompt: is not supported together with image"),
        (misspelt, "promt", "invalid promt: is not an argument of generate_image"),
        (no_subjects, "subject_images", "invalid subject_images: is required"),
        (bad_wait, "timeout", "invalid timeout: must be a number of seconds from 0 to 1800"),
    ]
    for result, field, message in expected:
        assert result.is_error is True
        error = data_of(result)["error"]
        assert error["type"] == "ValidationError"
        assert error["field"] == field
        assert error["message"].startswith(message)
        assert text_of(result).startswith(f"error: {message}")


async def test_a_create_that_outlasts_its_timeout_returns_the_task_id_and_get_task_picks_it_up(
    tmp_path: Path,
) -> None:
    async with fake_kling() as kling:
        args, env = online(kling, "--out", str(tmp_path))
        async with mcp_server(*args, env=env) as session:
            started = await session.call_tool(
                "generate_image", {"prompt": f"a slow fox {SLOW_MARKER}", "timeout": 0.3}
            )
            assert started.is_error is False, text_of(started)
            running = data_of(started)
            assert running["status"] in ("submitted", "processing")
            assert running["images"] == []
            assert "paths" not in running
            assert running["task_id"] in running["next_step"]
            assert "get_task" in running["next_step"]

            notes: list[tuple[float, float | None, str | None]] = []

            async def note(progress: float, total: float | None, message: str | None) -> None:
                notes.append((progress, total, message))

            # No kind given: the server remembers the task is a generate_image one.
            picked_up = await session.call_tool(
                "get_task",
                {"task_id": running["task_id"], "timeout": 30},
                progress_callback=note,
            )
        assert len(kling.requests_for("create")) == 1
    assert picked_up.is_error is False, text_of(picked_up)
    done = data_of(picked_up)
    assert done["task_id"] == running["task_id"]
    assert done["status"] == "succeed"
    assert len(done["images"]) == 1
    assert_valid_png(Path(done["paths"][0]))
    assert notes, "get_task waited without a progress notification"
    assert all(running["task_id"] in (message or "") for _, _, message in notes)


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_a_waiting_create_sends_progress_notifications(mode: str) -> None:
    async with fake_kling() as kling:
        args, env = online(kling)
        async with mcp_server(*args, env=env, mode=mode) as session:
            notes: list[tuple[float, float | None, str | None]] = []

            async def note(progress: float, total: float | None, message: str | None) -> None:
                notes.append((progress, total, message))

            result = await session.call_tool(
                "generate_image",
                {"prompt": f"a heron {SLOW_MARKER}", "timeout": 20},
                progress_callback=note,
            )
    assert result.is_error is False, text_of(result)
    task_id = data_of(result)["task_id"]
    assert len(notes) >= 2, notes
    assert notes[0] == (0.0, 20.0, f"task {task_id} created on Kling")
    values = [value for value, _, _ in notes]
    assert values == sorted(set(values)), "progress must increase with every notification"
    for value, total, message in notes[1:]:
        assert total == 20.0
        assert 0 < value <= 20
        assert re.fullmatch(rf"task {task_id}: (submitted|processing) \(\d+s\)", message or "")


async def test_a_lost_create_answer_is_looked_up_not_created_twice() -> None:
    async with fake_kling() as kling:
        kling.inject("drop_after", route="create")  # the task is made, its answer lost
        args, env = online(kling)
        async with mcp_server(*args, env=env) as session:
            result = await session.call_tool("generate_image", {"prompt": "once"})
        assert len(kling.tasks) == 1
        (task_id,) = kling.tasks
    assert result.is_error is False, text_of(result)
    assert data_of(result)["task_id"] == task_id
    assert data_of(result)["status"] == "succeed"


async def test_a_create_that_may_have_landed_says_to_look_it_up_by_its_external_id() -> None:
    async with fake_kling() as kling:
        kling.inject("drop_after", route="create", times=None)  # created, never answered
        kling.inject("drop", route="get", times=None)  # and the lookups fail too
        kling.inject("drop", route="list", times=None)
        args, env = online(kling)
        async with mcp_server(*args, env=env) as session:
            result = await session.call_tool("generate_image", {"prompt": "p"})
        assert len(kling.tasks) == 1  # retried under one external_task_id: one task
        (task,) = kling.tasks.values()
    assert result.is_error is True
    error = data_of(result)["error"]
    assert error["type"] == "TransportError"
    assert error["external_task_id"] == task.external_task_id
    assert "may exist" in error["create_outcome"]
    assert f"get_task with task_id {task.external_task_id!r}" in error["next_step"]


async def test_parallel_calls_share_the_account_s_quota() -> None:
    # Agents call tools in parallel; with --concurrency the creates queue for units
    # instead of meeting 1303 (the fake enforces the same quota).
    async with fake_kling(concurrency_limit=2) as kling:
        args, env = online(kling, "--concurrency", "2")
        async with mcp_server(*args, env=env) as session:
            results = await asyncio.gather(
                *(
                    session.call_tool("generate_image", {"prompt": f"fox {i} {SLOW_MARKER}"})
                    for i in range(3)
                )
            )
        assert kling.stats()["creates_rejected_concurrency"] == 0
        assert kling.peak_units == 2
    assert [data_of(result)["status"] for result in results] == ["succeed"] * 3


async def test_multi_image_takes_paths_base64_and_urls(tmp_path: Path) -> None:
    subject = tmp_path / "subject.png"
    subject.write_bytes(png(400, 300))
    encoded = base64.b64encode(png(300, 300)).decode()
    async with fake_kling() as kling:
        url = f"{kling.origin}/subject.jpg"
        args, env = online(kling)
        async with mcp_server(*args, env=env) as session:
            result = await session.call_tool(
                "multi_image",
                {
                    "subject_images": [str(subject), encoded, url],
                    "style_image": f"data:image/png;base64,{encoded}",
                    "prompt": "a family portrait",
                    "n": 2.0,  # JSON has one number type: a whole float is the integer
                },
            )
            found = await session.call_tool("get_task", {"task_id": data_of(result)["task_id"]})
        (create,) = kling.requests_for("create")
    assert result.is_error is False, text_of(result)
    data = data_of(result)
    assert data["kind"] == "multi_image"
    assert len(data["images"]) == 2
    subjects = [entry["subject_image"] for entry in create.json["subject_image_list"]]
    assert subjects == [base64.b64encode(subject.read_bytes()).decode(), encoded, url]
    assert create.json["style_image"] == encoded
    assert create.json["n"] == 2
    # get_task with no kind finds a multi-image task too.
    assert data_of(found)["kind"] == "multi_image"
    assert data_of(found)["status"] == "succeed"


# --- get, list, download ---------------------------------------------------------------


async def test_get_list_and_download(tmp_path: Path) -> None:
    async with fake_kling() as kling:
        args, env = online(kling, "--out", str(tmp_path))
        async with mcp_server(*args, env=env) as session:
            first = data_of(
                await session.call_tool(
                    "generate_image", {"prompt": "first", "watermark": True, "timeout": 0}
                )
            )
            second = data_of(await session.call_tool("generate_image", {"prompt": "second"}))
            listed = await session.call_tool("list_tasks", {"limit": 5})
            only_multi = await session.call_tool("list_tasks", {"kind": "multi_image"})
            by_external = await session.call_tool(
                "get_task",
                {"task_id": first["external_task_id"], "kind": "generate_image", "timeout": 30},
            )
            watermarked = await session.call_tool(
                "download_task", {"task_id": first["task_id"], "watermarked": True}
            )
            unknown = await session.call_tool("get_task", {"task_id": "no-such-task"})
            running = data_of(
                await session.call_tool(
                    "generate_image", {"prompt": f"x {SLOW_MARKER}", "timeout": 0}
                )
            )
            too_early = await session.call_tool("download_task", {"task_id": running["task_id"]})
    assert [task["task_id"] for task in data_of(listed)["tasks"]] == [
        second["task_id"],
        first["task_id"],
    ]
    assert data_of(only_multi)["tasks"] == []
    fetched = data_of(by_external)
    assert fetched["task_id"] == first["task_id"]
    assert fetched["status"] == "succeed"
    # Kling made watermarked copies (watermark: true), so they are saved beside the images.
    assert [Path(path).name for path in fetched["paths"]] == [
        f"{first['task_id']}_0.png",
        f"{first['task_id']}_0_watermarked.png",
    ]
    assert watermarked.is_error is False, text_of(watermarked)
    assert [Path(path).name for path in data_of(watermarked)["paths"]] == [
        f"{first['task_id']}_0_watermarked.png"
    ]
    assert unknown.is_error is True
    error = data_of(unknown)["error"]
    assert error["type"] == "NotFoundError"
    assert error["code"] == 1203
    assert error["kling_message"] == "task not found: no-such-task"
    assert error["hint"] == "Check the task id, model name and base_url."
    assert too_early.is_error is True
    assert data_of(too_early)["error"] == {
        "type": "ToolError",
        "message": f"task {running['task_id']} is submitted and has no images yet: call "
        "get_task with a timeout to wait for it, then download it",
    }


async def test_download_task_without_an_output_folder_says_how_to_set_one() -> None:
    async with fake_kling() as kling:
        args, env = online(kling)
        async with mcp_server(*args, env=env) as session:
            created = data_of(await session.call_tool("generate_image", {"prompt": "p"}))
            result = await session.call_tool("download_task", {"task_id": created["task_id"]})
    assert "paths" not in created
    assert result.is_error is True
    assert "kling-async mcp --out DIR" in text_of(result)


# --- errors and secrets ----------------------------------------------------------------


async def test_kling_errors_carry_code_message_and_hint_and_never_the_key() -> None:
    secret = "sk-mcp-secret-never-shown-42"
    async with fake_kling() as kling:
        env = clean_env(KLING_API_KEY=secret)  # the fake wants API_KEY: Kling says 1001-ish
        async with mcp_server("--base-url", kling.url, "mcp", env=env) as session:
            result = await session.call_tool("generate_image", {"prompt": "p"})
            listed = await session.call_tool("list_tasks", {})
        assert kling.tasks == {}
    for answer in (result, listed):
        assert answer.is_error is True
        assert secret not in text_of(answer)
        assert secret not in json.dumps(answer.structured_content)
        error = data_of(answer)["error"]
        assert error["type"] == "AuthenticationError"
        assert 1000 <= error["code"] <= 1004
        assert error["http_status"] == 401
        assert error["kling_message"]
        assert error["hint"].startswith("Check KLING_API_KEY")
        assert f"[{error['code']}]" in error["message"]
    # A create's error says what became of it, with the id to look it up by.
    assert "nothing was created" in data_of(result)["error"]["create_outcome"]


# --- offline, HTTP, the missing extra ---------------------------------------------------


async def test_with_no_key_it_runs_offline_and_says_so(tmp_path: Path) -> None:
    args = ["--mock-task-seconds", "0.2", "mcp", "--out", str(tmp_path)]
    async with mcp_server(*args) as session:
        assert "OFFLINE SIMULATION" in (session.instructions or "")
        result = await session.call_tool("generate_image", {"prompt": "offline fox"})
        invalid = await session.call_tool("generate_image", {"prompt": ""})
    assert result.is_error is False, text_of(result)
    data = data_of(result)
    assert data["offline_simulation"] is True
    assert data["notice"].startswith("OFFLINE SIMULATION")
    assert "KLING_API_KEY" in data["notice"]
    assert_valid_png(Path(data["paths"][0]))
    assert data_of(invalid)["offline_simulation"] is True
    # The server closed cleanly when the client closed stdin: the simulation kept
    # its tasks, so the CLI finds the task an agent made.
    status = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "kling_async", "--json", "status", data["task_id"]],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
        check=False,
    )
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["status"] == "succeed"


async def test_streamable_http_on_loopback() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kling_async",
        "--mock-task-seconds",
        "0.2",
        "mcp",
        "--http",
        "0",
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )
    assert process.stderr is not None
    try:
        url = None
        while url is None:
            line = (await asyncio.wait_for(process.stderr.readline(), 30)).decode()
            assert line, "the server exited before serving"
            found = re.search(r"http://127\.0\.0\.1:\d+/mcp", line)
            url = found.group(0) if found else None
        notes: list[float] = []

        async def note(progress: float, total: float | None, message: str | None) -> None:
            notes.append(progress)

        async with Client(url, read_timeout_seconds=60) as session:
            assert {tool.name for tool in (await session.list_tools()).tools} == TOOLS
            result = await session.call_tool(
                "generate_image", {"prompt": "over http"}, progress_callback=note
            )
        assert result.is_error is False, text_of(result)
        assert data_of(result)["status"] == "succeed"
        assert data_of(result)["offline_simulation"] is True
        assert notes[0] == 0.0
    finally:
        process.send_signal(signal.SIGTERM)
        status = await asyncio.wait_for(process.wait(), 30)
        await process.stderr.read()
    assert status == 0  # SIGTERM stops it cleanly, closing the client first


def test_without_the_extra_the_command_says_which_to_install() -> None:
    # sys.modules["mcp"] = None makes "import mcp" fail, as if the SDK were not installed.
    code = (
        "import sys; sys.modules['mcp'] = None; sys.argv = ['kling-async', 'mcp']; "
        "from kling_async.cli import main; main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) <= 2, result.stderr  # one message, maybe wrapped; no traceback
    assert "Traceback" not in result.stderr
    message = " ".join(lines)
    assert "pip install '.[mcp]'" in message
    assert "mcp extra" in message


def test_the_command_refuses_a_port_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "kling_async", "mcp", "--http", str(port)],
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "error:" in result.stderr
    assert "OFFLINE" not in result.stderr  # refused before anything started


class _HandleSeen:
    """A handle whose task the poller has already seen in ``status``, while its
    ``wait()`` wakes only ``delay`` seconds later (the order asyncio runs them in)."""

    task_id = "t-seen"

    def __init__(self, status: TaskStatus, delay: float) -> None:
        self.status = status
        self._delay = delay

    async def wait(self, timeout: float | None = None) -> Task:
        await asyncio.sleep(self._delay)
        return Task(task_id=self.task_id, status=TaskStatus.SUCCEED)


@pytest.mark.parametrize(
    ("status", "notified"), [(TaskStatus.SUCCEED, False), (TaskStatus.PROCESSING, True)]
)
async def test_progress_never_reports_an_end_that_the_result_reports(
    monkeypatch: pytest.MonkeyPatch, status: TaskStatus, notified: bool
) -> None:
    monkeypatch.setattr(_mcp, "PROGRESS_INTERVAL", 0.02)
    notes: list[str | None] = []

    async def note(progress: float, total: float | None = None, message: str | None = None) -> None:
        notes.append(message)

    task = await _mcp._follow(cast(TaskHandle, _HandleSeen(status, delay=0.15)), 5, note)
    assert task is not None
    assert task.status is TaskStatus.SUCCEED
    assert bool(notes) is notified, notes
    assert all(f": {status} (" in (message or "") for message in notes)


# --- a tool per declared endpoint, and estimate ------------------------------------------
# In process: the tools over a Client on a FakeKlingServer (the protocol around them is
# what the subprocess tests above drive).


async def _no_progress(
    progress: float, total: float | None = None, message: str | None = None
) -> None:
    return None


@contextlib.asynccontextmanager
async def kling_tools(out: Path | None) -> AsyncIterator[tuple[_mcp.KlingTools, FakeKlingServer]]:
    async with fake_kling() as kling, KlingClient(API_KEY, base_url=kling.url) as client:
        yield _mcp.KlingTools(client, out=out, default_timeout=30, offline=False), kling


def _schema(tools: _mcp.KlingTools, name: str) -> dict[str, Any]:
    (tool,) = [tool for tool in tools.definitions if tool.name == name]
    return tool.input_schema


@pytest.mark.parametrize("declaration", list(declarations()), ids=lambda d: d.mcp_name)
async def test_each_endpoint_s_tool_takes_its_documented_example_and_runs(
    declaration: EndpointDeclaration, tmp_path: Path
) -> None:
    image = tmp_path / "input.png"
    image.write_bytes(png(600, 600))
    example = EXAMPLES[declaration.mcp_name]
    async with kling_tools(tmp_path / "out") as (tools, kling):
        schema = _schema(tools, declaration.mcp_name)
        jsonschema.validate(example, schema)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**example, "no_such_field": 1}, schema)
        refused = await tools.call(
            declaration.mcp_name, {**example, "no_such_field": 1}, _no_progress
        )
        assert refused.is_error is True
        assert "no_such_field" in text_of(refused)
        assert kling.requests_for("create") == []
        arguments = with_image(declaration, example, image)
        result = await tools.call(declaration.mcp_name, arguments, _no_progress)
        assert len(kling.requests_for("create", endpoint=declaration.endpoint.value)) == 1
    assert result.is_error is False, text_of(result)
    data = data_of(result)
    assert data["kind"] == declaration.mcp_name
    assert data["status"] == "succeed"
    assert len(data["paths"]) >= len(data["images"]) >= 1
    for path in data["paths"]:
        assert_valid_png(Path(path))


def test_schemas_type_series_amount_as_a_number_or_auto() -> None:
    schema = _mcp.request_schema(by_mcp_name("omni_image"))
    amount = schema["properties"]["series_amount"]
    jsonschema.validate(4, amount)
    jsonschema.validate("auto", amount)
    for wrong in (1, 10, "many", 2.5):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, amount)
    images = schema["properties"]["images"]
    assert images["type"] == "array"
    assert images["items"]["type"] == "string"
    assert schema["properties"]["resolution"]["enum"] == ["1k", "2k", "4k"]
    expand = _mcp.request_schema(by_mcp_name("expand_image"))
    assert expand["required"] == [
        "image",
        "up_expansion_ratio",
        "down_expansion_ratio",
        "left_expansion_ratio",
        "right_expansion_ratio",
    ]
    assert expand["properties"]["up_expansion_ratio"]["maximum"] == 2


async def test_estimate_prices_a_call_and_sends_nothing() -> None:
    arguments = {"prompt": "a fox", "n": 3, "timeout": 5}
    async with kling_tools(None) as (tools, kling):
        expected = tools.client.estimate(ImageGenerationRequest(prompt="a fox", n=3))
        priced = await tools.call(
            "estimate", {"tool": "generate_image", "arguments": arguments}, _no_progress
        )
        unknown = await tools.call(
            "estimate",
            {"tool": "omni_image", "arguments": {"prompt": "a fox", "model_name": "no-such"}},
            _no_progress,
        )
        misspelt = await tools.call(
            "estimate", {"tool": "generate_image", "arguments": {"promt": "x"}}, _no_progress
        )
        assert kling.requests_for() == []
    assert priced.is_error is False, text_of(priced)
    data = data_of(priced)
    assert data["estimate"]["units"] == str(expected.units)
    assert data["estimate"]["money"] == str(expected.money)
    assert data["sent"] is False
    assert unknown.is_error is True
    assert "no price" in text_of(unknown)
    assert data_of(unknown)["error"]["type"] == "UnknownPriceError"
    assert misspelt.is_error is True
    assert "promt" in text_of(misspelt)
