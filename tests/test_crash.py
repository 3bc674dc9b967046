"""Crash test: ``kling-async batch`` SIGKILLed at random points, then run to the end.

The fake Kling server runs in a process of its own, so it outlives every run of
the CLI, as Kling does. Each run of the same command over the same file is
killed (SIGKILL: no cleanup, no flush) at a random moment, except the last,
which must finish the work. Judged from the server's own record:

- one task per valid line: none created twice, none lost;
- every line's images on disk;
- ``results.jsonl`` holding exactly one record per input line, invalid ones too.

Seeded (``CRASH_SEED``); ``CRASH_REPORT=path`` appends the figures as JSON.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import fake_server_process

pytestmark = pytest.mark.chaos

API_KEY = "sk-crash-test"
LINES = 40
KILLED_RUNS = 4
SEED = int(os.environ.get("CRASH_SEED", "14"))


def write_requests(path: Path) -> list[int]:
    """``LINES`` requests (some with n=2) and two invalid lines; their line numbers."""
    lines = []
    for number in range(LINES):
        request: Any = f"crash line {number}"
        if number % 5 == 0:
            request = {"prompt": f"crash line {number}", "n": 2}
        lines.append(json.dumps(request))
    lines.insert(7, '{"prompt": "bad", "n": 12}')
    lines.insert(21, "not json at all")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [7 + 1, 21 + 1]


async def run_cli(url: str, requests: Path, out: Path, kill_after: float | None) -> int | None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kling_async",
        "--api-key",
        API_KEY,
        "--base-url",
        url,
        "batch",
        str(requests),
        "--out",
        str(out),
        "--concurrency",
        "6",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    if kill_after is None:
        return await asyncio.wait_for(process.wait(), 120)
    try:
        return await asyncio.wait_for(process.wait(), kill_after)
    except asyncio.TimeoutError:
        process.send_signal(signal.SIGKILL)
        await process.wait()
        return None


async def test_a_batch_killed_again_and_again_pays_once_and_loses_nothing(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    requests = tmp_path / "prompts.jsonl"
    invalid = write_requests(requests)
    out = tmp_path / "out"
    kills = 0
    with fake_server_process(
        "--task-duration", "0.6", "--processing-delay", "0.1", api_key=API_KEY
    ) as server:
        progress = []  # tasks on the server after each killed run
        for _ in range(KILLED_RUNS):
            status = await run_cli(server.url, requests, out, kill_after=rng.uniform(0.8, 2.5))
            kills += status is None
            progress.append(len(await asyncio.to_thread(server.tasks)))
        final = await run_cli(server.url, requests, out, kill_after=None)
        tasks = await asyncio.to_thread(server.tasks)

    assert final == 1  # the two invalid lines; everything else succeeded
    per_prompt = Counter(task["prompt"] for task in tasks)
    expected = {f"crash line {number}" for number in range(LINES)}
    duplicated = {prompt: count for prompt, count in per_prompt.items() if count > 1}
    lost = expected - set(per_prompt)
    assert not duplicated, duplicated
    assert not lost, lost
    assert set(per_prompt) == expected
    assert all(task["task_status"] == "succeed" for task in tasks)

    for task in tasks:
        for image in task["task_result"]["images"]:
            assert (out / f"{task['task_id']}_{image['index']}.png").is_file()

    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    per_line = Counter(record["line"] for record in records)
    assert all(count == 1 for count in per_line.values()), per_line
    assert len(records) == LINES + len(invalid)
    by_line = {record["line"]: record for record in records}
    assert [by_line[line]["status"] for line in invalid] == ["invalid", "invalid"]
    succeeded = [record for record in records if record["status"] == "succeed"]
    assert len(succeeded) == LINES
    assert {record["task_id"] for record in succeeded} == {task["task_id"] for task in tasks}
    for record in succeeded:
        assert all(Path(path).is_file() for path in record["paths"])

    report = {
        "seed": SEED,
        "runs": KILLED_RUNS + 1,
        "kills": kills,
        "tasks_after_each_kill": progress,
        "lines": LINES,
        "invalid_lines": len(invalid),
        "tasks_on_server": len(tasks),
        "images_on_disk": sum(len(task["task_result"]["images"]) for task in tasks),
        "lost": len(lost),
        "duplicated": len(duplicated),
    }
    print(json.dumps(report))
    if path := os.environ.get("CRASH_REPORT"):
        _append_line(path, json.dumps(report))


def _append_line(path: str, line: str) -> None:
    with open(path, "a", encoding="utf-8") as file:
        file.write(line + "\n")
