"""Section ``lag``: event-loop lag (a 10 ms ticker's overshoot) over
``lag_window`` s with ``lag_handles`` handles in flight, awaited and polled with
the default ``PollPolicy`` (list sweeps); baseline: per-task polling on the same
schedule. Also the RSS (``VmRSS``) of each side with that many tasks in flight.
Each side runs in a fresh child process (``scale.py --worker=lag``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Mapping
from typing import Any

from _baselines import RawKling, create_body, growing_delay, poll_until_end
from _common import request_delta, summarize_ms

import kling_async
from _scale.figures import Figure, Goal, Section, unmeasured
from _scale.measure import (
    FakeStats,
    LogTally,
    await_handle,
    cancel_all,
    each_side_in_a_child,
    in_parallel,
    proc_status_mb,
)
from _scale.params import API_KEY, PROMPT, Params


async def run(p: Params) -> dict[str, Any]:
    return await each_side_in_a_child(
        "lag",
        p.lag_handles,
        1.0,
        p.timeout_lag,
        f"--window={p.lag_window}",
        f"--concurrency={p.create_concurrency}",
    )


async def ticker(stop: asyncio.Event, interval: float = 0.01) -> list[float]:
    """Sleep ``interval`` over and over until ``stop``; return each overshoot (s)."""
    lags: list[float] = []
    while not stop.is_set():
        started = time.perf_counter()
        await asyncio.sleep(interval)
        lags.append(time.perf_counter() - started - interval)
    return lags


async def worker(arguments: argparse.Namespace) -> dict[str, Any]:
    count, width = arguments.handles, arguments.concurrency
    waiters: list[asyncio.Task[Any]] = []
    handles: list[kling_async.TaskHandle] = []
    logs = LogTally()
    async with (
        FakeStats(arguments.url) as fake,
        contextlib.AsyncExitStack() as stack,
    ):
        stack.enter_context(logs.watching())
        if arguments.side == "sdk":
            client = await stack.enter_async_context(
                kling_async.Client(API_KEY, base_url=arguments.url)
            )

            async def submit(_index: int) -> None:
                handle = await client.images.generate(prompt=PROMPT)
                handles.append(handle)
                waiters.append(asyncio.create_task(await_handle(handle)))

        else:
            raw = await stack.enter_async_context(RawKling(arguments.url, API_KEY))
            delay = growing_delay()  # the SDK's cold schedule (nothing learned), per task

            async def submit(_index: int) -> None:
                data = await raw.created(create_body(PROMPT))
                waiters.append(asyncio.create_task(poll_until_end(raw, data, delay)))

        stop = asyncio.Event()
        watch = asyncio.create_task(ticker(stop))
        started = time.perf_counter()
        await in_parallel(count, width, submit)
        submit_s = time.perf_counter() - started
        stop.set()
        submission_lags = await watch
        rss_submitted = proc_status_mb("VmRSS")

        before = await fake.stats()
        cpu = time.process_time()
        stop = asyncio.Event()
        watch = asyncio.create_task(ticker(stop))
        await asyncio.sleep(arguments.window)
        stop.set()
        lags = await watch
        cpu = time.process_time() - cpu
        requests = request_delta(before, await fake.stats())
        rss = proc_status_mb("VmRSS")
        failed = sum(1 for w in waiters if w.done() and not w.cancelled() and w.exception())
        finished = sum(1 for w in waiters if w.done())
        await cancel_all(waiters)
    return {
        "tasks_in_flight": count,
        "submit_s": round(submit_s, 3),
        "submission_lag": summarize_ms(submission_lags),
        "window_s": arguments.window,
        "window_lag": summarize_ms(lags),
        "window_requests": requests,
        "window_requests_per_s": round(sum(requests.values()) / arguments.window, 1),
        "window_cpu_s": round(cpu, 3),
        "rss_mb_after_submit": rss_submitted,
        "rss_mb": rss,
        "hwm_mb": proc_status_mb("VmHWM"),
        "waits_ended_early": finished,
        "waits_failed": failed,
        "logged": logs.report(),
    }


#: Issue 26 (issue 6 said 20): the event loop's lag p99 at most 10 ms, every task in flight.
LAG_GOAL = Goal(judges="sdk", op="<=", limit=10, subject="sdk p99", unit=" ms", more="(issue 26)")
LAG_NAME = "loop_lag_p99_ms"
#: Issue 26 (issue 6 said 150): at most 100 MB resident with every task in flight.
RSS_GOAL = Goal(judges="sdk", op="<=", limit=100, unit=" MB", more="(issue 26)")
RSS_NAME = "rss_mb_in_flight"


def figures(p: Params, result: Mapping[str, Any]) -> list[Figure]:
    sdk, baseline = result.get("sdk", {}), result.get("baseline", {})
    if "window_lag" not in sdk or "window_lag" not in baseline:
        return unmeasured(result, (LAG_NAME, LAG_GOAL), (RSS_NAME, RSS_GOAL))
    sdk_lag, baseline_lag = sdk["window_lag"], baseline["window_lag"]
    return [
        Figure(
            name=LAG_NAME,
            goal=LAG_GOAL,
            sdk=sdk_lag["p99_ms"],
            baseline=baseline_lag["p99_ms"],
            context={
                "p50_ms": {"sdk": sdk_lag["p50_ms"], "baseline": baseline_lag["p50_ms"]},
                "max_ms": {"sdk": sdk_lag["max_ms"], "baseline": baseline_lag["max_ms"]},
                "handles": p.lag_handles,
                "window_s": p.lag_window,
            },
        ),
        Figure(
            name=RSS_NAME,
            goal=RSS_GOAL,
            sdk=sdk["rss_mb"],
            baseline=baseline["rss_mb"],
            context={"handles": p.lag_handles},
            note="VmRSS after the lag window, no tracemalloc",
        ),
    ]


SECTION = Section(name="lag", run=run, figures=figures, worker=worker)
