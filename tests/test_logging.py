"""The kling_async logger: KLING_LOG turns it on; debug lines carry request_id
and timings; downloads are logged; secrets never are."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import API_KEY

SCRIPT = """
import asyncio, logging, sys
if sys.argv[2] == "app-configured":
    logging.basicConfig(format="APP %(levelname)s %(message)s")
import kling_async
from kling_async.testing import FakeKlingServer

async def main():
    async with FakeKlingServer(api_key=sys.argv[3], task_duration=0.05) as server:
        polling = kling_async.PollPolicy(initial_delay=0.02)
        async with kling_async.Client(sys.argv[3], base_url=server.url, polling=polling) as client:
            task = await (await client.images.generate(prompt="p"))
            await client.download(task, sys.argv[1])
            try:
                await client.images.get("no-such-task")
            except kling_async.NotFoundError:
                pass

asyncio.run(main())
"""


def run(tmp_path: Path, level: str | None, mode: str = "plain") -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KLING_")}
    if level is not None:
        env["KLING_LOG"] = level
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), mode, API_KEY],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    return done.stderr


def test_kling_log_debug_shows_each_exchange_with_request_id_and_time(tmp_path: Path) -> None:
    log = run(tmp_path, "debug")
    assert re.search(
        r"DEBUG kling_async: POST /v1/images/generations -> HTTP 200, request_id [\w-]+ "
        r"in \d+\.\d{3}s",
        log,
    ), log
    assert re.search(
        r"GET /v1/images/generations/no-such-task -> HTTP 404, code 1203, request_id [\w-]+ in",
        log,
    ), log
    assert re.search(r"download: saved \S+_0\.png \(\d+ bytes in \d+\.\d{3}s\)", log), log
    assert API_KEY not in log


def test_without_kling_log_the_library_is_silent(tmp_path: Path) -> None:
    assert run(tmp_path, None) == ""
    assert "is ignored: use one of debug, info" in run(tmp_path, "loud")


def test_kling_log_uses_the_application_s_logging_when_configured(tmp_path: Path) -> None:
    log = run(tmp_path, "DEBUG", "app-configured")
    assert "APP DEBUG POST /v1/images/generations -> HTTP 200" in log
    assert "kling_async:" not in log  # no second handler of the library's own


OTHER_LIBRARY = """
import logging, sys
other = logging.getLogger("worker")  # as arq does: a handler of its own, propagating
other.addHandler(logging.StreamHandler())
other.setLevel(logging.INFO)
import kling_async
logging.getLogger("kling_async").info("library line")
other.info("worker line")
if sys.argv[1] == "configure-later":
    logging.basicConfig(format="APP %(message)s")
    logging.getLogger("kling_async").info("after basicConfig")
"""


def test_kling_log_configures_only_the_library_s_logger() -> None:
    """``KLING_LOG`` must not install a root handler: another library's records
    (arq's, with their own handler) would print twice; and when the application
    configures logging later, the library's lines still print once."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KLING_")}
    env["KLING_LOG"] = "info"
    for mode in ("plain", "configure-later"):
        done = subprocess.run(
            [sys.executable, "-c", OTHER_LIBRARY, mode],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=True,
        )
        log = done.stderr
        assert log.count("worker line") == 1, log
        assert log.count("library line") == 1, log
        assert re.search(r"INFO kling_async: library line", log), log
        if mode == "configure-later":
            assert log.count("after basicConfig") == 1, log
            assert "APP after basicConfig" in log, log
