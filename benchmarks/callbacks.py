"""Benchmark: how quickly Kling's callbacks resolve task handles, and the requests they save.

One run, one fake Kling server in a process of its own (``python -m
kling_async.testing``), the same number of tasks of the same duration in each of
four modes, one after the other:

``sdk_callbacks_confirm``
    ``Client(callbacks=CallbackReceiver(...))`` as shipped: a terminal callback is
    confirmed with one GET before the handle resolves.
``sdk_callbacks_no_confirm``
    the same with ``CallbackReceiver(confirm=False)``: the callback resolves at once.
``sdk_polling_only``
    ``Client()`` without a receiver, default ``PollPolicy``.
``baseline``
    a minimal hand-written aiohttp loop: a raw POST create with a ``callback_url``
    pointing at a bare aiohttp handler that resolves one ``asyncio.Future`` per
    task, with no verification of any kind.

Figures per mode, all measured in the benchmark's process:

* ``delivery_to_resolution``: from the moment a terminal callback request reaches
  the receiving aiohttp app (a middleware stamps it before the handler runs) to the
  moment the coroutine awaiting that task's handle (or future) wakes with it
  (``time.perf_counter``).
* ``task_end_to_resolution``: from the task's terminal ``updated_at`` on the
  server (wall clock, millisecond resolution; same machine) to that wake-up. This
  is what polling costs compared with callbacks.
* ``requests`` and ``requests_per_task``: the creates, gets (polls and confirming
  GETs) and lists the server counted (``GET /_fake/stats``) during the mode.
* ``client_cpu_ms_per_task`` and ``server_cpu_ms_per_task``: CPU time (user +
  system) of the benchmark's process and of the server's (from ``/proc``) during
  the mode, per task. CPU time, unlike latency, barely moves when other programs
  share the machine, so these are the steadiest figures on a busy one.

``ratios_sdk_over_baseline`` divides the SDK's figures by the baseline's.
Absolute times depend on the machine (and on whatever else runs on it: the load
average is recorded); the ratios are the figures to compare.

Creates are paced at ``--submit-rate`` per second (default 50; at most
``--submit-concurrency`` in flight), so every mode sees the same arrival rate of
creates and, one task duration later, of callbacks. The default keeps a 2-core
machine out of saturation, so latencies show the code path rather than a queue;
``--submit-rate 400`` (or ``0``: unpaced) shows how each mode behaves under a
burst. ``--rounds N`` runs every mode N times, in rotated order, and pools the
samples.

Run::

    python benchmarks/callbacks.py --tasks 1000   # about 90 s: 4 modes x (20 s + 3 s)
    python benchmarks/callbacks.py --tasks 50     # a quick check, about 15 s

It prints one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, NamedTuple

import aiohttp
from _common import (
    FakeServerProcess,
    cancel_on_termination,
    end_lag,
    machine_info,
    ratio,
    request_delta,
    run_and_print,
    summarize_ms,
)
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

import kling_async

API_KEY = "benchmark-token"
TERMINAL = frozenset(("succeed", "failed"))


class Outcome(NamedTuple):
    """One resolved task: its external id, when its waiter woke, and how long after
    the task ended on the server that was (seconds)."""

    external_task_id: str
    resolved_at: float
    end_lag: float


class CallbackClock:
    """Stamps callback requests as they reach the app, before any handler runs."""

    def __init__(self) -> None:
        self.received = 0
        #: external_task_id -> perf_counter of its first terminal callback.
        self.terminal: dict[str, float] = {}

    def middleware(self) -> Middleware:
        @web.middleware
        async def stamp(request: web.Request, handler: Handler) -> web.StreamResponse:
            arrived = time.perf_counter()
            self.received += 1
            body = await request.read()  # cached: the handler reads the same bytes
            external_task_id = request.match_info.get("external_task_id")
            with contextlib.suppress(ValueError, AttributeError):
                if external_task_id and json.loads(body).get("task_status") in TERMINAL:
                    self.terminal.setdefault(external_task_id, arrived)
            return await handler(request)

        return stamp


@contextlib.asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` on a free loopback port; yield its origin."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


TaskRun = Callable[[int, asyncio.Semaphore, list[float]], Coroutine[Any, Any, Outcome]]


@dataclasses.dataclass
class Tally:
    """One mode's figures, summed over rounds."""

    callbacks: bool
    tasks: int = 0
    completed: int = 0
    errors: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    requests: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    submit_s: list[float] = dataclasses.field(default_factory=list)
    elapsed_s: list[float] = dataclasses.field(default_factory=list)
    end_lags: list[float] = dataclasses.field(default_factory=list)
    latencies: list[float] = dataclasses.field(default_factory=list)
    client_cpu_s: float = 0.0
    server_cpu_s: float | None = 0.0
    callbacks_received: int = 0
    resolved_before_callback: int = 0
    resolved_without_callback: int = 0

    def add_clock(self, clock: CallbackClock, outcomes: list[Outcome]) -> None:
        """Pair each resolution with the arrival of its task's terminal callback."""
        self.callbacks_received += clock.received
        for outcome in outcomes:
            arrived = clock.terminal.get(outcome.external_task_id)
            if arrived is None:
                self.resolved_without_callback += 1
            elif arrived > outcome.resolved_at:
                self.resolved_before_callback += 1  # a poll got there first
            else:
                self.latencies.append(outcome.resolved_at - arrived)

    def figures(self) -> dict[str, Any]:
        tasks = max(self.tasks, 1)
        figures: dict[str, Any] = {
            "tasks": self.tasks,
            "completed": self.completed,
            "errors": dict(self.errors),
            "submit_s": self.submit_s,
            "elapsed_s": self.elapsed_s,
            "requests": {route: self.requests[route] for route in ("create", "get", "list")},
            "requests_per_task": round(sum(self.requests.values()) / tasks, 3),
            "client_cpu_ms_per_task": round(self.client_cpu_s / tasks * 1000, 3),
            "server_cpu_ms_per_task": (
                None if self.server_cpu_s is None else round(self.server_cpu_s / tasks * 1000, 3)
            ),
            "task_end_to_resolution": summarize_ms(self.end_lags),
        }
        if self.callbacks:
            figures["callbacks_received_per_task"] = round(self.callbacks_received / tasks, 3)
            figures["delivery_to_resolution"] = summarize_ms(self.latencies)
            figures["resolved_before_terminal_callback"] = self.resolved_before_callback
            figures["resolved_without_terminal_callback"] = self.resolved_without_callback
        return figures


async def drive(
    arguments: argparse.Namespace,
    fake: FakeServerProcess,
    tally: Tally,
    clock: CallbackClock | None,
    one: TaskRun,
) -> None:
    """Run ``one`` for ``--tasks`` tasks and add what happened to ``tally``.

    Task ``i`` is not submitted before ``i / --submit-rate`` seconds (unless the
    rate is 0), so every mode sees the same arrival rate of creates and, a task
    duration later, of callbacks.
    Creates in flight are bounded by ``--submit-concurrency``, the whole run by
    ``--phase-timeout``.
    """
    slots = asyncio.Semaphore(arguments.submit_concurrency)
    created: list[float] = []

    async def paced(index: int) -> Outcome:
        if arguments.submit_rate:
            await asyncio.sleep(index / arguments.submit_rate)
        return await one(index, slots, created)

    before = await fake.stats()
    server_cpu, client_cpu = fake.cpu_seconds(), time.process_time()
    started = time.perf_counter()
    jobs = [asyncio.create_task(paced(i)) for i in range(arguments.tasks)]
    try:
        done, pending = await asyncio.wait(jobs, timeout=arguments.phase_timeout)
    finally:  # at the deadline, or when the benchmark itself is cancelled
        elapsed = time.perf_counter() - started
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
    tally.client_cpu_s += time.process_time() - client_cpu
    server_cpu_after = fake.cpu_seconds()
    if server_cpu is None or server_cpu_after is None or tally.server_cpu_s is None:
        tally.server_cpu_s = None
    else:
        tally.server_cpu_s += server_cpu_after - server_cpu
    tally.requests.update(request_delta(before, await fake.stats()))

    outcomes: list[Outcome] = []
    for job in done:
        error = job.exception()
        if error is None:
            outcomes.append(job.result())
        else:
            tally.errors[type(error).__name__] += 1
    if pending:
        tally.errors["unfinished at --phase-timeout"] += len(pending)
    tally.tasks += arguments.tasks
    tally.completed += len(outcomes)
    tally.submit_s.append(round(max(created, default=started) - started, 3))
    tally.elapsed_s.append(round(elapsed, 3))
    tally.end_lags.extend(outcome.end_lag for outcome in outcomes)
    if clock is not None:
        tally.add_clock(clock, outcomes)


async def sdk_mode(
    arguments: argparse.Namespace,
    fake: FakeServerProcess,
    tally: Tally,
    receiver: kling_async.CallbackReceiver | None,
) -> None:
    """The SDK as a user runs it, with ``receiver`` mounted as an aiohttp sub-app."""
    clock = CallbackClock() if receiver is not None else None
    async with contextlib.AsyncExitStack() as stack:
        if receiver is not None and clock is not None:
            app = web.Application(middlewares=[clock.middleware()])
            app.add_subapp("/kling", receiver.aiohttp_app())
            receiver.public_url = await stack.enter_async_context(serve(app)) + "/kling"
            stack.push_async_callback(receiver.close)
        client = await stack.enter_async_context(
            kling_async.Client(API_KEY, base_url=fake.url, callbacks=receiver)
        )

        async def one(index: int, slots: asyncio.Semaphore, created: list[float]) -> Outcome:
            async with slots:
                handle = await client.images.generate(prompt=f"benchmark task {index}")
                created.append(time.perf_counter())
            task = await handle
            resolved_at = time.perf_counter()
            assert task.updated_at is not None
            assert handle.external_task_id is not None
            return Outcome(
                handle.external_task_id, resolved_at, end_lag(task.updated_at.timestamp() * 1000)
            )

        await drive(arguments, fake, tally, clock, one)


async def baseline_mode(
    arguments: argparse.Namespace, fake: FakeServerProcess, tally: Tally
) -> None:
    """The least a hand-written client can do: create with a callback_url, resolve a
    future when a terminal callback arrives. No checks, no retries, no fallback."""
    clock = CallbackClock()
    futures: dict[str, asyncio.Future[dict[str, Any]]] = {}

    async def on_callback(request: web.Request) -> web.Response:
        data = await request.json()
        future = futures.get(request.match_info["external_task_id"])
        if future is not None and not future.done() and data.get("task_status") in TERMINAL:
            future.set_result(data)
        return web.Response()

    app = web.Application(middlewares=[clock.middleware()])
    app.router.add_post("/cb/{external_task_id}", on_callback)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    create_url = f"{fake.url}/v1/images/generations"
    async with serve(app) as origin, aiohttp.ClientSession() as session:

        async def one(index: int, slots: asyncio.Semaphore, created: list[float]) -> Outcome:
            external_task_id = uuid.uuid4().hex
            future = futures[external_task_id] = asyncio.get_running_loop().create_future()
            body = {
                "model_name": "kling-v3",
                "prompt": f"benchmark task {index}",
                "external_task_id": external_task_id,
                "callback_url": f"{origin}/cb/{external_task_id}",
            }
            async with slots:
                async with session.post(create_url, json=body, headers=headers) as response:
                    envelope = await response.json()
                if envelope.get("code") != 0:
                    raise RuntimeError(f"create failed: {envelope}")
                created.append(time.perf_counter())
            data = await future
            return Outcome(external_task_id, time.perf_counter(), end_lag(data["updated_at"]))

        await drive(arguments, fake, tally, clock, one)


def ratios(modes: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """The SDK's figures over the baseline's."""
    base = modes["baseline"]
    out: dict[str, float | None] = {}
    for name in ("sdk_callbacks_confirm", "sdk_callbacks_no_confirm"):
        mode = modes[name]
        for stat in ("p50_ms", "p99_ms", "max_ms"):
            out[f"{name}.delivery_to_resolution.{stat}"] = ratio(
                mode["delivery_to_resolution"][stat], base["delivery_to_resolution"][stat]
            )
    for name in ("sdk_callbacks_confirm", "sdk_callbacks_no_confirm", "sdk_polling_only"):
        mode = modes[name]
        for figure in ("requests_per_task", "client_cpu_ms_per_task", "server_cpu_ms_per_task"):
            out[f"{name}.{figure}"] = ratio(mode[figure], base[figure])
        for stat in ("p50_ms", "p99_ms"):
            out[f"{name}.task_end_to_resolution.{stat}"] = ratio(
                mode["task_end_to_resolution"][stat], base["task_end_to_resolution"][stat]
            )
    return out


async def benchmark(arguments: argparse.Namespace) -> dict[str, Any]:
    cancel_on_termination()
    started = time.perf_counter()
    load_before = os.getloadavg()
    server_arguments = (
        "--task-duration",
        str(arguments.task_duration),
        "--processing-delay",
        str(arguments.processing_delay),
        "--api-key",
        API_KEY,
    )
    tallies = {
        "sdk_callbacks_confirm": Tally(callbacks=True),
        "sdk_callbacks_no_confirm": Tally(callbacks=True),
        "sdk_polling_only": Tally(callbacks=False),
        "baseline": Tally(callbacks=True),
    }
    async with FakeServerProcess(*server_arguments) as fake:
        runs: dict[str, Callable[[Tally], Awaitable[None]]] = {
            "sdk_callbacks_confirm": lambda tally: sdk_mode(
                arguments, fake, tally, kling_async.CallbackReceiver()
            ),
            "sdk_callbacks_no_confirm": lambda tally: sdk_mode(
                arguments, fake, tally, kling_async.CallbackReceiver(confirm=False)
            ),
            "sdk_polling_only": lambda tally: sdk_mode(arguments, fake, tally, None),
            "baseline": lambda tally: baseline_mode(arguments, fake, tally),
        }
        order = list(runs)
        for round_number in range(arguments.rounds):
            # Rotated each round, so a noisy spell on the machine hits every mode.
            shift = round_number % len(order)
            for name in order[shift:] + order[:shift]:
                print(
                    f"callbacks benchmark: round {round_number + 1}/{arguments.rounds}, "
                    f"{name}, {arguments.tasks} tasks",
                    file=sys.stderr,
                )
                await runs[name](tallies[name])
    modes = {name: tally.figures() for name, tally in tallies.items()}
    return {
        "benchmark": "callbacks",
        "parameters": {
            "tasks": arguments.tasks,
            "rounds": arguments.rounds,
            "task_duration_s": arguments.task_duration,
            "processing_delay_s": arguments.processing_delay,
            "submit_rate_per_s": arguments.submit_rate,
            "submit_concurrency": arguments.submit_concurrency,
            "phase_timeout_s": arguments.phase_timeout,
            "server": "python -m kling_async.testing, its own process, 127.0.0.1",
            "poll_policy": "PollPolicy() defaults",
        },
        "machine": {
            **machine_info(),
            "load_average_1m": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        },
        "modes": modes,
        "ratios_sdk_over_baseline": ratios(modes),
        "elapsed_s": round(time.perf_counter() - started, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--tasks", type=int, default=1000, help="tasks per mode (default 1000)")
    parser.add_argument(
        "--task-duration", type=float, default=3.0, help="seconds a task runs (default 3)"
    )
    parser.add_argument(
        "--processing-delay",
        type=float,
        default=0.5,
        help="seconds to 'processing' (default 0.5)",
    )
    parser.add_argument(
        "--submit-rate",
        type=float,
        default=50.0,
        help="creates per second (default 50); 0: as fast as --submit-concurrency allows",
    )
    parser.add_argument(
        "--submit-concurrency", type=int, default=50, help="creates in flight at once (default 50)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every mode this many times, in rotated order, and pool the figures",
    )
    parser.add_argument(
        "--phase-timeout", type=float, default=120.0, help="seconds each mode may take (120)"
    )
    arguments = parser.parse_args()
    if min(arguments.tasks, arguments.submit_concurrency, arguments.rounds) < 1:
        parser.error("--tasks, --submit-concurrency and --rounds must be at least 1")
    if arguments.submit_rate < 0:
        parser.error("--submit-rate must not be negative")
    return run_and_print(benchmark(arguments), "callbacks")


if __name__ == "__main__":
    sys.exit(main())
