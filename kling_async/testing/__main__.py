"""``python -m kling_async.testing``: run a FakeKlingServer as its own process.

Benchmarks run the fake apart from the client they measure, so the two do not
share one event loop and one core. The process prints ``{"url": ...}`` as one
JSON line once it listens and runs until SIGINT or SIGTERM; other processes read
its figures from ``GET /_fake/stats``. With ``--exit-with-stdin`` it also stops
when its standard input closes, so a parent that is killed outright (SIGKILL)
cannot leave it running: start it with ``stdin=subprocess.PIPE``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import sys
import threading
from collections.abc import Callable, Sequence

from ._options import RateLimit
from ._server import FakeKlingServer
from ._tasks import FakeTask

#: Distributions ``--task-duration`` draws each task's length from.
DISTRIBUTIONS = ("uniform", "loguniform")

TaskDuration = float | tuple[str, float, float] | None


def _rate_limit(text: str) -> RateLimit:
    requests_text, _, period_text = text.partition("/")
    try:
        return RateLimit(int(requests_text), float(period_text) if period_text else 1.0)
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"expected REQUESTS/SECONDS such as 100/1, got {text!r} ({error})"
        ) from None


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds < math.inf:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return seconds


def _duration(text: str) -> TaskDuration:
    if text.lower() in ("none", "never"):
        return None
    kind, _, bounds = text.partition(":")
    if kind not in DISTRIBUTIONS:
        return float(text)
    low_text, _, high_text = bounds.partition(":")
    try:
        low, high = float(low_text), float(high_text)
    except ValueError:
        low = high = math.nan
    if not 0 < low <= high:
        raise argparse.ArgumentTypeError(
            f"expected {kind}:LOW:HIGH with 0 < LOW <= HIGH seconds, got {text!r}"
        )
    return (kind, low, high)


def _drawn(duration: TaskDuration, seed: int | None) -> float | Callable[[FakeTask], float] | None:
    """The server's ``task_duration``: a number, ``None``, or one draw per task."""
    if not isinstance(duration, tuple):
        return duration
    kind, low, high = duration
    rng = random.Random(None if seed is None else f"durations:{seed}")
    if kind == "uniform":
        return lambda _task: rng.uniform(low, high)
    # Log-uniform: as many tasks between 5 and 10 s as between 10 and 20 s; its
    # median is the geometric mean of the bounds.
    return lambda _task: math.exp(rng.uniform(math.log(low), math.log(high)))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kling_async.testing",
        description="Run a fake Kling API server on 127.0.0.1 until SIGINT/SIGTERM.",
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port; 0 picks a free one")
    parser.add_argument(
        "--task-duration",
        type=_duration,
        default=0.2,
        help="seconds from create to the end of a task, or 'none' (only finish() ends them), "
        "or a distribution each task draws its own from: 'uniform:LOW:HIGH' or "
        "'loguniform:LOW:HIGH' (median sqrt(LOW*HIGH), e.g. loguniform:5:20 has median 10); "
        "--seed makes the draws repeatable (default 0.2)",
    )
    parser.add_argument(
        "--processing-delay",
        type=float,
        default=0.05,
        help="seconds from create to 'processing' (default 0.05)",
    )
    parser.add_argument(
        "--create-delay",
        type=_seconds,
        default=0.0,
        help="answer every create this many seconds late, as a remote API is slower than "
        "loopback (default 0)",
    )
    parser.add_argument("--concurrency-limit", type=int, default=None, help="quota in units")
    parser.add_argument(
        "--rate-limit", type=_rate_limit, default=None, help="REQUESTS/SECONDS, e.g. 100/1"
    )
    parser.add_argument("--api-key", default=None, help="require this bearer token")
    parser.add_argument("--path-prefix", default="", help="serve /v1 under this prefix")
    parser.add_argument("--seed", type=int, default=None, help="seed for random choices")
    parser.add_argument(
        "--exit-with-stdin",
        action="store_true",
        help="also stop when standard input closes (e.g. the parent process died)",
    )
    parser.add_argument(
        "--state-file",
        default=None,
        help="load tasks from this JSON file on start and save them to it on exit",
    )
    parser.add_argument(
        "--record-requests",
        action="store_true",
        help="keep every request in memory (off by default: nobody can read them)",
    )
    return parser


async def _serve(server: FakeKlingServer, *, exit_with_stdin: bool = False) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if exit_with_stdin:

        def watch_stdin() -> None:
            # The raw descriptor, not sys.stdin: a buffered reader blocked here
            # would hold its lock and abort the interpreter's shutdown.
            while os.read(0, 4096):
                pass  # EOF: the parent closed the pipe, or died
            loop.call_soon_threadsafe(stop.set)

        # A daemon thread: a blocked read must not hold up a signal-driven exit.
        threading.Thread(target=watch_stdin, name="stdin-watch", daemon=True).start()
    async with server:
        sys.stdout.write(json.dumps({"url": server.url}) + "\n")
        sys.stdout.flush()
        await stop.wait()


def _server(arguments: argparse.Namespace) -> FakeKlingServer:
    """The server the parsed command line asks for (not started)."""
    server = FakeKlingServer(
        port=arguments.port,
        task_duration=_drawn(arguments.task_duration, arguments.seed),
        processing_delay=arguments.processing_delay,
        concurrency_limit=arguments.concurrency_limit,
        rate_limit=arguments.rate_limit,
        api_key=arguments.api_key,
        path_prefix=arguments.path_prefix,
        seed=arguments.seed,
        record_requests=arguments.record_requests,
        state_file=arguments.state_file,
    )
    if arguments.create_delay > 0:
        server.inject("delay", route="create", delay=arguments.create_delay, times=None)
    return server


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and serve until a stop signal."""
    parser = _parser()
    arguments = parser.parse_args(argv)
    try:
        server = _server(arguments)
    except ValueError as error:
        parser.error(str(error))
    asyncio.run(_serve(server, exit_with_stdin=arguments.exit_with_stdin))


if __name__ == "__main__":
    main()
