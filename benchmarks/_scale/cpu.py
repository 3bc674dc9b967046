"""Section ``cpu``: client CPU time (``time.process_time``) per task lifecycle,
create then poll to the end, both sides polling every ``cpu_poll_interval`` s with
single GETs (TUNED: ``PollPolicy(initial_delay=x, max_delay=x, jitter=0,
learn=False, list_sweeps=False)``, so both send the same requests). Request counts
of both sides are reported and must match. Rounds alternate SDK and baseline;
medians are compared."""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

from _baselines import RawKling, create_and_poll, create_body, fixed_delay
from _common import FakeServerProcess, ratio

import kling_async
from _scale.figures import Figure, Goal, Section, tuned, unmeasured
from _scale.measure import Window, in_parallel, median, progress, rounded, server_args
from _scale.params import API_KEY, PROMPT, Params


async def run(p: Params) -> dict[str, Any]:
    interval = p.cpu_poll_interval
    # Tuned to send what the baseline sends: a fixed interval, one GET per poll.
    policy = kling_async.PollPolicy(
        initial_delay=interval, max_delay=interval, jitter=0.0, learn=False, list_sweeps=False
    )
    rounds: list[dict[str, Any]] = []
    async with FakeServerProcess(*server_args(p.cpu_task_duration, p.cpu_processing_delay)) as fake:

        async def sdk_side(count: int) -> dict[str, Any]:
            async with kling_async.Client(API_KEY, base_url=fake.url, polling=policy) as client:

                async def lifecycle(_index: int) -> None:
                    handle = await client.images.generate(prompt=PROMPT)
                    await handle

                await in_parallel(p.cpu_in_flight, p.cpu_in_flight, lifecycle)  # warm-up
                async with Window(fake).measure() as window:
                    await in_parallel(count, p.cpu_in_flight, lifecycle)
            return {"side": "sdk", "wall_s": round(window.wall_s, 3), **window.per(count)}

        async def raw_side(count: int) -> dict[str, Any]:
            delay = fixed_delay(interval)
            async with RawKling(fake.url, API_KEY) as raw:

                async def lifecycle(_index: int) -> None:
                    await create_and_poll(raw, create_body(PROMPT), delay)

                await in_parallel(p.cpu_in_flight, p.cpu_in_flight, lifecycle)
                async with Window(fake).measure() as window:
                    await in_parallel(count, p.cpu_in_flight, lifecycle)
            return {"side": "baseline", "wall_s": round(window.wall_s, 3), **window.per(count)}

        for number in range(p.cpu_rounds):
            sides = (sdk_side, raw_side) if number % 2 == 0 else (raw_side, sdk_side)
            for side in sides:
                progress(f"cpu round {number + 1}/{p.cpu_rounds}: {side.__name__}")
                result = await side(p.cpu_lifecycles)
                rounds.append({"round": number + 1, **result})
    sdk_cpu = [r["client_cpu_ms"] for r in rounds if r["side"] == "sdk"]
    raw_cpu = [r["client_cpu_ms"] for r in rounds if r["side"] == "baseline"]
    sdk_user = [r["client_user_ms"] for r in rounds if r["side"] == "sdk"]
    raw_user = [r["client_user_ms"] for r in rounds if r["side"] == "baseline"]
    per_round = [
        ratio(s["client_cpu_ms"], b["client_cpu_ms"])
        for s, b in zip(
            [r for r in rounds if r["side"] == "sdk"],
            [r for r in rounds if r["side"] == "baseline"],
            strict=True,
        )
    ]

    def requests_of(side: str) -> dict[str, float]:
        rows = [r["requests"] for r in rounds if r["side"] == side]
        return {k: round(statistics.fmean(row[k] for row in rows), 4) for k in rows[0]}

    sdk_requests, raw_requests = requests_of("sdk"), requests_of("baseline")
    matched = all(
        abs(sdk_requests[route] - raw_requests[route]) <= 0.02 * max(raw_requests[route], 1)
        for route in sdk_requests
    )
    return {
        "client_cpu_ms_per_lifecycle": {
            "sdk_median": rounded(median(sdk_cpu), 4),
            "baseline_median": rounded(median(raw_cpu), 4),
            "ratio_of_medians": ratio(median(sdk_cpu), median(raw_cpu)),
            "per_round_ratios": per_round,
            "median_of_round_ratios": median([r for r in per_round if r is not None]),
            "user_only": {
                "sdk_median": rounded(median(sdk_user), 4),
                "baseline_median": rounded(median(raw_user), 4),
                "ratio_of_medians": ratio(median(sdk_user), median(raw_user)),
            },
        },
        "requests_per_lifecycle": {"sdk": sdk_requests, "baseline": raw_requests},
        "requests_match": matched,
        "rounds": rounds,
    }


#: Issue 6: the SDK's client CPU per lifecycle at most 15 % above the baseline's,
#: both sides sending the same requests (a condition of the figure, not worded).
GOAL = Goal(judges="ratio", op="<=", limit=1.15)
NAME = "cpu_ms_per_lifecycle"


def figures(p: Params, result: Mapping[str, Any]) -> list[Figure]:
    if "client_cpu_ms_per_lifecycle" not in result:
        return unmeasured(result, (NAME, GOAL))
    medians = result["client_cpu_ms_per_lifecycle"]
    return [
        Figure(
            name=NAME,
            goal=GOAL,
            sdk=medians["sdk_median"],
            baseline=medians["baseline_median"],
            settings=tuned("both sides one GET every cpu_poll_interval s"),
            conditions={"requests_match": result["requests_match"]},
            context={
                "requests_match": result["requests_match"],
                "requests_per_lifecycle": result["requests_per_lifecycle"],
            },
        )
    ]


SECTION = Section(name="cpu", run=run, figures=figures)
