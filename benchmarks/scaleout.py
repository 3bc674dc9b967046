"""Benchmark: several worker processes on one account quota (issue #19).

Two sections, with the fake Kling server in a process of its own and a
redis-server on loopback started by the benchmark:

``throughput``
    1, 2 and 4 worker processes share one account (``RedisLimiter`` +
    ``RedisLedger``) whose quota is ``--quota`` units. Each worker keeps at most
    ``--per-worker`` tasks in flight (as an arq worker's ``max_jobs`` does), and
    every task lasts ``--task-duration`` seconds, so throughput grows with the
    workers until the quota binds. Per run: tasks per second, the server's
    utilisation of the quota, its peak units and its 1303 count; ratios against
    the 1-worker run and against the quota's bound (quota / task duration).
``latency``
    The time one ``client.images.generate()`` takes with the shared limiter and
    with the in-process ``ConcurrencyLimiter`` (same process, same fake, quota
    not binding, one create at a time, alternating rounds), and the shared
    limiter's added milliseconds per create; also a bare acquire+release pair.

Prints one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from typing import Any

from _common import FakeServerProcess, cancel_on_termination, machine_info, ratio, summarize_ms
from redis.asyncio import Redis

import kling_async
from kling_async.contrib.redis import RedisAccount
from kling_async.testing import RedisServer

API_KEY = "bench-key"
POLL = kling_async.PollPolicy(initial_delay=0.05, max_delay=0.1, multiplier=1.2, timeout=120.0)


def progress(message: str) -> None:
    print(f"scaleout: {message}", file=sys.stderr, flush=True)


# --- one worker process ----------------------------------------------------------------


async def worker(arguments: argparse.Namespace) -> None:
    redis = Redis.from_url(arguments.redis)
    async with RedisAccount(redis, name=arguments.account) as account:
        limiter = account.limiter(arguments.quota)
        async with kling_async.Client(
            API_KEY,
            base_url=arguments.fake,
            max_concurrency=limiter,
            ledger=account.ledger(),
            polling=POLL,
        ) as client:
            slots = asyncio.Semaphore(arguments.per_worker)

            async def one(number: int) -> None:
                async with slots:
                    await (await client.images.generate(prompt=f"task {number}"))

            await asyncio.sleep(max(0.0, arguments.start_at - time.time()))
            started = time.time()
            await asyncio.gather(*(one(number) for number in range(arguments.tasks)))
            ended = time.time()
        await limiter.flush()
    await redis.aclose()
    print(
        json.dumps(
            {
                "started": started,
                "ended": ended,
                "tasks": arguments.tasks,
                "redis_calls": limiter.calls,
                "redis_ms_per_call": round(limiter.call_seconds / max(1, limiter.calls) * 1000, 3),
            }
        )
    )


# --- throughput ----------------------------------------------------------------------


async def throughput_run(
    redis_url: str, workers: int, tasks: int, quota: int, per_worker: int, duration: float
) -> dict[str, Any]:
    async with FakeServerProcess(
        "--concurrency-limit", str(quota), "--task-duration", str(duration),
        "--processing-delay", str(duration / 4), "--api-key", API_KEY,
    ) as fake:  # fmt: skip
        account = f"bench-{uuid.uuid4().hex[:8]}"
        start_at = time.time() + 2.0  # every worker set up and waiting
        command = [
            sys.executable, __file__, "--role", "worker", "--redis", redis_url,
            "--fake", fake.url, "--account", account, "--quota", str(quota),
            "--per-worker", str(per_worker), "--tasks", str(tasks // workers),
            "--start-at", str(start_at),
        ]  # fmt: skip
        processes = [
            await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
            for _ in range(workers)
        ]
        outputs = [await process.communicate() for process in processes]
        if any(process.returncode for process in processes):
            raise RuntimeError("a worker failed")
        stats = await fake.stats()
    results = [json.loads(out) for out, _err in outputs]
    wall = max(r["ended"] for r in results) - min(r["started"] for r in results)
    done = sum(r["tasks"] for r in results)
    rate = done / wall
    bound = quota / duration
    return {
        "workers": workers,
        "tasks": done,
        "seconds": round(wall, 3),
        "tasks_per_s": round(rate, 2),
        "offered_in_flight": min(workers * per_worker, done),
        "share_of_quota_bound": ratio(rate, bound),
        "server_utilisation": round(stats["utilisation"], 3),
        "peak_units": stats["peak_units"],
        "creates_accepted": stats["creates_accepted"],
        "creates_rejected_1303": stats["creates_rejected_concurrency"],
        "tasks_on_server": stats["tasks"],
        "redis_ms_per_call": statistics.mean(r["redis_ms_per_call"] for r in results),
    }


async def throughput(redis_url: str, options: argparse.Namespace) -> dict[str, Any]:
    runs = []
    for workers in (1, 2, 4):
        progress(f"throughput: {workers} worker(s)")
        runs.append(
            await throughput_run(
                redis_url,
                workers,
                options.tasks,
                options.quota,
                options.per_worker,
                options.task_duration,
            )
        )
    base = runs[0]["tasks_per_s"]
    for run in runs:
        run["speedup_vs_1_worker"] = ratio(run["tasks_per_s"], base)
    return {
        "quota_units": options.quota,
        "per_worker_in_flight": options.per_worker,
        "task_duration_s": options.task_duration,
        "quota_bound_tasks_per_s": round(options.quota / options.task_duration, 2),
        "runs": runs,
    }


# --- latency -------------------------------------------------------------------------


async def create_times(url: str, limiter: kling_async.Limiter, count: int) -> list[float]:
    times = []
    async with kling_async.Client(API_KEY, base_url=url, max_concurrency=limiter) as client:
        for number in range(count):
            started = time.perf_counter()
            await client.images.generate(prompt=f"latency {number}")
            times.append(time.perf_counter() - started)
    return times


async def pair_times(limiter: kling_async.Limiter, count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        await limiter.acquire(1)
        limiter.release(1, created=False)
        times.append(time.perf_counter() - started)
    return times


async def latency(redis_url: str, options: argparse.Namespace) -> dict[str, Any]:
    shared: list[float] = []
    local: list[float] = []
    shared_pairs: list[float] = []
    local_pairs: list[float] = []
    redis = Redis.from_url(redis_url)
    async with (
        FakeServerProcess("--task-duration", "3600", "--api-key", API_KEY) as fake,
        RedisAccount(redis, name=f"latency-{uuid.uuid4().hex[:8]}") as account,
    ):
        big = 1_000_000
        # One limiter per member (contrib.redis refuses a second), shared by the
        # rounds' clients as the documented usage shares it; the account closes it.
        limiter = account.limiter(big)
        for number in range(options.rounds):
            progress(f"latency round {number + 1}/{options.rounds}")
            order = ("shared", "local") if number % 2 == 0 else ("local", "shared")
            for side in order:
                if side == "shared":
                    shared.extend(await create_times(fake.url, limiter, options.creates))
                    shared_pairs.extend(await pair_times(limiter, options.creates))
                else:
                    in_process = kling_async.ConcurrencyLimiter(big)
                    local.extend(await create_times(fake.url, in_process, options.creates))
                    local_pairs.extend(await pair_times(in_process, options.creates))
    await redis.aclose()
    shared_summary, local_summary = summarize_ms(shared), summarize_ms(local)
    return {
        "creates_per_side": len(shared),
        "create_shared_limiter": shared_summary,
        "create_in_process_limiter": local_summary,
        "added_ms_per_create_p50": round(
            (shared_summary["p50_ms"] or 0) - (local_summary["p50_ms"] or 0), 3
        ),
        "added_ms_per_create_mean": round(
            (shared_summary["mean_ms"] or 0) - (local_summary["mean_ms"] or 0), 3
        ),
        "ratio_p50": ratio(shared_summary["p50_ms"], local_summary["p50_ms"]),
        "acquire_release_shared": summarize_ms(shared_pairs),
        "acquire_release_in_process": summarize_ms(local_pairs),
    }


async def main(arguments: argparse.Namespace) -> None:
    cancel_on_termination()
    started = time.perf_counter()
    with RedisServer() as redis_server:
        result: dict[str, Any] = {
            "benchmark": "scaleout",
            "machine": machine_info(),
            "load_average_before": os.getloadavg(),
        }
        if "throughput" in arguments.only:
            result["throughput"] = await throughput(redis_server.url, arguments)
        if "latency" in arguments.only:
            result["latency"] = await latency(redis_server.url, arguments)
    result["load_average_after"] = os.getloadavg()
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2))


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--role", default="main", choices=("main", "worker"))
    parser.add_argument("--quota", type=int, default=20, help="the account's quota in units")
    parser.add_argument("--per-worker", type=int, default=8, help="tasks in flight per worker")
    parser.add_argument("--tasks", type=int, default=240, help="tasks per throughput run")
    parser.add_argument("--task-duration", type=float, default=1.0)
    parser.add_argument("--creates", type=int, default=200, help="creates per latency round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--only", default="throughput,latency")
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    # A worker's own arguments.
    parser.add_argument("--redis", default="")
    parser.add_argument("--fake", default="")
    parser.add_argument("--account", default="")
    parser.add_argument("--start-at", type=float, default=0.0)
    arguments = parser.parse_args()
    if arguments.quick:
        arguments.tasks, arguments.task_duration = 48, 0.5
        arguments.creates, arguments.rounds = 50, 2
    return arguments


if __name__ == "__main__":
    options = parse()
    if options.role == "worker":
        asyncio.run(worker(options))
    else:
        asyncio.run(main(options))
