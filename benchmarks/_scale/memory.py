"""Section ``memory``: tracemalloc bytes per in-flight awaited handle with
``mem_handles`` tasks that never end; baseline: task ids, futures and one waiting
task each. Each side runs in a fresh child process (``scale.py --worker=memory``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from _baselines import RawKling, create_body, hold_in_flight

import kling_async
from _scale.figures import Figure, Goal, Section, unmeasured
from _scale.measure import (
    await_handle,
    cancel_all,
    each_side_in_a_child,
    in_parallel,
    proc_status_mb,
)
from _scale.params import API_KEY, PROMPT, Params


async def run(p: Params) -> dict[str, Any]:
    # Tasks go to "processing" soon after creation, so every handle ends up
    # holding a polled task (as in flight tasks do), not just the create's answer.
    return await each_side_in_a_child(
        "memory",
        p.mem_handles,
        p.mem_processing_delay,
        p.timeout_memory,
        f"--settle={p.mem_settle}",
        f"--concurrency={p.create_concurrency}",
    )


async def worker(arguments: argparse.Namespace) -> dict[str, Any]:
    """tracemalloc bytes per in-flight task: all that a side allocates (and still
    holds, after a full collection) to have ``--handles`` tasks created and awaited."""
    count, width = arguments.handles, arguments.concurrency
    held: list[object] = []  # what the user's code holds: handles or ids and futures
    waiters: list[asyncio.Task[Any]] = []
    async with contextlib.AsyncExitStack() as stack:
        submit: Callable[[], Awaitable[None]]
        warm: Callable[[int], Awaitable[object]]
        if arguments.side == "sdk":
            client = await stack.enter_async_context(
                kling_async.Client(API_KEY, base_url=arguments.url)
            )

            async def warm_sdk(_index: int) -> object:
                return await client.images.generate(prompt=PROMPT)

            async def submit_sdk() -> None:
                async def one(_index: int) -> None:
                    handle = await client.images.generate(prompt=PROMPT)
                    held.append(handle)
                    waiters.append(asyncio.create_task(await_handle(handle)))

                await in_parallel(count, width, one)

            warm, submit = warm_sdk, submit_sdk
        else:
            raw = await stack.enter_async_context(RawKling(arguments.url, API_KEY))

            async def warm_raw(_index: int) -> object:
                return await raw.created(create_body(PROMPT))

            async def submit_raw() -> None:
                futures, tasks = await hold_in_flight(raw, count, width, PROMPT)
                held.append(futures)
                waiters.extend(tasks)

            warm, submit = warm_raw, submit_raw

        async def warm_up(index: int) -> None:
            await warm(index)

        await in_parallel(width, width, warm_up)  # the session and its connections exist
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        first = tracemalloc.take_snapshot()
        started = time.perf_counter()
        await submit()
        submitted = time.perf_counter() - started
        await asyncio.sleep(arguments.settle)  # waits registered, polls going
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        last = tracemalloc.take_snapshot()
        tracemalloc.stop()
        top = [
            {
                "where": str(stat.traceback[0]),
                "kb": round(stat.size_diff / 1024, 1),
                "count": stat.count_diff,
            }
            for stat in last.compare_to(first, "lineno")[:15]
        ]
        rss = proc_status_mb("VmRSS")
        await cancel_all(waiters)
    return {
        "tasks_in_flight": count,
        "bytes_per_task": round((after - before) / count, 1),
        "traced_mb": round((after - before) / 2**20, 2),
        "submit_s_traced": round(submitted, 3),
        "rss_mb_traced": rss,
        "top_allocations": top,
    }


#: Issue 6: at most 4 KiB for each awaited handle in flight.
GOAL = Goal(judges="sdk", op="<=", limit=4096, unit=" bytes per handle")
NAME = "bytes_per_in_flight_handle"


def figures(p: Params, result: Mapping[str, Any]) -> list[Figure]:
    sdk, baseline = result.get("sdk", {}), result.get("baseline", {})
    if "bytes_per_task" not in sdk or "bytes_per_task" not in baseline:
        return unmeasured(result, (NAME, GOAL))
    return [
        Figure(
            name=NAME,
            goal=GOAL,
            sdk=sdk["bytes_per_task"],
            baseline=baseline["bytes_per_task"],
            context={"handles": p.mem_handles},
        )
    ]


SECTION = Section(name="memory", run=run, figures=figures, worker=worker)
