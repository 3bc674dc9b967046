"""Benchmark: kling_async at scale, against hand-written raw-aiohttp loops (issue #6).

One run prints one JSON object. Every figure is measured twice in the same run,
against the same kind of fake Kling server (``python -m kling_async.testing``, a
process of its own, 127.0.0.1 only): once with the SDK and once with a minimal
hand-written aiohttp loop doing the same job (``_baselines.py``). On shared
machines absolute numbers are noise; the ratios, and the figures that do not
depend on the machine's speed (requests, utilisation, bytes), are what count.

Sections (``--only`` picks some), each a module of ``_scale/`` whose docstring
describes it:

``cpu``
    client CPU per task lifecycle, both sides polling alike (TUNED);
``requests``
    requests and client CPU per completed task, 1,000 in flight (DEFAULT);
``inflight``
    client CPU, structurings and planned polls per task, 1,000 in flight,
    3 s and 10 s tasks (DEFAULT, issue 26);
``utilisation``
    the account's quota used while a batch is queued (DEFAULT, and TUNED rows);
``memory``
    tracemalloc bytes per in-flight awaited handle;
``lag``
    event-loop lag and RSS with 10,000 tasks in flight;
``submit``
    creates per second.

Run::

    python benchmarks/scale.py            # the full run, about 27 minutes on 2 cores
    python benchmarks/scale.py --quick    # a smoke run, about 2 minutes

Progress goes to stderr. Every section has a hard timeout; the fake servers and
child processes are stopped on exit however the run ends.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

from _common import cancel_on_termination, machine_info, run_and_print
from _scale import cpu, inflight, lag, memory, requests, submit, utilisation
from _scale.figures import Section
from _scale.measure import SIDES, LogTally
from _scale.params import Params, with_overrides

#: Every section, in the order of the JSON's ``figures``.
SECTIONS: dict[str, Section] = {
    module.SECTION.name: module.SECTION
    for module in (cpu, requests, inflight, utilisation, memory, lag, submit)
}
#: The sections that measure each side in a child process (``--worker``).
WORKERS = {name: section.worker for name, section in SECTIONS.items() if section.worker}


def headline(p: Params, sections: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON's ``figures``: every section's figures (or, where it measured
    nothing, the figures it would have given, not met) rendered in turn."""
    return {
        figure.name: figure.render()
        for section in SECTIONS.values()
        for figure in section.figures(p, sections.get(section.name, {}))
    }


async def benchmark(p: Params, only: list[str], quick: bool) -> dict[str, Any]:
    cancel_on_termination()
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    sections: dict[str, Any] = {}
    for name in only:
        timeout = getattr(p, f"timeout_{name}")
        logs = LogTally()
        section_started = time.perf_counter()
        with logs.watching():
            try:
                result = await asyncio.wait_for(SECTIONS[name].run(p), timeout)
            except asyncio.TimeoutError:
                result = {"error": f"hard timeout after {timeout:.0f} s"}
            except Exception as error:
                logging.getLogger("scale").exception("section %s failed", name)
                result = {"error": f"{type(error).__name__}: {error}"}
        result["section_s"] = round(time.perf_counter() - section_started, 1)
        result["logged"] = logs.report()
        sections[name] = result
    figures = headline(p, sections)
    return {
        "benchmark": "scale",
        "mode": "quick" if quick else "full",
        "figures": figures,
        "all_met": all(f["met"] for f in figures.values()),
        "machine": {
            **machine_info(),
            "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        },
        "parameters": {
            **dataclasses.asdict(p),
            "sections": only,
            "server": "python -m kling_async.testing, its own process, 127.0.0.1, "
            "a fresh one per section (per run in utilisation, memory and lag)",
        },
        "sections": sections,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override one parameter, e.g. --set req_baseline_interval=0.5 (repeatable)",
    )
    # The child-process side of the memory and lag sections.
    parser.add_argument("--worker", choices=tuple(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--handles", type=int, default=10_000, help=argparse.SUPPRESS)
    parser.add_argument("--settle", type=float, default=3.0, help=argparse.SUPPRESS)
    parser.add_argument("--window", type=float, default=20.0, help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=64, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.worker is not None:
        print(json.dumps(asyncio.run(WORKERS[arguments.worker](arguments))))
        return 0
    only = [name.strip() for name in arguments.only.split(",") if name.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    params = Params.quick() if arguments.quick else Params()
    try:
        params = with_overrides(params, arguments.set)
    except ValueError as error:
        parser.error(str(error))
    return run_and_print(benchmark(params, only, arguments.quick), "scale")


if __name__ == "__main__":
    sys.exit(main())
