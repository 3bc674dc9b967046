"""The fake server as its own process: ``python -m kling_async.testing`` serves until
SIGTERM, stops when its parent goes away, and its command line sets what benchmarks
need (tasks of different lengths)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import aiohttp
import pytest

from kling_async.testing.__main__ import _drawn, _parser, _server

from .helpers import AUTH, GEN, gen_body


async def test_module_runs_a_server_process_until_sigterm() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kling_async.testing",
        "--port",
        "0",
        "--task-duration",
        "0.05",
        "--concurrency-limit",
        "4",
        "--rate-limit",
        "1000/1",
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), timeout=30)
        url = json.loads(line)["url"]
        assert url.startswith("http://127.0.0.1:")
        async with aiohttp.ClientSession(headers=AUTH) as session:
            async with session.post(f"{url}/v1/{GEN}", json=gen_body(n=4)) as response:
                assert (await response.json())["code"] == 0
            async with session.get(f"{url}/_fake/stats") as response:
                stats = await response.json()
        assert stats["creates_accepted"] == 1
        assert stats["peak_units"] == 4
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=15) == 0
        assert await process.stdout.read() == b""
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_exits_when_its_stdin_closes() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KLING_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "kling_async.testing", "--port", "0", "--exit-with-stdin"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    assert json.loads(process.stdout.readline())["url"].startswith("http://127.0.0.1:")
    process.stdin.close()  # what the kernel does when the parent is killed
    assert process.wait(timeout=10) == 0
    process.stdout.close()


def test_task_durations_can_be_drawn_per_task() -> None:
    def durations(text: str, seed: int = 3) -> list[float]:
        drawn = _drawn(_parser().parse_args(["--task-duration", text]).task_duration, seed)
        assert callable(drawn)
        return [drawn(None) for _ in range(2001)]  # type: ignore[arg-type]

    spread = durations("loguniform:5:20")
    assert min(spread) >= 5
    assert max(spread) <= 20
    assert 9 < sorted(spread)[1000] < 11  # median sqrt(5 * 20) = 10
    assert len(set(spread)) == len(spread)  # each task its own
    assert spread == durations("loguniform:5:20")  # --seed repeats them
    assert min(durations("uniform:2:3")) >= 2
    assert _parser().parse_args(["--task-duration", "1.5"]).task_duration == 1.5
    assert _parser().parse_args(["--task-duration", "none"]).task_duration is None


def test_a_malformed_distribution_is_refused() -> None:
    for text in ("loguniform:20:5", "uniform:0:1", "loguniform:a:b", "gauss:1:2"):
        with pytest.raises(SystemExit):
            _parser().parse_args(["--task-duration", text])


async def test_create_delay_answers_every_create_late_and_nothing_else() -> None:
    server = _server(_parser().parse_args(["--create-delay", "0.3", "--task-duration", "60"]))
    async with server, aiohttp.ClientSession(headers=AUTH) as session:
        loop = asyncio.get_running_loop()
        for _ in range(2):
            started = loop.time()
            async with session.post(f"{server.url}/v1/{GEN}", json=gen_body()) as response:
                task_id = (await response.json())["data"]["task_id"]
            assert loop.time() - started >= 0.29  # a timer may fire a clock tick early
        started = loop.time()
        async with session.get(f"{server.url}/v1/{GEN}/{task_id}") as response:
            assert (await response.json())["code"] == 0
        assert loop.time() - started < 0.3
    assert _parser().parse_args([]).create_delay == 0
    for text in ("-1", "soon", "inf", "nan"):
        with pytest.raises(SystemExit):
            _parser().parse_args(["--create-delay", text])
