"""Section ``inflight``: what polling costs per task with ``inflight_tasks`` in
flight (issue 26), for each duration of ``inflight_durations``. The SDK with
DEFAULT settings (no ``PollPolicy``) against the hand-written loop that GETs each
task every ``inflight_baseline_interval`` s, in alternating rounds of the same
process, on a fresh fake per duration. A third side, ``create_only``, runs the
loop's creates alone (no poll; the task's time slept) in the same pattern: what
a hand-written create costs against the loop's whole task, the least any client
that creates its tasks can spend.

Beside client CPU per completed task (creates and polls), the SDK's own counts
of its pollers' work per completed task, which do not depend on the machine:

- ``parsed``: tasks structured from poll answers (a list item whose status and
  ``updated_at`` are what the client knows is skipped before that: one per
  status change, ``processing`` and the end, is the least there is);
- ``planned``: next polls planned (the schedule asked);
- ``list_items``: list items decoded, at most ``SWEEP_ITEMS_PER_SECOND`` a second.

The counts come from the pollers' counters (``Poller.parsed`` and friends), read
through the client's private tracker: a benchmark may look inside.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from _baselines import RawKling, create_and_poll, create_body, fixed_delay
from _common import FakeServerProcess, end_lag, ratio, summarize_ms

import kling_async
from _scale.figures import DEFAULT, Figure, Goal, Section, unmeasured
from _scale.measure import (
    Window,
    alternate,
    median,
    medians,
    of_side,
    progress,
    rounded,
    server_args,
    task_end_lag,
)
from _scale.params import API_KEY, PROMPT, Params

#: The side measuring the loop's creates alone (context for the CPU goal).
FLOOR = "create_only"

#: The pollers' counters reported per completed task.
COUNTERS = ("parsed", "planned", "list_items", "list_pages", "gets")


def poller_counts(client: kling_async.Client) -> dict[str, int]:
    """The sum of every poller's counters of ``client``."""
    pollers = client._tracker._pollers.values()
    return {name: sum(getattr(poller, name) for poller in pollers) for name in COUNTERS}


async def run(p: Params) -> dict[str, Any]:
    durations = [float(d) for d in p.inflight_durations.split(",") if d.strip()]
    return {"durations": [await at_duration(p, duration) for duration in durations]}


async def at_duration(p: Params, duration: float) -> dict[str, Any]:
    stagger = duration / p.inflight_tasks

    async def drive(
        fake: FakeServerProcess, one: Callable[[], Awaitable[float]]
    ) -> tuple[Window, int, list[float]]:
        latencies: list[float] = []

        async def worker(index: int) -> None:
            # Staggered starts: a steady inflight_tasks in flight, not waves.
            await asyncio.sleep(index * stagger)
            for _ in range(p.inflight_lifecycles):
                latencies.append(await one())

        async with Window(fake).measure() as window:
            await asyncio.gather(*(worker(i) for i in range(p.inflight_tasks)))
        return window, len(latencies), latencies

    async with FakeServerProcess(*server_args(duration, p.inflight_processing_delay)) as fake:

        async def sdk_side() -> dict[str, Any]:
            async with kling_async.Client(API_KEY, base_url=fake.url) as client:

                async def one() -> float:
                    handle = await client.images.generate(prompt=PROMPT)
                    return task_end_lag(await handle)

                window, completed, lags = await drive(fake, one)
                counts = poller_counts(client)
            return {
                "side": "sdk",
                **row(window, completed, lags),
                "per_task": {k: round(v / max(completed, 1), 3) for k, v in counts.items()},
            }

        async def raw_side() -> dict[str, Any]:
            interval = p.inflight_baseline_interval
            phases = random.Random(26)
            async with RawKling(fake.url, API_KEY) as raw:

                async def one() -> float:
                    # A first poll drawn in (0, interval]: the loop cannot know
                    # the duration, so ends fall at any phase of its polls.
                    first = phases.uniform(0, interval)
                    data = await create_and_poll(
                        raw, create_body(PROMPT), fixed_delay(interval), first=first
                    )
                    return end_lag(data["updated_at"])

                window, completed, lags = await drive(fake, one)
            return {"side": "baseline", **row(window, completed, lags)}

        async def create_only_side() -> dict[str, Any]:
            async with RawKling(fake.url, API_KEY) as raw:

                async def one() -> float:
                    # The loop's create alone, then the task's time without a poll.
                    await raw.created(create_body(PROMPT))
                    await asyncio.sleep(duration)
                    return 0.0

                window, completed, lags = await drive(fake, one)
            return {"side": FLOOR, **row(window, completed, lags)}

        progress(f"inflight: {p.inflight_tasks} in flight, {duration:g} s tasks")
        rounds = await alternate(
            f"inflight {duration:g}s", p.inflight_rounds, sdk_side, raw_side, create_only_side
        )
    sdk_rows = of_side(rounds, "sdk", "per_task")
    return {
        "task_duration_s": duration,
        "client_cpu_ms_per_task": medians(rounds, "client_cpu_ms", 4),
        "create_only_cpu_ms_per_task": rounded(median(of_side(rounds, FLOOR, "client_cpu_ms")), 4),
        "per_round_ratios": [
            round(s / b, 3) if b else None
            for s, b in zip(
                of_side(rounds, "sdk", "client_cpu_ms"),
                of_side(rounds, "baseline", "client_cpu_ms"),
                strict=True,
            )
        ],
        "sdk_per_task": {
            name: round(sum(r[name] for r in sdk_rows) / len(sdk_rows), 3) for name in COUNTERS
        },
        "rounds": rounds,
    }


def row(window: Window, completed: int, lags: list[float]) -> dict[str, Any]:
    return {
        "completed": completed,
        "wall_s": round(window.wall_s, 3),
        "client_cpu_ms": round(window.cpu_s / max(completed, 1) * 1000, 4),
        "requests_per_task": round(sum(window.requests.values()) / max(completed, 1), 4),
        "detection_latency": summarize_ms(lags),
    }


#: Issue 26: client CPU per task at most 0.3 of the 1 s loop's, default settings.
CPU_GOAL = Goal(judges="ratio", op="<=", limit=0.3, more="(issue 26)")
#: Issue 26: at most 1.5 structurings of a task from poll answers, on average.
PARSE_GOAL = Goal(
    judges="sdk",
    op="<=",
    limit=1.5,
    subject="tasks structured from polls per task",
    more="(issue 26)",
)


def figures(p: Params, result: Mapping[str, Any]) -> list[Figure]:
    points = result.get("durations", [])
    if not points:
        return unmeasured(
            result,
            ("client_cpu_per_task_inflight", CPU_GOAL),
            ("structurings_per_task_inflight", PARSE_GOAL),
        )
    found: list[Figure] = []
    for point in points:
        tag = f"{p.inflight_tasks}_in_flight_{point['task_duration_s']:g}s"
        cpu = point["client_cpu_ms_per_task"]
        per_task = point["sdk_per_task"]
        found.append(
            Figure(
                name=f"client_cpu_per_task_{tag}",
                goal=CPU_GOAL,
                sdk=cpu["sdk_median"],
                baseline=cpu["baseline_median"],
                settings=DEFAULT,
                context={
                    "per_round_ratios": point["per_round_ratios"],
                    "baseline_poll_interval_s": p.inflight_baseline_interval,
                    "create_only_cpu_ms": point.get("create_only_cpu_ms_per_task"),
                    "create_only_ratio": ratio(
                        point.get("create_only_cpu_ms_per_task"), cpu["baseline_median"]
                    ),
                },
                note="client CPU ms per completed task (create and polls), medians of rounds; "
                "create_only: the loop's creates alone, no poll, in the same pattern (context: "
                "what one hand-written create costs against the loop's whole task)",
            )
        )
        found.append(
            Figure(
                name=f"structurings_per_task_{tag}",
                goal=PARSE_GOAL,
                sdk=per_task["parsed"],
                settings=DEFAULT,
                context={"sdk_per_task": per_task},
                note="per completed task, the create's own structuring not counted: "
                "parsed (tasks structured from poll answers), planned (next polls "
                "planned), list_items (decoded), list_pages, gets",
            )
        )
    return found


SECTION = Section(name="inflight", run=run, figures=figures)
