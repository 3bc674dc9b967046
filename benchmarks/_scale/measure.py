"""What the scale benchmark's sections share to measure: a window of client and
server figures, a tally of what the SDK logs, work run so many at a time, and
the child processes the memory and lag sections measure in."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
from _common import FakeServerProcess, end_lag, fetch_stats, ratio, request_delta

import kling_async
from _scale.params import API_KEY

__all__ = [
    "FakeStats",
    "LogTally",
    "SIDES",
    "Side",
    "Window",
    "alternate",
    "await_handle",
    "cancel_all",
    "each_side_in_a_child",
    "in_parallel",
    "median",
    "medians",
    "of_side",
    "proc_status_mb",
    "progress",
    "rounded",
    "server_args",
    "task_end_lag",
    "warm_then_measure",
]

#: The command line the memory and lag sections run their sides in (``--worker``).
SCRIPT = str(Path(__file__).resolve().parent.parent / "scale.py")
#: Both sides of a comparison, as each row of a section's JSON names them.
SIDES = ("sdk", "baseline")

Side = Callable[[], Awaitable[dict[str, Any]]]
"""One side's measurement of one round: a row of the section's ``rounds``."""


def progress(message: str) -> None:
    print(f"scale benchmark: {message}", file=sys.stderr, flush=True)


def server_args(duration: float | None, processing_delay: float, *extra: str) -> tuple[str, ...]:
    return (
        "--task-duration",
        "none" if duration is None else str(duration),
        "--processing-delay",
        str(processing_delay),
        "--api-key",
        API_KEY,
        *extra,
    )


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


async def in_parallel(count: int, width: int, job: Callable[[int], Awaitable[None]]) -> None:
    """Run ``job(0) .. job(count - 1)``, ``width`` at a time."""
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < count:
            index = next_index
            next_index += 1
            await job(index)

    await asyncio.gather(*(worker() for _ in range(min(width, count))))


def proc_status_mb(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MB."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


class LogTally(logging.Handler):
    """Counts warnings and errors the SDK (and asyncio) log while a section runs."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: dict[str, int] = {}
        self.samples: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        key = f"{record.name}:{record.levelname}"
        self.counts[key] = self.counts.get(key, 0) + 1
        if len(self.samples) < 5:
            self.samples.append(record.getMessage()[:300])

    @contextlib.contextmanager
    def watching(self) -> Iterator[LogTally]:
        loggers = [logging.getLogger("kling_async"), logging.getLogger("asyncio")]
        for logger in loggers:
            logger.addHandler(self)
        try:
            yield self
        finally:
            for logger in loggers:
                logger.removeHandler(self)

    def report(self) -> dict[str, Any]:
        return {"counts": self.counts, "samples": self.samples}


@dataclasses.dataclass
class Window:
    """Client CPU, wall time, server CPU and server request counts over a block."""

    fake: FakeServerProcess
    cpu_s: float = 0.0
    user_s: float = 0.0
    sys_s: float = 0.0
    wall_s: float = 0.0
    server_cpu_s: float | None = None
    requests: dict[str, int] = dataclasses.field(default_factory=dict)
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)

    @contextlib.asynccontextmanager
    async def measure(self) -> AsyncIterator[Window]:
        before = await self.fake.stats()
        server_cpu = self.fake.cpu_seconds()
        cpu, wall, times = time.process_time(), time.perf_counter(), os.times()
        try:
            yield self
        finally:
            self.cpu_s = time.process_time() - cpu
            self.wall_s = time.perf_counter() - wall
            after = os.times()
            self.user_s, self.sys_s = after.user - times.user, after.system - times.system
            server_after = self.fake.cpu_seconds()
            if server_cpu is not None and server_after is not None:
                self.server_cpu_s = server_after - server_cpu
            self.stats = await self.fake.stats()
            self.requests = request_delta(before, self.stats)

    def per(self, count: int) -> dict[str, Any]:
        count = max(count, 1)
        return {
            "client_cpu_ms": round(self.cpu_s / count * 1000, 4),
            "client_user_ms": round(self.user_s / count * 1000, 4),
            "client_sys_ms": round(self.sys_s / count * 1000, 4),
            "server_cpu_ms": rounded(
                None if self.server_cpu_s is None else self.server_cpu_s / count * 1000, 4
            ),
            "requests": {route: round(n / count, 4) for route, n in self.requests.items()},
        }


async def warm_then_measure(
    fake: FakeServerProcess, job: Callable[[int], Awaitable[None]], count: int, width: int
) -> Window:
    """Run ``job`` ``width`` times to warm up (the session and its connections
    exist), then ``count`` times, ``width`` at a time, in a measured window."""
    await in_parallel(width, width, job)
    async with Window(fake).measure() as window:
        await in_parallel(count, width, job)
    return window


async def alternate(section: str, rounds: int, *sides: Side) -> list[dict[str, Any]]:
    """Each side's row of each round, the order of the sides turned by one each
    round (the SDK first in odd rounds and the baseline first in even ones, for
    two), so none always runs on a warmer machine."""
    rows: list[dict[str, Any]] = []
    for number in range(rounds):
        turn = number % len(sides)
        for side in (*sides[turn:], *sides[:turn]):
            progress(f"{section} round {number + 1}/{rounds}: {side.__name__}")
            rows.append({"round": number + 1, **await side()})
    return rows


def of_side(rows: list[dict[str, Any]], side: str, key: str) -> list[Any]:
    """``key`` of each of one side's rows (``side`` is ``sdk`` or ``baseline``)."""
    return [row[key] for row in rows if row["side"] == side]


def medians(rows: list[dict[str, Any]], key: str, digits: int | None = None) -> dict[str, Any]:
    """Each side's median of ``key`` over its rows (rounded to ``digits`` where
    given) and the ratio of the two."""
    sdk, baseline = (median(of_side(rows, side, key)) for side in SIDES)
    return {
        "sdk_median": sdk if digits is None else rounded(sdk, digits),
        "baseline_median": baseline if digits is None else rounded(baseline, digits),
        "ratio_of_medians": ratio(sdk, baseline),
    }


def task_end_lag(task: kling_async.Task) -> float:
    assert task.updated_at is not None
    return end_lag(task.updated_at.timestamp() * 1000)


async def await_handle(handle: kling_async.TaskHandle) -> kling_async.Task:
    return await handle  # as users do: the default wait deadline applies


async def cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until they have all ended."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def each_side_in_a_child(
    worker: str, handles: int, processing_delay: float, timeout: float, *options: str
) -> dict[str, Any]:
    """Run ``scale.py --worker=WORKER --side=SIDE ... OPTIONS`` for each side, each
    against a fresh fake server whose tasks never end; return each side's JSON."""
    sides: dict[str, Any] = {}
    for side in SIDES:
        progress(f"{worker}: {side}, {handles} tasks in flight (child process)")
        async with FakeServerProcess(*server_args(None, processing_delay)) as fake:
            arguments = [f"--worker={worker}", f"--side={side}", f"--url={fake.url}"]
            sides[side] = await _run_child([*arguments, f"--handles={handles}", *options], timeout)
    return sides


async def _run_child(arguments: list[str], timeout: float) -> dict[str, Any]:
    """Run ``scale.py --worker ...`` and return the JSON it prints; kill it on timeout."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        SCRIPT,
        *arguments,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise
    lines = out.decode().strip().splitlines()
    if process.returncode != 0 or not lines:
        return {"error": f"worker exited with {process.returncode}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


class FakeStats:
    """``GET /_fake/stats`` of a server another process started."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> FakeStats:
        self._session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def stats(self) -> dict[str, Any]:
        assert self._session is not None
        return await fetch_stats(self._session, self.url)
