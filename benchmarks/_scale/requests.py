"""Section ``requests``: HTTP requests and client CPU per completed task with
``req_in_flight`` tasks in flight, each lasting ``req_task_duration`` s: the SDK
with DEFAULT settings (no ``PollPolicy``: learned schedule, list sweeps) against
per-task GETs every ``req_baseline_interval`` s, in the same run. Detection
latency (resolution time minus the task's terminal ``updated_at``) of both is
reported. Also TUNED rows: a fixed ``PollPolicy`` interval lowered until the SDK's
mean detection latency is no worse than the baseline's. Measured again at a
second, faster operating point (``req_fast_baseline_interval``): counted with the
creates, the ratio depends on how often the baseline polls."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

from _baselines import RawKling, create_and_poll, create_body, fixed_delay
from _common import FakeServerProcess, end_lag, summarize_ms

import kling_async
from _scale.measure import Window, progress, rounded, server_args, task_end_lag
from _scale.params import API_KEY, PROMPT, Params


async def run(p: Params) -> dict[str, Any]:
    intervals = [p.req_baseline_interval]
    if p.req_fast_baseline_interval > 0:
        intervals.append(p.req_fast_baseline_interval)
    return {
        "operating_points": [
            await requests_at(p, baseline_interval) for baseline_interval in intervals
        ]
    }


async def requests_at(p: Params, baseline_interval: float) -> dict[str, Any]:
    """Requests per task of both sides, the baseline polling every ``baseline_interval`` s."""
    stagger = p.req_task_duration / p.req_in_flight

    async def drive(fake: FakeServerProcess, one: Callable[[], Awaitable[float]]) -> dict[str, Any]:
        latencies: list[float] = []
        errors: dict[str, int] = {}

        async def worker(index: int) -> None:
            # Staggered starts: a steady ~req_in_flight tasks in flight, not waves.
            await asyncio.sleep(index * stagger)
            for _ in range(p.req_lifecycles):
                try:
                    latencies.append(await one())
                except Exception as error:
                    name = type(error).__name__
                    errors[name] = errors.get(name, 0) + 1

        async with Window(fake).measure() as window:
            await asyncio.gather(*(worker(i) for i in range(p.req_in_flight)))
        completed = len(latencies)
        total = sum(window.requests.values())
        polls = window.requests["get"] + window.requests["list"]
        return {
            "completed": completed,
            "errors": errors,
            "wall_s": round(window.wall_s, 3),
            "requests": window.requests,
            "requests_per_task": round(total / max(completed, 1), 4),
            "polls_per_task": round(polls / max(completed, 1), 4),
            "detection_latency": summarize_ms(latencies),
            "client_cpu_s": round(window.cpu_s, 3),
            "client_cpu_ms_per_task": round(window.cpu_s / max(completed, 1) * 1000, 4),
            "server_cpu_s": rounded(window.server_cpu_s),
        }

    async with FakeServerProcess(*server_args(p.req_task_duration, p.req_processing_delay)) as fake:
        progress(
            f"requests: baseline, per-task GET every {baseline_interval}s, "
            f"{p.req_in_flight} in flight"
        )
        async with RawKling(fake.url, API_KEY) as raw:
            delay = fixed_delay(baseline_interval)
            phases = random.Random(6)

            async def raw_one() -> float:
                # Every fake task lasts exactly req_task_duration: polled every T s
                # from its creation, each would end at the same phase of its polls.
                # A first poll drawn in (0, T] gives the latency of tasks whose
                # duration the loop cannot know, as with real tasks.
                first = phases.uniform(0, baseline_interval)
                data = await create_and_poll(raw, create_body(PROMPT), delay, first=first)
                return end_lag(data["updated_at"])

            baseline = await drive(fake, raw_one)
        target = baseline["detection_latency"]["mean_ms"]

        progress("requests: SDK, default settings")
        async with kling_async.Client(API_KEY, base_url=fake.url) as client:

            async def default_one() -> float:
                handle = await client.images.generate(prompt=PROMPT)
                return task_end_lag(await handle)

            default = await drive(fake, default_one)

        interval = baseline_interval * 0.9
        attempts: list[dict[str, Any]] = []
        for attempt in range(p.req_tuning_attempts):
            progress(
                f"requests: SDK TUNED attempt {attempt + 1}, PollPolicy interval {interval:.3f}s"
            )
            policy = kling_async.PollPolicy(
                initial_delay=interval, max_delay=interval, jitter=0.0, learn=False
            )
            async with kling_async.Client(API_KEY, base_url=fake.url, polling=policy) as client:

                async def sdk_one() -> float:
                    handle = await client.images.generate(prompt=PROMPT)
                    return task_end_lag(await handle)

                result = await drive(fake, sdk_one)
            attempts.append({"poll_interval_s": round(interval, 4), **result})
            got = result["detection_latency"]["mean_ms"]
            if got is None or target is None or got <= target:
                break
            interval *= 0.95 * target / got
    tuned = attempts[-1] if attempts else None

    def matched(run: dict[str, Any] | None) -> bool:
        return (
            run is not None
            and run["detection_latency"]["mean_ms"] is not None
            and target is not None
            and run["detection_latency"]["mean_ms"] <= target
        )

    return {
        "baseline_poll_interval_s": baseline_interval,
        "baseline": baseline,
        "sdk_default": default,
        "default_latency_matched": matched(default),
        "sdk_tuned_poll_interval_s": tuned["poll_interval_s"] if tuned else None,
        "tuned_latency_matched": matched(tuned),
        "sdk_tuned_attempts": attempts,
    }
