"""Test helpers for code that uses kling_async: a fake Kling API server.

:class:`FakeKlingServer` is a real aiohttp server on loopback that follows the
Kling image API closely enough for an SDK's (or an application's) tests to run
over real HTTP: request validation with Kling's error codes, tasks that move
through their lifecycle on timers, list paging, result PNGs, the n-weighted
concurrency quota, a rate limit, callbacks, and injectable faults::

    from kling_async.testing import FakeKlingServer

    async def test_generation() -> None:
        async with FakeKlingServer(task_duration=0.1) as server:
            ...  # a client with base_url=server.url
            assert len(server.requests_for("create")) == 1

It can also run as its own process (for benchmarks)::

    python -m kling_async.testing --port 0 --concurrency-limit 50

which prints ``{"url": "http://127.0.0.1:PORT"}`` once it listens, serves
``GET /_fake/stats``, and stops on SIGINT or SIGTERM.
"""

from __future__ import annotations

from ._options import (
    CallbackFaults,
    CallbackFormat,
    CallbackRecord,
    CreateAnswer,
    Fault,
    FaultKind,
    FaultRoute,
    ImageIndexing,
    RateLimit,
    RecordedRequest,
    Route,
    WireShapes,
)
from ._png import encode_png
from ._redis import RedisServer, find_redis_server
from ._server import DEFAULT_FAILURE_MESSAGE, FAIL_MARKER, FakeKlingServer
from ._tasks import FakeTask

__all__ = [
    "RedisServer",
    "find_redis_server",
    "DEFAULT_FAILURE_MESSAGE",
    "FAIL_MARKER",
    "CallbackFaults",
    "CallbackFormat",
    "CallbackRecord",
    "CreateAnswer",
    "FakeKlingServer",
    "FakeTask",
    "Fault",
    "FaultKind",
    "FaultRoute",
    "ImageIndexing",
    "RateLimit",
    "RecordedRequest",
    "Route",
    "WireShapes",
    "encode_png",
]
