"""Section ``submit``: creates per second, ``submit_concurrency`` in flight,
``submit_creates`` per round, rounds alternating."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from _baselines import RawKling, submit_many
from _common import FakeServerProcess, ratio

import kling_async
from _scale.figures import Figure, Goal, Section, unmeasured
from _scale.measure import Window, in_parallel, median, progress, server_args
from _scale.params import API_KEY, PROMPT, Params


async def run(p: Params) -> dict[str, Any]:
    count, width = p.submit_creates, p.submit_concurrency
    rounds: list[dict[str, Any]] = []
    async with FakeServerProcess(*server_args(None, 3600.0)) as fake:

        async def sdk_side() -> dict[str, Any]:
            async with kling_async.Client(API_KEY, base_url=fake.url) as client:

                async def create(_index: int) -> None:
                    await client.images.generate(prompt=PROMPT)

                await in_parallel(width, width, create)
                async with Window(fake).measure() as window:
                    await in_parallel(count, width, create)
            accepted = window.requests["create"]
            return {"side": "sdk", "accepted": accepted, **rates(window, count)}

        async def raw_side() -> dict[str, Any]:
            async with RawKling(fake.url, API_KEY) as raw:
                await submit_many(raw, width, width, PROMPT)
                async with Window(fake).measure() as window:
                    accepted = await submit_many(raw, count, width, PROMPT)
            return {"side": "baseline", "accepted": accepted, **rates(window, count)}

        def rates(window: Window, n: int) -> dict[str, Any]:
            return {
                "creates_per_s": round(n / window.wall_s, 1),
                "wall_s": round(window.wall_s, 3),
                **window.per(n),
            }

        for number in range(p.submit_rounds):
            sides = (sdk_side, raw_side) if number % 2 == 0 else (raw_side, sdk_side)
            for side in sides:
                progress(f"submit round {number + 1}/{p.submit_rounds}: {side.__name__}")
                rounds.append({"round": number + 1, **await side()})
    sdk = [r["creates_per_s"] for r in rounds if r["side"] == "sdk"]
    raw = [r["creates_per_s"] for r in rounds if r["side"] == "baseline"]
    return {
        "creates_per_s": {
            "sdk_median": median(sdk),
            "baseline_median": median(raw),
            "ratio_of_medians": ratio(median(sdk), median(raw)),
        },
        "rounds": rounds,
    }


#: Issue 6: at least 90 % of the baseline's creates per second.
GOAL = Goal(judges="ratio", op=">=", limit=0.9)
NAME = "submit_creates_per_s"


def figures(p: Params, result: Mapping[str, Any]) -> list[Figure]:
    if "creates_per_s" not in result:
        return unmeasured(result, (NAME, GOAL))
    medians = result["creates_per_s"]
    return [
        Figure(name=NAME, goal=GOAL, sdk=medians["sdk_median"], baseline=medians["baseline_median"])
    ]


SECTION = Section(name="submit", run=run, figures=figures)
