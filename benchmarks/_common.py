"""Helpers the benchmarks share: the fake Kling server as a process of its own,
latency summaries, and a description of the machine the figures came from.

The fake runs apart from the code under test (``python -m kling_async.testing``)
so the two do not share one event loop and one core: what a benchmark measures in
its own process is the client's work, not the server's.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import math
import os
import platform
import signal
import sys
import time
from collections.abc import Coroutine, Mapping, Sequence
from types import TracebackType
from typing import Any

import aiohttp

import kling_async

__all__ = [
    "FakeServerProcess",
    "cancel_on_termination",
    "fetch_stats",
    "machine_info",
    "ratio",
    "request_delta",
    "run_and_print",
    "summarize_ms",
]

# Every benchmark measures a first run unless it says otherwise: no durations
# learned by earlier runs (the user's cache is neither read nor written; child
# processes inherit this). A section that measures a run with a history gives
# its client a cache file of its own (``Client(durations_cache=path)``).
os.environ["KLING_DURATIONS_CACHE"] = "off"

#: How long the fake may take to start listening before the benchmark gives up.
START_TIMEOUT = 30.0
#: How long it may take to stop on SIGTERM before it is killed.
STOP_TIMEOUT = 5.0


class FakeServerProcess:
    """``python -m kling_async.testing --port 0 ARGS...`` as an async context manager.

    The process is stopped when the block ends however it ends (SIGTERM, then
    SIGKILL after :data:`STOP_TIMEOUT`), and an ``atexit`` hook kills it should the
    interpreter exit without running the block's exit (``sys.exit`` from a signal
    handler, say). Only loopback is ever used: the fake binds 127.0.0.1, and it
    delivers callbacks to loopback URLs only.
    """

    def __init__(self, *arguments: str) -> None:
        self.arguments = ("--port", "0", *arguments)
        self.url = ""
        self._process: asyncio.subprocess.Process | None = None
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> FakeServerProcess:
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "kling_async.testing",
            *self.arguments,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
        )
        atexit.register(self._kill)
        try:
            assert self._process.stdout is not None
            line = await asyncio.wait_for(self._process.stdout.readline(), START_TIMEOUT)
            if not line:
                raise RuntimeError(f"the fake server exited with {await self._process.wait()}")
            self.url = str(json.loads(line)["url"])
            self._session = aiohttp.ClientSession()
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._stop()

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    async def stats(self) -> dict[str, Any]:
        """The server's ``GET /_fake/stats`` (:func:`fetch_stats`)."""
        assert self._session is not None
        return await fetch_stats(self._session, self.url)

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system) the server process has used, from ``/proc``;
        ``None`` where there is no ``/proc``. Unlike wall-clock figures, it barely
        moves when other programs load the machine."""
        try:
            with open(f"/proc/{self.pid}/stat", encoding="ascii") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            return None
        # After the command name: state is field 3, utime 14 and stime 15 (1-based).
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def _stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        process = self._process
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        atexit.unregister(self._kill)

    def _kill(self) -> None:
        process = self._process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)


async def fetch_stats(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """``GET /_fake/stats`` of the fake server at ``url`` (it counts itself under ``other``)."""
    async with session.get(f"{url}/_fake/stats") as response:
        response.raise_for_status()
        stats: dict[str, Any] = await response.json()
        return stats


def cancel_on_termination() -> None:
    """Make SIGTERM and SIGHUP cancel the running task, as Ctrl-C does under
    ``asyncio.run``, so ``finally`` blocks (stopping the fake server) still run."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, task.cancel)


def run_and_print(benchmark: Coroutine[Any, Any, dict[str, Any]], name: str) -> int:
    """Run ``benchmark`` and print the JSON object it returns; the exit status: 0,
    or 130 (said on stderr) when Ctrl-C, SIGTERM or SIGHUP stopped it."""
    try:
        result = asyncio.run(benchmark)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"{name} benchmark: interrupted", file=sys.stderr, flush=True)
        return 130
    print(json.dumps(result, indent=2))
    return 0


def request_delta(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, int]:
    """API requests (create, get, list) the server counted between two stats snapshots."""
    return {
        route: int(after["requests"][route]) - int(before["requests"][route])
        for route in ("create", "get", "list")
    }


def _nearest_rank(ordered: Sequence[float], fraction: float) -> float:
    index = max(0, math.ceil(fraction * len(ordered)) - 1)
    return ordered[index]


def summarize_ms(seconds: Sequence[float]) -> dict[str, float | int | None]:
    """Count, p50, p99 (nearest rank), mean and max of durations, in milliseconds."""
    if not seconds:
        return {"count": 0, "p50_ms": None, "p99_ms": None, "mean_ms": None, "max_ms": None}
    ordered = sorted(seconds)
    return {
        "count": len(ordered),
        "p50_ms": round(_nearest_rank(ordered, 0.50) * 1000, 3),
        "p99_ms": round(_nearest_rank(ordered, 0.99) * 1000, 3),
        "mean_ms": round(sum(ordered) / len(ordered) * 1000, 3),
        "max_ms": round(ordered[-1] * 1000, 3),
    }


def end_lag(updated_at_ms: float) -> float:
    """Seconds from a task's terminal ``updated_at`` (Unix ms, Kling's clock,
    here the same machine's) to now."""
    return time.time() - updated_at_ms / 1000


def ratio(numerator: float | int | None, denominator: float | int | None) -> float | None:
    """``numerator / denominator`` to 3 decimals, or ``None`` if either is missing or 0."""
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


def machine_info() -> dict[str, Any]:
    """Where the figures were measured."""
    affinity = getattr(os, "sched_getaffinity", None)
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(affinity(0)) if affinity is not None else None,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "aiohttp": aiohttp.__version__,
        "kling_async": kling_async.__version__,
    }
