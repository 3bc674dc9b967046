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
from _scale.measure import alternate, median, medians, of_side, server_args, warm_then_measure
from _scale.params import API_KEY, PROMPT, Params


async def run(p: Params) -> dict[str, Any]:
    interval, count = p.cpu_poll_interval, p.cpu_lifecycles
    # Tuned to send what the baseline sends: a fixed interval, one GET per poll.
    policy = kling_async.PollPolicy(
        initial_delay=interval, max_delay=interval, jitter=0.0, learn=False, list_sweeps=False
    )
    async with FakeServerProcess(*server_args(p.cpu_task_duration, p.cpu_processing_delay)) as fake:

        async def sdk_side() -> dict[str, Any]:
            async with kling_async.Client(API_KEY, base_url=fake.url, polling=policy) as client:

                async def lifecycle(_index: int) -> None:
                    handle = await client.images.generate(prompt=PROMPT)
                    await handle

                window = await warm_then_measure(fake, lifecycle, count, p.cpu_in_flight)
            return {"side": "sdk", "wall_s": round(window.wall_s, 3), **window.per(count)}

        async def raw_side() -> dict[str, Any]:
            delay = fixed_delay(interval)
            async with RawKling(fake.url, API_KEY) as raw:

                async def lifecycle(_index: int) -> None:
                    await create_and_poll(raw, create_body(PROMPT), delay)

                window = await warm_then_measure(fake, lifecycle, count, p.cpu_in_flight)
            return {"side": "baseline", "wall_s": round(window.wall_s, 3), **window.per(count)}

        rounds = await alternate("cpu", p.cpu_rounds, sdk_side, raw_side)
    per_round = [
        ratio(sdk, baseline)
        for sdk, baseline in zip(
            of_side(rounds, "sdk", "client_cpu_ms"),
            of_side(rounds, "baseline", "client_cpu_ms"),
            strict=True,
        )
    ]

    def requests_of(side: str) -> dict[str, float]:
        rows = of_side(rounds, side, "requests")
        return {k: round(statistics.fmean(row[k] for row in rows), 4) for k in rows[0]}

    sdk_requests, raw_requests = requests_of("sdk"), requests_of("baseline")
    matched = all(
        abs(sdk_requests[route] - raw_requests[route]) <= 0.02 * max(raw_requests[route], 1)
        for route in sdk_requests
    )
    return {
        "client_cpu_ms_per_lifecycle": {
            **medians(rounds, "client_cpu_ms", 4),
            "per_round_ratios": per_round,
            "median_of_round_ratios": median([r for r in per_round if r is not None]),
            "user_only": medians(rounds, "client_user_ms", 4),
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
    measured = result["client_cpu_ms_per_lifecycle"]
    return [
        Figure(
            name=NAME,
            goal=GOAL,
            sdk=measured["sdk_median"],
            baseline=measured["baseline_median"],
            settings=tuned("both sides one GET every cpu_poll_interval s"),
            conditions={"requests_match": result["requests_match"]},
            context={
                "requests_match": result["requests_match"],
                "requests_per_lifecycle": result["requests_per_lifecycle"],
            },
        )
    ]


SECTION = Section(name="cpu", run=run, figures=figures)
