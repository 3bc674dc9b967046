"""Several processes on one account: the quota as the fake server sees it, a
callback crossing processes, and the arq pipeline, a worker SIGKILLed included.
The fake Kling server and every member run as processes of their own; only
loopback is used; every process is stopped by its id when the test ends."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import aiohttp
import pytest
from redis.asyncio import Redis

from kling_async import CallbackReceiver, EntryState
from kling_async.contrib.redis import RedisAccount
from kling_async.testing import FakeKlingServer, RedisServer

HERE = Path(__file__).resolve().parent
MEMBER = HERE / "member_process.py"
EXAMPLE = HERE.parent.parent / "examples" / "arq_pipeline"
API_KEY = "sk-test-0123456789"


def environment(**extra: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("KLING_")}
    env.update(extra)
    return env


@contextlib.contextmanager
def fake_server(*arguments: str) -> Iterator[str]:
    """``python -m kling_async.testing`` in its own process; yields its URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "kling_async.testing", "--port", "0", "--exit-with-stdin",
         "--api-key", API_KEY, *arguments],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=environment(),
    )  # fmt: skip
    try:
        assert process.stdout is not None
        yield str(json.loads(process.stdout.readline())["url"])
    finally:
        stop(process)


def stop(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            stream.close()


async def stats(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/_fake/stats") as response:
        data: dict[str, Any] = await response.json()
        return data


async def run(*command: str, env: dict[str, str], cwd: Path = HERE, timeout: float = 90) -> str:
    process = await asyncio.create_subprocess_exec(
        *command, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except BaseException:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, err.decode()[-3000:]
    return out.decode()


async def test_processes_never_exceed_the_quota_the_server_sees(
    redis_server: RedisServer, account_name: str
) -> None:
    capacity, processes, tasks = 12, 3, 30
    with fake_server("--concurrency-limit", str(capacity), "--task-duration", "0.3") as url:
        commands = [
            [sys.executable, str(MEMBER), "quota", redis_server.url, url, account_name,
             str(capacity), str(tasks), str(seed)]
            for seed in range(processes)
        ]  # fmt: skip
        outputs = await asyncio.gather(*(run(*command, env=environment()) for command in commands))
        seen = await stats(url)
    results = [json.loads(output) for output in outputs]
    assert sum(result["succeeded"] for result in results) == processes * tasks
    assert seen["tasks"] == processes * tasks  # none created twice
    assert seen["peak_units"] <= capacity
    assert seen["peak_units"] >= capacity - 3  # and the quota was used
    assert seen["creates_rejected_concurrency"] <= 0.01 * seen["creates_accepted"]


async def test_a_callback_delivered_to_one_process_resolves_a_handle_in_another(
    redis: Redis, redis_server: RedisServer, account_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "the-replicas-shared-secret-0123456789"
    monkeypatch.setenv("KLING_CALLBACK_SECRET", secret)
    public = CallbackReceiver()
    async with (
        FakeKlingServer(api_key=API_KEY, task_duration=0.3) as server,
        public.serve() as public_url,
        RedisAccount(redis, name=account_name) as account,
    ):
        front = account.fan_in(public)
        await front.ready()
        output = await run(
            sys.executable, str(MEMBER), "holder", redis_server.url, server.url, account_name,
            public_url, env=environment(KLING_CALLBACK_SECRET=secret),
        )  # fmt: skip
        result = json.loads(output)
    assert result["status"] == "succeed"
    assert result["delivered"] >= 1  # the other process took the callback this one received
    assert result["seconds"] < 10  # its polling would have waited 30 s
    assert front.forwarded >= 1
    received = [record for record in server.callbacks if record.url.startswith(public_url)]
    assert received  # Kling's callbacks went to this process only


# --- the arq pipeline ---------------------------------------------------------------------------


class Pipeline:
    """The example's workers, started as README says, on a test's Redis and fake."""

    def __init__(self, redis_url: str, fake_url: str, account: str, folder: Path) -> None:
        self.env = environment(
            REDIS_URL=redis_url,
            KLING_BASE_URL=fake_url,
            KLING_API_KEY=API_KEY,
            KLING_MAX_CONCURRENCY="10",
            KLING_ACCOUNT=account,
            KLING_LEASE="1.0",
            ARQ_JOB_TIMEOUT="15",
        )
        self.folder = folder
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, IO[bytes]] = {}

    def start(self, member: str) -> None:
        log = (self.folder / f"{member}.log").open("wb")
        self.logs[member] = log
        self.workers[member] = subprocess.Popen(
            [sys.executable, "-m", "arq", "worker.WorkerSettings"],
            cwd=EXAMPLE,
            env={**self.env, "KLING_MEMBER": member},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def log(self, member: str) -> str:
        return (self.folder / f"{member}.log").read_text(errors="replace")

    def stop(self) -> None:
        for process in self.workers.values():
            stop(process)
        for log in self.logs.values():
            log.close()


@pytest.fixture
def pipeline(
    redis_server: RedisServer, account_name: str, tmp_path: Path
) -> Iterator[tuple[Pipeline, str]]:
    with fake_server("--concurrency-limit", "10", "--task-duration", "0.5") as url:
        workers = Pipeline(redis_server.url, url, account_name, tmp_path)
        try:
            yield workers, url
        finally:
            workers.stop()


async def enqueue(pipeline: Pipeline, name: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "enqueue.py", "prompts.jsonl", "--name", name, "--wait", "--timeout", "90",
        cwd=EXAMPLE, env=pipeline.env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def summary(process: asyncio.subprocess.Process) -> dict[str, Any]:
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()[-3000:]
    result: dict[str, Any] = json.loads(out)
    return result


LINES = len((EXAMPLE / "prompts.jsonl").read_text().splitlines())


async def test_the_arq_example_completes_a_batch_with_no_task_created_twice(
    pipeline: tuple[Pipeline, str],
) -> None:
    workers, url = pipeline
    workers.start("w1")
    workers.start("w2")
    first = await summary(await enqueue(workers, "batch"))
    assert first["succeeded"] == LINES
    assert first["errors"] == []
    assert len(set(first["task_ids"])) == LINES
    again = await summary(await enqueue(workers, "batch"))  # the same batch enqueued again
    assert sorted(again["task_ids"]) == sorted(first["task_ids"])
    seen = await stats(url)
    assert seen["tasks"] == LINES == seen["creates_accepted"]
    assert seen["peak_units"] <= 10
    both = [member for member in ("w1", "w2") if "generate" in workers.log(member)]
    assert both == ["w1", "w2"]  # both workers ran jobs


async def test_a_worker_killed_mid_batch_loses_no_task_and_its_tasks_are_adopted(
    pipeline: tuple[Pipeline, str], redis: Redis, account_name: str
) -> None:
    workers, url = pipeline
    workers.start("w1")
    workers.start("w2")
    waiting = await enqueue(workers, "killed")
    owned = f"kling:{{{account_name}}}:owned:w1"
    deadline = time.monotonic() + 30
    held: set[bytes] = set()
    while time.monotonic() < deadline:
        held = await redis.smembers(owned)  # type: ignore[misc]  # redis-py: reply or awaitable
        created = [await redis.get(f"kling:{{{account_name}}}:e:{ext.decode()}") for ext in held]
        if len(held) >= 3 and any(b'"created"' in raw for raw in created if raw):
            break
        await asyncio.sleep(0.02)
    workers.workers["w1"].send_signal(signal.SIGKILL)  # mid-batch, tasks in flight
    killed_at = time.monotonic()
    assert len(held) >= 3, "w1 never held tasks to kill"

    result = await summary(waiting)
    recovered_in = time.monotonic() - killed_at
    assert result["succeeded"] == LINES, result["errors"]
    seen = await stats(url)
    assert seen["tasks"] == LINES == seen["creates_accepted"]  # none lost, none twice
    assert seen["peak_units"] <= 10
    assert "member w1 is gone" in workers.log("w2")
    async with RedisAccount(redis, name=account_name) as account:
        ledger = account.ledger()
        for ext in held:  # every task w1 held when killed was finished by w2
            entry = await ledger.get(ext.decode())
            assert entry is not None
            assert entry.state is EntryState.TERMINAL
            assert entry.status == "succeed"
            assert entry.owner == "w2"
    # Usually a few seconds: the survivor lets arq run the dead worker's jobs again at
    # once. A job the worker had picked but not yet started when it died is not in its
    # list, and runs again when arq's own mark expires: job timeout (15 s) + 10 s.
    assert recovered_in < 40
    print(f"kill test: w1 held {len(held)} entries at the kill; recovered in {recovered_in:.1f}s")
