"""What several test modules share: the test credentials, fast client policies, a
client for the fake server, Kling's error families, clocks to inject, PNG checks, and
``eventually``, the one way a test waits for something to happen.

Fixtures live in ``conftest.py``; plain names live here, imported as
``from tests.helpers import ...``, so that no test module imports another.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from kling_async import (
    APIError,
    AuthenticationError,
    Client,
    ConcurrencyLimitError,
    ContentPolicyError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    PollPolicy,
    QuotaExceededError,
    RateLimitError,
    RetryPolicy,
    ServerError,
)
from kling_async.testing import FakeKlingServer

T = TypeVar("T")

API_KEY = "sk-test-0123456789"
FAST_POLL = PollPolicy(initial_delay=0.02, max_delay=0.1, timeout=10.0)
FAST_RETRY = RetryPolicy(initial_delay=0.01, max_delay=0.05, max_attempts=4, max_elapsed=10.0)


def make_client(server: FakeKlingServer, **options: object) -> Client:
    """A client for ``server`` with fast polling and retries unless overridden."""
    settings: dict[str, object] = {
        "api_key": API_KEY,
        "base_url": server.url,
        "polling": FAST_POLL,
        "retry": FAST_RETRY,
    }
    settings.update(options)
    return Client(**settings)  # type: ignore[arg-type]


async def eventually(
    condition: Callable[[], object | Awaitable[object]],
    *,
    timeout: float = 5.0,
    interval: float = 0.01,
) -> None:
    """Return as soon as ``condition()`` is true (awaited first if it returns an
    awaitable); fail the test if it is still false after ``timeout`` seconds.

    Tests wait on a record (the fake server's requests and tasks, a handle's
    status, a counter) rather than sleep for a guessed time: the wait ends the
    moment the record shows it, and a slow machine only makes it longer.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"the condition never held within {timeout} s")
        await asyncio.sleep(interval)


def as_generator(iterator: AsyncIterator[T]) -> AsyncGenerator[T, None]:
    """``iterator``, checked to be the async generator it is, for ``contextlib.aclosing``
    (the library promises an ``AsyncIterator``; its iterators are generators)."""
    assert isinstance(iterator, AsyncGenerator), iterator
    return iterator


#: Every Kling code with its HTTP status and the error class the SDK raises for it.
FAMILIES: list[tuple[int, int, type[APIError]]] = [
    (1000, 401, AuthenticationError),
    (1001, 401, AuthenticationError),
    (1002, 401, AuthenticationError),
    (1003, 401, AuthenticationError),
    (1004, 401, AuthenticationError),
    (1100, 429, QuotaExceededError),
    (1101, 429, QuotaExceededError),
    (1102, 429, QuotaExceededError),
    (1103, 403, PermissionDeniedError),
    (1200, 400, InvalidRequestError),
    (1201, 400, InvalidRequestError),
    (1202, 404, NotFoundError),
    (1203, 404, NotFoundError),
    (1300, 400, ContentPolicyError),
    (1301, 400, ContentPolicyError),
    (1302, 429, RateLimitError),
    (1303, 429, ConcurrencyLimitError),
    (1304, 429, PermissionDeniedError),
    (5000, 500, ServerError),
    (5001, 503, ServerError),
    (5002, 504, ServerError),
]


class Clock:
    """A clock to inject (``clock=``) that stands still until a test moves ``now``."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class TickingClock(Clock):
    """One second further on every reading, so each signature differs."""

    def __call__(self) -> float:
        self.now += 1
        return self.now


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """The (type, payload) chunks of a PNG, checking its signature and every CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, chunks = 8, []
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        payload = data[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length : position + 12 + length])
        assert zlib.crc32(kind + payload) & 0xFFFFFFFF == crc, kind
        chunks.append((kind, payload))
        position += 12 + length
    return chunks


def assert_valid_png(path: Path) -> None:
    """``path`` holds a whole PNG: header first, data, end last, every CRC right."""
    kinds = [kind for kind, _ in png_chunks(path.read_bytes())]
    assert kinds[0] == b"IHDR"
    assert kinds[-1] == b"IEND"
    assert b"IDAT" in kinds


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any KLING_ setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KLING_")}
    env.update(extra)
    return env


class FakeServerProcess:
    """A FakeKlingServer in a process of its own (like a remote API, it outlives
    the test's event loops and the CLI runs it serves), and its record."""

    def __init__(self, process: subprocess.Popen[str], url: str) -> None:
        self.process = process
        self.url = url

    def _read(self, path: str) -> Any:
        """The JSON of ``GET path`` (one of the fake's ``/_fake/`` records)."""
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.load(response)

    def tasks(self) -> list[dict[str, Any]]:
        """Every task it holds, as a get shows it, with its prompt."""
        tasks: list[dict[str, Any]] = self._read("/_fake/tasks")
        return tasks

    def stats(self) -> dict[str, Any]:
        """Its counters (``GET /_fake/stats``): requests, creates, peak units."""
        stats: dict[str, Any] = self._read("/_fake/stats")
        return stats

    def per_prompt(self) -> Counter[str]:
        """How many tasks it holds for each prompt."""
        return Counter(task["prompt"] for task in self.tasks())


@contextlib.contextmanager
def fake_server_process(*arguments: str, api_key: str = API_KEY) -> Iterator[FakeServerProcess]:
    """``python -m kling_async.testing`` on a free loopback port, requiring
    ``api_key``, stopped (SIGTERM) when the block ends."""
    with subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kling_async.testing",
            "--port",
            "0",
            "--api-key",
            api_key,
            "--exit-with-stdin",
            *arguments,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=clean_env(),
    ) as process:
        assert process.stdout is not None
        try:
            yield FakeServerProcess(process, json.loads(process.stdout.readline())["url"])
        finally:
            process.terminate()
            process.wait(timeout=10)
