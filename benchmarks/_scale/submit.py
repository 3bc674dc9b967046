"""Section ``submit``: creates per second, ``submit_concurrency`` in flight,
``submit_creates`` per round, rounds alternating."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from _baselines import RawKling, submit_many
from _common import FakeServerProcess

import kling_async
from _scale.figures import Figure, Goal, Section, unmeasured
from _scale.measure import Window, alternate, medians, server_args, warm_then_measure
from _scale.params import API_KEY, PROMPT, Params


async def run(p: Params) -> dict[str, Any]:
    count, width = p.submit_creates, p.submit_concurrency
    async with FakeServerProcess(*server_args(None, 3600.0)) as fake:

        async def sdk_side() -> dict[str, Any]:
            async with kling_async.Client(API_KEY, base_url=fake.url) as client:

                async def create(_index: int) -> None:
                    await client.images.generate(prompt=PROMPT)

                window = await warm_then_measure(fake, create, count, width)
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

        rounds = await alternate("submit", p.submit_rounds, sdk_side, raw_side)
    return {"creates_per_s": medians(rounds, "creates_per_s"), "rounds": rounds}


#: Issue 6: at least 90 % of the baseline's creates per second.
GOAL = Goal(judges="ratio", op=">=", limit=0.9)
NAME = "submit_creates_per_s"


def figures(p: Params, result: Mapping[str, Any]) -> list[Figure]:
    if "creates_per_s" not in result:
        return unmeasured(result, (NAME, GOAL))
    measured = result["creates_per_s"]
    return [
        Figure(
            name=NAME, goal=GOAL, sdk=measured["sdk_median"], baseline=measured["baseline_median"]
        )
    ]


SECTION = Section(name="submit", run=run, figures=figures)
