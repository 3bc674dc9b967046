"""The examples run as a user would run them, and do what their docstrings say."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from kling_async.testing import FakeKlingServer, FakeTask
from tests.helpers import API_KEY

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SERVICE = EXAMPLES / "aiohttp_service.py"


def load_example(path: Path) -> ModuleType:
    """Import an example by path (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


service = load_example(SERVICE)


def test_service_demo_runs_offline() -> None:
    env = {name: value for name, value in os.environ.items() if not name.startswith("KLING_")}
    result = subprocess.run(
        [sys.executable, str(SERVICE), "--mock", "--demo"],
        env=env,
        cwd=SERVICE.parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["status"] == "succeed"
    assert answer["task_id"]
    assert len(answer["images"]) == 2
    assert all(url.startswith("http://127.0.0.1:") for url in answer["images"])
    assert "offline simulation" in result.stderr.lower()


def _duration(task: FakeTask) -> float:
    return 60.0 if "[slow]" in (task.prompt or "") else 0.2


@pytest.fixture
async def kling() -> AsyncIterator[FakeKlingServer]:
    async with FakeKlingServer(api_key=API_KEY, task_duration=_duration) as fake:
        yield fake


@pytest.fixture
async def service_url(kling: FakeKlingServer) -> AsyncIterator[str]:
    """The example app, built by its factory, served on loopback against ``kling``."""
    sock = service.bind("127.0.0.1", 0)
    callback_url = service.local_callback_url(sock)
    settings = service.ServiceSettings(
        callback_url=callback_url, api_key=API_KEY, base_url=kling.url, wait_timeout=2.0
    )
    runner = web.AppRunner(service.create_app(settings))
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        yield callback_url.removesuffix(service.CALLBACK_PATH)
    finally:
        await runner.cleanup()


async def post(url: str, body: Any) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as response:
        return response.status, await response.json()


async def test_service_answers_from_kling_callbacks(
    kling: FakeKlingServer, service_url: str
) -> None:
    started = time.monotonic()
    status, answer = await post(f"{service_url}/generate", {"prompt": "a red fox", "n": 3})
    assert time.monotonic() - started < 5  # the safety-net poll would come after 30 s
    assert status == 200, answer
    assert answer["status"] == "succeed"
    assert answer["images"] == [image["url"] for image in kling.task(answer["task_id"]).images]
    assert len(answer["images"]) == 3

    # Kling's callbacks reached the service's receiver, and the only GET of the task
    # was the one confirming the terminal callback: no polling answered it.
    deliveries = [r for r in kling.callbacks if r.task_id == answer["task_id"]]
    assert [r.status for r in deliveries] == ["processing", "succeed"]
    assert all(r.delivered for r in deliveries)
    assert all(r.url.startswith(f"{service_url}{service.CALLBACK_PATH}/") for r in deliveries)
    gets = [r for r in kling.requests_for("get") if r.path.endswith(answer["task_id"])]
    assert len(gets) == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "a red fox", "n": 12}, "n"),
        ({"n": 1}, "prompt"),
        ({"prompt": 7}, "prompt"),
        ({"prompt": "a red fox", "n": "2"}, "n"),
        (["not", "an", "object"], None),
    ],
)
async def test_invalid_requests_are_400_naming_the_field(
    kling: FakeKlingServer, service_url: str, body: Any, field: str | None
) -> None:
    status, answer = await post(f"{service_url}/generate", body)
    assert status == 400
    assert answer["field"] == field
    assert answer["error"]
    assert kling.requests_for("create") == []  # nothing reached Kling


async def test_a_failed_task_is_422_with_klings_reason(
    kling: FakeKlingServer, service_url: str
) -> None:
    status, answer = await post(f"{service_url}/generate", {"prompt": "[fail] a red fox"})
    assert status == 422
    assert answer["status"] == "failed"
    assert answer["error"] == "Content review failed (simulated)"
    deliveries = [r for r in kling.callbacks if r.task_id == answer["task_id"]]
    assert [(r.status, r.delivered) for r in deliveries] == [
        ("processing", True),
        ("failed", True),
    ]


async def test_a_kling_error_is_502_with_code_and_request_id(
    kling: FakeKlingServer, service_url: str
) -> None:
    kling.inject("error", route="create", code=1103, message="no access to this model")
    status, answer = await post(f"{service_url}/generate", {"prompt": "a red fox"})
    assert status == 502
    assert answer["code"] == 1103
    assert answer["error"] == "no access to this model"
    assert answer["request_id"]
    assert answer["task_id"] is None


async def test_a_wait_that_runs_out_is_504_with_the_task_id(
    kling: FakeKlingServer, service_url: str
) -> None:
    status, answer = await post(f"{service_url}/generate", {"prompt": "[slow] a red fox"})
    assert status == 504
    assert answer["status"] == "processing"
    assert not kling.task(answer["task_id"]).is_terminal  # still running on Kling
