"""Hand-written raw-aiohttp baselines for ``benchmarks/scale.py``.

Each function here does one job of the scale benchmark the way a careful user
would write it without the SDK: one ``aiohttp.ClientSession``, raw JSON, the same
request bodies the SDK sends (``create_body``), and nothing else (no validation,
no retries, no typed results). The benchmark runs the SDK doing the same job
against the same fake server and divides the two.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Any

import aiohttp
from aiohttp import web

__all__ = [
    "TERMINAL",
    "CallbackFutures",
    "RawKling",
    "create_and_poll",
    "create_body",
    "fixed_delay",
    "growing_delay",
    "hold_in_flight",
    "poll_until_end",
    "retry_on_1303_batch",
    "semaphore_batch",
    "submit_many",
]

TERMINAL = frozenset(("succeed", "failed"))
ENDPOINT = "/v1/images/generations"
#: Kling's answer when the account's concurrency quota is full.
CONCURRENCY_FULL = 1303

Delay = Callable[[float], float]
"""Seconds to wait before the next poll of a task, given its age in seconds."""


def create_body(
    prompt: str, n: int = 1, *, callback_url: str | None = None, external_task_id: str | None = None
) -> dict[str, Any]:
    """The body the SDK sends for ``ImageGenerationRequest(prompt=prompt, n=n)``:
    the same fields with a fresh ``external_task_id``, so both sides make the
    server do the same work."""
    body: dict[str, Any] = {
        "n": n,
        "aspect_ratio": "16:9",
        "prompt": prompt,
        "model_name": "kling-v3",
        "external_task_id": external_task_id or uuid.uuid4().hex,
    }
    if callback_url is not None:
        body["callback_url"] = callback_url
    return body


class RawKling:
    """The least a client needs: a session, the bearer header and three URLs."""

    def __init__(self, base_url: str, api_key: str, *, connections: int = 100) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections, limit_per_host=connections)
        )
        self.headers = {"Authorization": f"Bearer {api_key}"}
        self.tasks_url = base_url + ENDPOINT

    async def __aenter__(self) -> RawKling:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.session.close()

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST a create; return the envelope whatever its code."""
        async with self.session.post(self.tasks_url, json=body, headers=self.headers) as response:
            envelope: dict[str, Any] = await response.json()
            return envelope

    async def get(self, task_id: str) -> dict[str, Any]:
        """GET one task; return the envelope."""
        async with self.session.get(
            f"{self.tasks_url}/{task_id}", headers=self.headers
        ) as response:
            envelope: dict[str, Any] = await response.json()
            return envelope

    async def created(self, body: dict[str, Any]) -> dict[str, Any]:
        """Create a task that must be accepted; return its ``data``."""
        envelope = await self.create(body)
        if envelope.get("code") != 0:
            raise RuntimeError(f"create failed: {envelope}")
        data: dict[str, Any] = envelope["data"]
        return data


def fixed_delay(seconds: float) -> Delay:
    """Poll every ``seconds``."""
    return lambda _age: seconds


def growing_delay(
    *,
    initial: float = 1.0,
    cap: float = 10.0,
    multiplier: float = 1.5,
    jitter: float = 0.1,
    rng: random.Random | None = None,
) -> Delay:
    """``(multiplier - 1) * age`` kept within ``[initial, cap]``, jittered by
    ±``jitter``: the schedule of the SDK's default ``PollPolicy``, written out."""
    rng = rng or random.Random(0)

    def delay(age: float) -> float:
        base = min(cap, max(initial, (multiplier - 1) * age))
        return base * (1 + rng.uniform(-jitter, jitter))

    return delay


async def poll_until_end(
    raw: RawKling, data: dict[str, Any], delay: Delay, *, first: float | None = None
) -> dict[str, Any]:
    """GET a created task on its own schedule until it ends; return the terminal
    task. ``delay(age)`` is the wait before each poll, counted from the previous
    answer, as the SDK's poller counts it; ``first`` replaces the first wait."""
    task_id = data["task_id"]
    first_seen = time.monotonic()
    while data.get("task_status") not in TERMINAL:
        wait = delay(time.monotonic() - first_seen) if first is None else first
        first = None
        await asyncio.sleep(wait)
        envelope = await raw.get(task_id)
        if envelope.get("code") == 0:
            data = envelope["data"]
    return data


async def create_and_poll(
    raw: RawKling, body: dict[str, Any], delay: Delay, *, first: float | None = None
) -> dict[str, Any]:
    """Create a task, then poll it until it ends (:func:`poll_until_end`)."""
    return await poll_until_end(raw, await raw.created(body), delay, first=first)


async def submit_many(raw: RawKling, count: int, concurrency: int, prompt: str) -> int:
    """Create ``count`` tasks, ``concurrency`` at a time; return how many were accepted."""
    remaining = count
    accepted = 0

    async def worker() -> None:
        nonlocal remaining, accepted
        while remaining > 0:
            remaining -= 1
            envelope = await raw.create(create_body(prompt))
            accepted += envelope.get("code") == 0

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return accepted


class CallbackFutures:
    """A bare callback endpoint: a terminal POST to ``/cb/<external_task_id>``
    resolves that task's future. No authentication, deduplication or fallback."""

    def __init__(self) -> None:
        self.futures: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.origin = ""

    def url_for(self, external_task_id: str) -> str:
        return f"{self.origin}/cb/{external_task_id}"

    def expect(self, external_task_id: str) -> asyncio.Future[dict[str, Any]]:
        future = asyncio.get_running_loop().create_future()
        self.futures[external_task_id] = future
        return future

    async def _on_callback(self, request: web.Request) -> web.Response:
        data = await request.json()
        future = self.futures.get(request.match_info["external_task_id"])
        if future is not None and not future.done() and data.get("task_status") in TERMINAL:
            future.set_result(data)
        return web.Response()

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[CallbackFutures]:
        app = web.Application()
        app.router.add_post("/cb/{external_task_id}", self._on_callback)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            self.origin = f"http://127.0.0.1:{runner.addresses[0][1]}"
            yield self
        finally:
            await runner.cleanup()


async def _create_with_callback(
    raw: RawKling, receiver: CallbackFutures, prompt: str, n: int
) -> tuple[dict[str, Any], asyncio.Future[dict[str, Any]]]:
    external_task_id = uuid.uuid4().hex
    future = receiver.expect(external_task_id)
    body = create_body(
        prompt,
        n,
        callback_url=receiver.url_for(external_task_id),
        external_task_id=external_task_id,
    )
    return await raw.create(body), future


async def semaphore_batch(
    raw: RawKling,
    receiver: CallbackFutures,
    sizes: Sequence[int],
    slots: int,
    *,
    on_end: Callable[[dict[str, Any]], None],
) -> int:
    """Run one task per entry of ``sizes`` (its ``n``), at most ``slots`` at a
    time: the naive way to stay under a quota, sized for the largest ``n``.
    Returns the 1303 answers seen (retried after a short pause)."""
    semaphore = asyncio.Semaphore(slots)
    rejected = 0

    async def one(index: int, n: int) -> None:
        nonlocal rejected
        async with semaphore:
            future, refusals = await _create_until_accepted(
                raw, receiver, index, n, itertools.repeat(0.05)
            )
            rejected += refusals
            on_end(await future)

    await asyncio.gather(*(one(index, n) for index, n in enumerate(sizes)))
    return rejected


async def retry_on_1303_batch(
    raw: RawKling,
    receiver: CallbackFutures,
    sizes: Iterable[int],
    workers: int,
    *,
    first_backoff: float,
    max_backoff: float,
    on_end: Callable[[dict[str, Any]], None],
    rng: random.Random | None = None,
) -> int:
    """Run one task per entry of ``sizes`` with ``workers`` loops that each create
    and, on 1303, back off exponentially (jittered) and try again: no accounting
    of units at all. Returns the 1303 answers seen."""
    rng = rng or random.Random(0)
    queue = iter(enumerate(sizes))
    rejected = 0

    def backoffs() -> Iterator[float]:
        backoff = first_backoff
        while True:
            yield backoff * rng.uniform(0.5, 1.0)
            backoff = min(max_backoff, backoff * 2)

    async def worker() -> None:
        nonlocal rejected
        for index, n in queue:
            future, refusals = await _create_until_accepted(raw, receiver, index, n, backoffs())
            rejected += refusals
            on_end(await future)

    await asyncio.gather(*(worker() for _ in range(workers)))
    return rejected


async def _create_until_accepted(
    raw: RawKling, receiver: CallbackFutures, index: int, n: int, pauses: Iterator[float]
) -> tuple[asyncio.Future[dict[str, Any]], int]:
    """Create task ``index`` until Kling accepts it, pausing as ``pauses`` says
    after each 1303; return the future of its end and the 1303s seen."""
    refusals = 0
    while True:
        envelope, future = await _create_with_callback(raw, receiver, f"task {index}", n)
        if envelope.get("code") == 0:
            return future, refusals
        if envelope.get("code") != CONCURRENCY_FULL:
            raise RuntimeError(f"create failed: {envelope}")
        refusals += 1
        await asyncio.sleep(next(pauses))


async def hold_in_flight(
    raw: RawKling, count: int, concurrency: int, prompt: str
) -> tuple[dict[str, asyncio.Future[dict[str, Any]]], list[asyncio.Task[dict[str, Any]]]]:
    """Create ``count`` tasks and keep, for each, its id, a future its result
    would resolve and a task awaiting that future: what a hand-written client
    holds per task in flight."""
    futures: dict[str, asyncio.Future[dict[str, Any]]] = {}
    waiters: list[asyncio.Task[dict[str, Any]]] = []
    loop = asyncio.get_running_loop()
    remaining = count

    async def wait(future: asyncio.Future[dict[str, Any]]) -> dict[str, Any]:
        return await future

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            data = await raw.created(create_body(prompt))
            future: asyncio.Future[dict[str, Any]] = loop.create_future()
            futures[data["task_id"]] = future
            waiters.append(loop.create_task(wait(future)))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return futures, waiters
