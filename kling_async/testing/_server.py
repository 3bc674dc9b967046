"""The fake Kling API server: a real aiohttp application on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import random
import secrets
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Final
from urllib.parse import unquote

import attrs
from aiohttp import web

from ._callbacks import CallbackDispatcher
from ._options import (
    CallbackFaults,
    CallbackRecord,
    Fault,
    FaultKind,
    FaultRoute,
    RateLimit,
    RecordedRequest,
    Route,
    ServerOptions,
    WireShapes,
)
from ._png import encode_png, size_for_aspect_ratio
from ._protocol import (
    ENDPOINTS,
    SUCCESS_MESSAGE,
    envelope,
    http_status_for,
    webhook_signature,
)
from ._state import load_tasks, save_tasks
from ._tasks import DEFAULT_FAILURE_MESSAGE, FAIL_MARKER, FakeTask
from ._validation import Rejection, invalid, validate_create

__all__ = ["DEFAULT_FAILURE_MESSAGE", "FAIL_MARKER", "FakeKlingServer"]

HOST: Final = "127.0.0.1"
MAX_PAGE_NUMBER: Final = 1000
MAX_PAGE_SIZE: Final = 500
DEFAULT_PAGE_SIZE: Final = 30
# Six base64 images of 10 MB each fit; anything larger is refused by aiohttp (413).
_MAX_BODY: Final = 96 * 1024 * 1024
_WATERMARK_SUFFIX: Final = "-watermark.png"
_DEFAULT_GARBAGE: Final = (
    b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"
)
_NOT_JSON: Final = object()

# Internal operations; several map to one public Route.
_OP_ROUTES: Final[Mapping[str, Route]] = {
    "create": "create",
    "get": "get",
    "list": "list",
    "download": "download",
    "callback": "callback",
    "stats": "other",
    "task_list": "other",
    "other": "other",
}


def _format_seconds(seconds: float) -> str:
    # Fixed-point: "%g" would write 1e-05 or 1.2e+06, which no Retry-After parser reads.
    return f"{max(seconds, 0.0):.3f}".rstrip("0").rstrip(".")


@attrs.frozen
class _Reply:
    status: int
    body: bytes
    code: int | None
    content_type: str = "application/json"
    headers: Mapping[str, str] | None = None


def _ok(data_json: str) -> _Reply:
    return _Reply(200, envelope(0, SUCCESS_MESSAGE, data_json), 0)


def _error(
    code: int, message: str, *, http_status: int | None = None, retry_after: float | None = None
) -> _Reply:
    headers = None if retry_after is None else {"Retry-After": _format_seconds(retry_after)}
    status = http_status if http_status is not None else http_status_for(code)
    return _Reply(status, envelope(code, message), code, headers=headers)


def _not_found_file() -> _Reply:
    return _Reply(404, b"404: no such result file", None, content_type="text/plain")


@attrs.define(eq=False)
class _TokenBucket:
    """The rate limit over every ``/v1`` request: bursts of up to ``limit.requests``,
    refilled at ``limit.requests / limit.per`` tokens a second (``clock`` is
    monotonic seconds)."""

    limit: RateLimit
    clock: Callable[[], float] = time.monotonic
    _tokens: float = attrs.field(
        init=False, default=attrs.Factory(lambda self: float(self.limit.requests), takes_self=True)
    )
    _last: float = attrs.field(
        init=False, default=attrs.Factory(lambda self: self.clock(), takes_self=True)
    )

    def take(self) -> bool:
        """Spend a token if one is left."""
        now = self.clock()
        capacity, refill = float(self.limit.requests), self.limit.requests / self.limit.per
        self._tokens = min(capacity, self._tokens + (now - self._last) * refill)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class FakeKlingServer:
    """A real HTTP server on 127.0.0.1 that behaves like the Kling image API.

    Point a client's ``base_url`` at :attr:`url` and it speaks real HTTP to a
    server that validates requests with Kling's error codes, runs tasks through
    ``submitted`` → ``processing`` → ``succeed``/``failed`` on timers, pages
    lists newest first, serves result PNGs, enforces an n-weighted concurrency
    quota (1303) and a rate limit (1302), delivers callbacks, and misbehaves on
    request (:meth:`inject`). Everything it received is in :attr:`requests`.

    A task with a ``callback_url`` is POSTed to it (the same object a get
    returns) at each status change after creation: ``processing``, then
    ``succeed`` or ``failed``. Only loopback hosts are contacted; any other is
    recorded as refused in :attr:`callbacks`.

    Besides the API, the server answers ``GET /_fake/tasks`` (every task it
    holds, as a get shows it, with its prompt) and ``GET /_fake/stats``
    (:meth:`stats` as JSON), for other processes, and accepts any
    ``POST /_fake/callbacks/...``
    (recorded with route ``"callback"``), a ready-made callback receiver:
    ``callback_url=server.origin + "/_fake/callbacks/<token>"``.

    ::

        async with FakeKlingServer(task_duration=0.1) as server:
            async with kling_async.Client(api_key="test", base_url=server.url) as client:
                task = await (await client.images.generate(prompt="a fox"))

    Options (all keyword-only):

    ``api_key``
        the bearer token to require. With ``access_key`` and ``secret_key``
        instead (or as well), the token must be an HS256 JWT signed with
        ``secret_key`` whose ``iss`` is ``access_key`` and whose ``nbf``/``exp``
        hold at ``clock()`` (needs PyJWT). With none of them, any non-empty
        bearer token is accepted.
    ``clock``
        Unix seconds, for JWT checks and task timestamps; inject one to make
        tokens expire without waiting.
    ``models``
        the model names that exist; others get 1203. ``None`` accepts any.
    ``processing_delay``, ``task_duration``
        seconds from creation to ``processing`` and to the end.
        ``task_duration`` may be a function of the task, or ``None`` for tasks
        that only end through :meth:`finish`.
    ``outcome``
        decides each task's end when its time is up: ``None`` to succeed, or a
        failure message. By default a prompt containing ``[fail]`` fails with
        ``"Content review failed (simulated)"``.
    ``concurrency_limit``
        the account's quota in units; a task holds ``n`` units until it ends.
    ``rate_limit``
        a :class:`RateLimit` over all ``/v1`` requests.
    ``quota_error``
        a code such as 1102 every create then fails with ("resource pack used
        up" tests); the same can be done for a while with
        ``inject("error", route="create", code=1102, times=None)``.
    ``callback_faults``
        a :class:`CallbackFaults` for callback deliveries.
    ``seed``
        seeds the random choices of fault probabilities and callback faults.
    ``port``
        0 (the default) picks a free port.
    ``path_prefix``
        serve ``/v1`` under a prefix, as a gateway does (e.g. ``"/kling"``);
        :attr:`url` includes it.
    ``record_requests``
        keep :attr:`requests`; turn off for long benchmarks (counts in
        :meth:`stats` are kept either way).
    ``shapes``
        a :class:`WireShapes`: answers and callbacks in the shapes real Kling
        answers take beside the documented ones (new-design callback bodies,
        callbacks without ``task_info``, images without ``index``, creates
        answered with only a ``task_id``, answers without ``request_id`` or
        ``data``, errors with HTTP 200), so a test can check code against them.
    ``webhook_secret``
        sign every callback the Standard Webhooks way, as Kling does for an
        account with a webhook secret: ``webhook-id`` (one per update, repeated
        by a duplicated delivery), ``webhook-timestamp`` (``clock()`` seconds)
        and ``webhook-signature``. Several secrets give several signatures, as
        during a rotation. Each is ``whsec_`` followed by base64.
    ``state_file``
        a JSON file the tasks are loaded from on start and saved to on close
        (merged with what it holds then), so that a server started later
        knows them: the CLI's offline simulation keeps its tasks between
        commands this way. Tasks still running resume their timers from their
        creation time; images and callback URLs are not kept. A missing or
        unreadable file starts empty.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        clock: Callable[[], float] = time.time,
        models: Collection[str] | None = None,
        processing_delay: float = 0.05,
        task_duration: float | Callable[[FakeTask], float] | None = 0.2,
        outcome: Callable[[FakeTask], str | None] | None = None,
        concurrency_limit: int | None = None,
        rate_limit: RateLimit | None = None,
        quota_error: int | None = None,
        callback_faults: CallbackFaults | None = None,
        seed: int | None = None,
        port: int = 0,
        path_prefix: str = "",
        record_requests: bool = True,
        shapes: WireShapes | None = None,
        webhook_secret: str | Sequence[str] | None = None,
        state_file: str | os.PathLike[str] | None = None,
    ) -> None:
        options = ServerOptions(
            api_key=api_key,
            access_key=access_key,
            secret_key=secret_key,
            clock=clock,
            models=models,
            processing_delay=processing_delay,
            task_duration=task_duration,
            outcome=outcome,
            concurrency_limit=concurrency_limit,
            rate_limit=rate_limit,
            quota_error=quota_error,
            callback_faults=callback_faults,
            seed=seed,
            port=port,
            path_prefix=path_prefix,
            record_requests=record_requests,
            shapes=shapes,
            webhook_secrets=webhook_secret,
            state_file=state_file,
        )
        self._api_key = options.api_key
        self._access_key = options.access_key
        self._secret_key = options.secret_key
        self._clock = options.clock
        self._models = options.models
        self._processing_delay = options.processing_delay
        self._task_duration = options.task_duration
        self._outcome = options.outcome
        self._concurrency_limit = options.concurrency_limit
        self._rate_limit = options.rate_limit
        self._bucket = None if options.rate_limit is None else _TokenBucket(options.rate_limit)
        self._quota_error = options.quota_error
        self._requested_port = options.port
        self._prefix = options.path_prefix
        self._record = options.record_requests
        self._shapes = options.shapes
        self._webhook_secrets = options.webhook_secrets
        self._state_file = options.state_file

        self._tasks: dict[str, FakeTask] = {}
        self._by_external: dict[str, FakeTask] = {}
        self._order: dict[str, list[FakeTask]] = {endpoint: [] for endpoint in ENDPOINTS}
        self._live: dict[str, FakeTask] = {}
        self._requests: list[RecordedRequest] = []
        self._callback_records: list[CallbackRecord] = []
        self._faults: list[Fault] = []
        self._fault_rng = random.Random(seed)
        callback_rng = random.Random(None if seed is None else f"callbacks:{seed}")
        self._callbacks = CallbackDispatcher(
            options.callback_faults,
            callback_rng,
            self._callback_records,
            encode=self._callback_body,
            signer=self._sign if self._webhook_secrets else None,
        )

        self._units = 0
        self._peak_units = 0
        self._unit_seconds = 0.0
        self._units_since = 0.0
        self._first_create: float | None = None
        self._idle_since: float | None = None
        self._route_counts: dict[str, int] = dict.fromkeys(
            ("create", "get", "list", "download", "callback", "other"), 0
        )
        self._creates_accepted = 0
        self._creates_rejected_concurrency = 0
        self._rate_limited = 0

        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: asyncio.Event | None = None
        self._port: int | None = None
        self._closed = False

    # --- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        """Start listening on 127.0.0.1. A server starts once; use a new one after
        :meth:`close`."""
        if self._runner is not None or self._closed:
            raise RuntimeError("a FakeKlingServer can be started only once")
        if self._access_key is not None:
            try:
                import jwt  # noqa: F401
            except ImportError:  # pragma: no cover - depends on the installed extras
                raise RuntimeError(
                    "JWT auth in FakeKlingServer needs PyJWT, the jwt extra: "
                    "pip install '.[jwt]' in the kling-async checkout, or pip install PyJWT"
                ) from None
        self._loop = asyncio.get_running_loop()
        self._closing = asyncio.Event()
        app = web.Application(client_max_size=_MAX_BODY)
        app.router.add_route("*", "/{path:.*}", self._handle)
        # A short shutdown timeout: a client stuck in a slow response must not
        # hold up a test's teardown.
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, HOST, self._requested_port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._port = int(runner.addresses[0][1])
        self._runner = runner
        if self._state_file is not None:
            self._restore(load_tasks(self._state_file))

    async def close(self) -> None:
        """Stop the server, cancel task timers and pending callbacks; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._closing is not None:
            self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
        for task in self._live.values():
            task._cancel_timers()
        await self._callbacks.close()
        if self._state_file is not None and self._runner is not None:
            save_tasks(self._state_file, self._tasks.values())

    async def __aenter__(self) -> FakeKlingServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- addressing and inspection ------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port the server listens on."""
        if self._port is None:
            raise RuntimeError("the server is not started: use 'async with' or await start()")
        return self._port

    @property
    def origin(self) -> str:
        """``http://127.0.0.1:PORT``, where result files and ``/_fake/`` live."""
        return f"http://{HOST}:{self.port}"

    @property
    def url(self) -> str:
        """The API root to use as a client's ``base_url``; ``/v1/...`` is under it."""
        return self.origin + self._prefix

    @property
    def tasks(self) -> dict[str, FakeTask]:
        """Every task created so far, by task_id (the server's own dict: read it,
        change tasks only through :meth:`finish`)."""
        return self._tasks

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received, in arrival order (if ``record_requests``)."""
        return self._requests

    @property
    def callbacks(self) -> list[CallbackRecord]:
        """Every callback delivery attempt, in attempt order."""
        return self._callback_records

    @property
    def faults(self) -> list[Fault]:
        """Injected faults that can still apply."""
        return list(self._faults)

    @property
    def units_in_use(self) -> int:
        """Concurrency units held by tasks that have not ended."""
        return self._units

    @property
    def peak_units(self) -> int:
        """The most units ever held at once."""
        return self._peak_units

    @property
    def live_tasks(self) -> int:
        """How many tasks have not ended yet."""
        return len(self._live)

    def task(self, task_id: str) -> FakeTask:
        """The task with this task_id or external_task_id; :class:`KeyError` if none."""
        task = self._tasks.get(task_id) or self._by_external.get(task_id)
        if task is None:
            raise KeyError(task_id)
        return task

    def requests_for(
        self,
        route: Route | None = None,
        *,
        endpoint: str | None = None,
        external_task_id: str | None = None,
        method: str | None = None,
    ) -> list[RecordedRequest]:
        """The recorded requests matching every given filter, in arrival order."""
        return [
            request
            for request in self._requests
            if (route is None or request.route == route)
            and (endpoint is None or request.endpoint == endpoint)
            and (method is None or request.method == method)
            and (external_task_id is None or request.external_task_id == external_task_id)
        ]

    def utilisation(self, limit: int | None = None) -> float:
        """The share of the quota used: the time-integral of :attr:`units_in_use`
        over ``limit`` times the time from the first create to now (or to the last
        task's end, when none is running). ``limit`` defaults to
        ``concurrency_limit``; 0.0 before any create."""
        limit = limit if limit is not None else self._concurrency_limit
        if limit is None:
            raise ValueError("utilisation needs a limit: pass one or set concurrency_limit")
        if self._first_create is None:
            return 0.0
        if self._units > 0 or self._idle_since is None:
            end = time.monotonic()
            integral = self._unit_seconds + self._units * (end - self._units_since)
        else:
            end = self._idle_since
            integral = self._unit_seconds
        elapsed = end - self._first_create
        return integral / (limit * elapsed) if elapsed > 0 else 0.0

    def stats(self) -> dict[str, Any]:
        """The figures ``GET /_fake/stats`` serves, as a dict."""
        return {
            "requests": dict(self._route_counts),
            "requests_total": sum(self._route_counts.values()),
            "creates_accepted": self._creates_accepted,
            "creates_rejected_concurrency": self._creates_rejected_concurrency,
            "rate_limited": self._rate_limited,
            "concurrency_limit": self._concurrency_limit,
            "units_in_use": self._units,
            "peak_units": self._peak_units,
            "utilisation": (self.utilisation() if self._concurrency_limit is not None else None),
            "live_tasks": len(self._live),
            "tasks": len(self._tasks),
        }

    # --- control --------------------------------------------------------------------

    def inject(
        self,
        kind: FaultKind,
        *,
        route: FaultRoute = "any",
        endpoint: str | None = None,
        times: int | None = 1,
        probability: float = 1.0,
        code: int = 5000,
        http_status: int | None = None,
        message: str | None = None,
        retry_after: float | None = None,
        delay: float = 0.0,
        body: str | bytes | None = None,
    ) -> Fault:
        """Make the next matching requests misbehave, and return the :class:`Fault`.

        ``kind``: ``"error"`` answers Kling error ``code`` without acting (HTTP
        status from Kling's table unless ``http_status``; a ``Retry-After``
        header if ``retry_after``); ``"error_after"`` acts (a create really
        creates the task) and then answers that error, an ambiguous failure;
        ``"drop"`` closes the connection without answering, before acting;
        ``"drop_after"`` acts and then closes without answering; ``"delay"``
        waits ``delay`` seconds and then answers normally; ``"garbage"`` answers
        ``body`` (default an HTML error page) with ``http_status`` (default 502).
        ``delay`` also applies before any other kind.

        ``route`` (``"create"``, ``"get"``, ``"list"``, ``"download"`` or
        ``"any"``) and ``endpoint`` (e.g. ``"images/generations"``) pick the
        requests; ``times`` how many it applies to (``None``: no end);
        ``probability`` the chance it applies to each (seeded by ``seed``).
        Faults are tried in injection order and at most one applies per request.
        They come before authentication and rate limiting; ``/_fake/`` is exempt.

        Note that aiohttp's client repeats an idempotent request (GET) once by
        itself when the connection drops, so one ``"drop"`` of a get is
        invisible to an aiohttp client: use ``times=2`` or more to see it.
        """
        if endpoint is not None and endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; one of {ENDPOINTS}")
        fault = Fault(
            kind=kind,
            route=route,
            endpoint=endpoint,
            times=times,
            probability=probability,
            code=code,
            http_status=http_status,
            message=message,
            retry_after=retry_after,
            delay=delay,
            body=body,
        )
        self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Remove every injected fault."""
        self._faults.clear()

    def finish(self, task_id: str, *, failure: str | None = None) -> FakeTask:
        """End a task now: it succeeds, or fails with ``failure`` when given.

        ``task_id`` may also be an external_task_id. Raises :class:`KeyError` for
        an unknown task and :class:`ValueError` for one that already ended.
        """
        task = self.task(task_id)
        if task.is_terminal:
            raise ValueError(f"task {task.task_id} already ended ({task.status})")
        self._end(task, failure)
        return task

    async def flush_callbacks(self) -> None:
        """Wait until every callback due so far has been attempted (updates held
        back by a ``reorder`` fault wait for their task's next update)."""
        await self._callbacks.flush()

    # --- task lifecycle ---------------------------------------------------------

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _create_task(self, endpoint: str, body: dict[str, Any], external: str | None) -> FakeTask:
        task_id = secrets.token_hex(12)
        while task_id in self._tasks:  # pragma: no cover - 96 random bits
            task_id = secrets.token_hex(12)
        now = self._now_ms()
        n = body.get("n")
        callback_url = body.get("callback_url")
        task = FakeTask(
            task_id=task_id,
            endpoint=endpoint,
            external_task_id=external,
            body=body,
            n=n if isinstance(n, int) else 1,
            created_at_ms=now,
            updated_at_ms=now,
            callback_url=callback_url if isinstance(callback_url, str) else None,
        )
        self._tasks[task_id] = task
        if external is not None:
            self._by_external[external] = task
        self._order[endpoint].append(task)
        self._live[task_id] = task
        self._creates_accepted += 1
        self._change_units(task.n)
        self._schedule(task)
        return task

    def _schedule(self, task: FakeTask, elapsed: float = 0.0) -> None:
        """Start the task's timers; ``elapsed`` seconds of its life have passed."""
        assert self._loop is not None
        duration = (
            self._task_duration(task) if callable(self._task_duration) else self._task_duration
        )
        if duration is None or self._processing_delay < duration:
            task._timers.append(
                self._loop.call_later(
                    max(self._processing_delay - elapsed, 0.0), self._start_processing, task
                )
            )
        if duration is not None:
            task._timers.append(
                self._loop.call_later(max(duration - elapsed, 0.0), self._time_up, task)
            )

    def _start_processing(self, task: FakeTask) -> None:
        if task.status != "submitted":
            return
        task.status = "processing"
        task._changed(self._now_ms())
        self._callbacks.notify(task)

    def _time_up(self, task: FakeTask) -> None:
        if not task.is_terminal:
            self._end(task, self._outcome(task))

    def _end(self, task: FakeTask, failure: str | None) -> None:
        task._cancel_timers()
        if failure is None:
            task.status = "succeed"
            task.status_message = ""
            task.final_unit_deduction = str(task.n)
            task.images = self._result_images(task)
        else:
            task.status = "failed"
            task.status_message = failure
            task.final_unit_deduction = "0"
            task.images = []
        task._changed(self._now_ms())
        del self._live[task.task_id]
        self._change_units(-task.n)
        self._callbacks.notify(task)

    def _result_images(self, task: FakeTask) -> list[dict[str, Any]]:
        base = f"{self.origin}/results/{task.task_id}/"
        images: list[dict[str, Any]] = []
        indexing = self._shapes.image_index
        for index in range(task.n):
            image: dict[str, Any] = {"url": f"{base}{index}.png"}
            if indexing == "index":
                image = {"index": index, **image}
            elif indexing == "id":
                image = {"id": "", **image}
            if task.watermark:
                image["watermark_url"] = f"{base}{index}{_WATERMARK_SUFFIX}"
            images.append(image)
        return images

    def _restore(self, tasks: list[FakeTask]) -> None:
        """Take in tasks saved by an earlier server (oldest first): finished ones
        get result URLs of this server, running ones their remaining time."""
        now = self._now_ms()
        for task in tasks:
            if task.task_id in self._tasks or task.endpoint not in self._order:
                continue
            self._tasks[task.task_id] = task
            if task.external_task_id is not None:
                self._by_external[task.external_task_id] = task
            self._order[task.endpoint].append(task)
            if task.status == "succeed":
                task.images = self._result_images(task)
            elif not task.is_terminal:
                self._live[task.task_id] = task
                self._change_units(task.n)
                self._schedule(task, elapsed=max(now - task.created_at_ms, 0) / 1000)

    def _change_units(self, delta: int) -> None:
        now = time.monotonic()
        if self._first_create is None:
            self._first_create = self._units_since = now
        self._unit_seconds += self._units * (now - self._units_since)
        self._units_since = now
        self._units += delta
        self._peak_units = max(self._peak_units, self._units)
        if self._units == 0:
            self._idle_since = now

    # --- HTTP -------------------------------------------------------------------------

    def _classify(self, method: str, path: str) -> tuple[str, str | None, str]:
        """(operation, endpoint, rest of the path) for a request's raw path.

        Split before percent-decoding, so an external_task_id holding an encoded
        ``/`` still names one task.
        """
        v1 = self._prefix + "/v1/"
        if path.startswith(v1):
            rest = path[len(v1) :]
            for endpoint in ENDPOINTS:
                if rest == endpoint:
                    if method == "POST":
                        return "create", endpoint, ""
                    if method == "GET":
                        return "list", endpoint, ""
                    return "other", endpoint, ""
                if rest.startswith(endpoint + "/"):
                    ident = rest[len(endpoint) + 1 :]
                    if method == "GET" and ident and "/" not in ident:
                        return "get", endpoint, unquote(ident)
                    return "other", endpoint, ""
            return "other", None, ""
        if path.startswith("/results/") and method in ("GET", "HEAD"):
            return "download", None, unquote(path[len("/results/") :])
        if path == "/_fake/stats" and method == "GET":
            return "stats", None, ""
        if path == "/_fake/tasks" and method == "GET":
            return "task_list", None, ""
        if path.startswith("/_fake/callbacks") and method == "POST":
            return "callback", None, ""
        return "other", None, ""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        operation, endpoint, rest = self._classify(request.method, request.rel_url.raw_path)
        route = _OP_ROUTES[operation]
        self._route_counts[route] += 1
        parsed: Any = None
        if request.body_exists:
            raw = await request.read()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = _NOT_JSON
        record: RecordedRequest | None = None
        if self._record:
            record = RecordedRequest(
                method=request.method,
                path=request.path,
                query=dict(request.query),
                route=route,
                endpoint=endpoint,
                json=None if parsed is _NOT_JSON else parsed,
                authorization=request.headers.get("Authorization"),
                arrived_at=time.monotonic(),
            )
            self._requests.append(record)

        if operation == "task_list":
            tasks = [task.to_data() | {"prompt": task.prompt} for task in self._tasks.values()]
            return self._respond(_Reply(200, json.dumps(tasks).encode(), None), record)
        if operation == "stats":
            return self._respond(_Reply(200, json.dumps(self.stats()).encode(), None), record)
        if operation == "callback":
            return self._respond(_ok("null"), record)
        if operation == "other":
            return self._respond(_error(1202, "no such method or path"), record)

        fault = self._pick_fault(route, endpoint) if self._faults else None
        if fault is None:
            return self._respond(self._serve(operation, endpoint, rest, request, parsed), record)
        if record is not None:
            record.fault = fault.kind
        if fault.delay > 0:
            await self._pause(fault.delay)
        kind = fault.kind
        if kind == "drop":
            return self._drop(request)
        if kind == "error":
            return self._respond(self._fault_error(fault), record)
        if kind == "garbage":
            return self._respond(self._garbage(fault), record)
        reply = self._serve(operation, endpoint, rest, request, parsed)
        if kind == "drop_after":
            return self._drop(request)
        if kind == "error_after":
            return self._respond(self._fault_error(fault), record)
        return self._respond(reply, record)

    def _pick_fault(self, route: str, endpoint: str | None) -> Fault | None:
        for fault in self._faults:
            if not fault.applies_to(route, endpoint) or fault.exhausted:
                continue
            if fault.probability < 1.0 and self._fault_rng.random() >= fault.probability:
                continue
            fault.hits += 1
            if fault.times is not None and fault.hits >= fault.times:
                self._faults.remove(fault)
            return fault
        return None

    async def _pause(self, seconds: float) -> None:
        # Cut short by close(), so a slow-response fault never delays teardown.
        assert self._closing is not None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._closing.wait(), timeout=seconds)

    def _fault_error(self, fault: Fault) -> _Reply:
        return _error(
            fault.code,
            fault.message or f"simulated error {fault.code}",
            http_status=fault.http_status,
            retry_after=fault.retry_after,
        )

    def _garbage(self, fault: Fault) -> _Reply:
        if fault.body is None:
            body = _DEFAULT_GARBAGE
        elif isinstance(fault.body, str):
            body = fault.body.encode()
        else:
            body = fault.body
        status = fault.http_status if fault.http_status is not None else 502
        headers = (
            None
            if fault.retry_after is None
            else {"Retry-After": _format_seconds(fault.retry_after)}
        )
        return _Reply(status, body, None, content_type="text/html", headers=headers)

    @staticmethod
    def _drop(request: web.Request) -> web.StreamResponse:
        transport = request.transport
        if transport is not None:
            transport.close()
        # Never written: aiohttp finds the transport closing, takes it for a
        # client that went away, and drops the response without logging.
        return web.Response(status=500)

    def _respond(self, reply: _Reply, record: RecordedRequest | None) -> web.Response:
        reply = self._shape(reply)
        if record is not None:
            record.http_status = reply.status
            record.code = reply.code
        return web.Response(
            body=reply.body,
            status=reply.status,
            content_type=reply.content_type,
            headers=reply.headers,
        )

    def _shape(self, reply: _Reply) -> _Reply:
        """``reply`` as :class:`WireShapes` bends Kling envelopes (not files or pages)."""
        shapes = self._shapes
        if reply.code is None or not shapes.bends_envelopes:
            return reply
        payload = json.loads(reply.body)
        status = reply.status
        if not shapes.request_id:
            payload.pop("request_id", None)
        if reply.code != 0:
            if not shapes.error_data:
                payload.pop("data", None)
            if shapes.error_http_status is not None:
                status = shapes.error_http_status
        body = json.dumps(payload, separators=(",", ":")).encode()
        return attrs.evolve(reply, status=status, body=body)

    def _callback_body(self, task: FakeTask) -> bytes:
        style = self._shapes.callback_format
        if style == "legacy":
            return task.to_json().encode()
        if style == "new_design":
            data = task.to_new_design()
        else:
            data = task.to_data()
            del data["task_info"]
        return json.dumps(data, separators=(",", ":")).encode()

    def _sign(self, message_id: str, body: bytes) -> dict[str, str]:
        timestamp = int(self._clock())
        return {
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": webhook_signature(
                self._webhook_secrets, message_id, timestamp, body
            ),
        }

    def _serve(
        self,
        operation: str,
        endpoint: str | None,
        rest: str,
        request: web.Request,
        parsed: Any,
    ) -> _Reply:
        if operation == "download":
            return self._download(rest, request)
        assert endpoint is not None
        refusal = self._authenticate(request.headers.get("Authorization"))
        if refusal is not None:
            return refusal
        if self._bucket is not None and not self._bucket.take():
            self._rate_limited += 1
            assert self._rate_limit is not None
            return _error(
                1302,
                "requests are too frequent (rate limit)",
                retry_after=self._rate_limit.retry_after,
            )
        if operation == "create":
            return self._create(endpoint, None if parsed is _NOT_JSON else parsed)
        if operation == "get":
            return self._get(endpoint, rest)
        return self._list(endpoint, request)

    def _authenticate(self, header: str | None) -> _Reply | None:
        if not header:
            return _error(1001, "authorization is empty: send 'Authorization: Bearer <token>'")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return _error(1002, "authorization is invalid: expected 'Bearer <token>'")
        if self._api_key is None and self._access_key is None:
            return None
        if self._api_key is not None and hmac.compare_digest(
            token.encode(), self._api_key.encode()
        ):
            return None
        if self._access_key is not None:
            return self._check_jwt(token)
        return _error(1002, "authorization is invalid: unknown token")

    def _check_jwt(self, token: str) -> _Reply | None:
        import jwt

        assert self._secret_key is not None
        try:
            claims = jwt.decode(
                token,
                self._secret_key,
                algorithms=["HS256"],
                # Times are checked below against the injectable clock instead.
                options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
            )
        except jwt.PyJWTError as error:
            return _error(1002, f"authorization is invalid: {error}")
        if claims.get("iss") != self._access_key:
            return _error(1002, "authorization is invalid: unknown access key (iss)")
        expires, not_before = claims.get("exp"), claims.get("nbf")
        if isinstance(expires, bool) or not isinstance(expires, (int, float)):
            return _error(1002, "authorization is invalid: the token has no numeric exp")
        if not_before is not None and (
            isinstance(not_before, bool) or not isinstance(not_before, (int, float))
        ):
            return _error(1002, "authorization is invalid: nbf must be numeric")
        now = self._clock()
        if not_before is not None and now < not_before:
            return _error(1003, "authorization is not yet valid (nbf is in the future)")
        if now >= expires:
            return _error(1004, "authorization has expired (exp is in the past)")
        return None

    def _create(self, endpoint: str, parsed: object) -> _Reply:
        try:
            body = validate_create(endpoint, parsed, self._models)
        except Rejection as rejection:
            return _error(rejection.code, rejection.message)
        external = body.get("external_task_id")
        if external is not None and external in self._by_external:
            duplicate = invalid("external_task_id", "external_task_id already exists")
            return _error(duplicate.code, duplicate.message)
        if self._quota_error is not None:
            return _error(self._quota_error, "resource pack exhausted (simulated)")
        n = body.get("n") or 1
        limit = self._concurrency_limit
        if limit is not None and self._units + n > limit:
            self._creates_rejected_concurrency += 1
            return _error(
                1303,
                f"parallel tasks over the resource pack limit: {self._units} of {limit} "
                f"units in use, this task needs {n}",
            )
        task = self._create_task(endpoint, body, external)
        data: dict[str, Any] = {"task_id": task.task_id}
        if self._shapes.create_answer == "full":
            data.update(
                task_status=task.status,
                task_info={"external_task_id": external or ""},
                created_at=task.created_at_ms,
                updated_at=task.updated_at_ms,
            )
        return _ok(json.dumps(data, separators=(",", ":")))

    def _get(self, endpoint: str, ident: str) -> _Reply:
        task = self._tasks.get(ident)
        if task is None or task.endpoint != endpoint:
            task = self._by_external.get(ident)
        if task is None or task.endpoint != endpoint:
            return _error(1203, f"task not found: {ident}")
        return _ok(task.to_json())

    def _list(self, endpoint: str, request: web.Request) -> _Reply:
        bounds = (("pageNum", 1, MAX_PAGE_NUMBER), ("pageSize", DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE))
        values: list[int] = []
        for name, default, highest in bounds:
            text = request.query.get(name)
            try:
                value = default if text is None else int(text)
            except ValueError:
                value = 0
            if not 1 <= value <= highest:
                rejection = invalid(name, f"must be an integer between 1 and {highest}")
                return _error(rejection.code, rejection.message)
            values.append(value)
        page, size = values
        tasks = self._order[endpoint]
        stop = len(tasks) - (page - 1) * size
        start = max(stop - size, 0)
        page_tasks = tasks[start:stop] if stop > 0 else []
        return _ok("[" + ",".join(task.to_json() for task in reversed(page_tasks)) + "]")

    def _download(self, rest: str, request: web.Request) -> _Reply:
        task_id, _, name = rest.partition("/")
        task = self._tasks.get(task_id)
        if task is None or task.status != "succeed":
            return _not_found_file()
        watermark = name.endswith(_WATERMARK_SUFFIX)
        index_text = name[: -len(_WATERMARK_SUFFIX)] if watermark else name.removesuffix(".png")
        if (
            index_text == name
            or not (index_text.isascii() and index_text.isdigit())
            or int(index_text) >= len(task.images)
        ):
            return _not_found_file()
        if watermark and not task.watermark:
            return _not_found_file()
        data = encode_png(*size_for_aspect_ratio(task.aspect_ratio), watermark=watermark)
        headers = {"Accept-Ranges": "bytes", "Cache-Control": "public, max-age=2592000"}
        if "Range" not in request.headers:
            return _Reply(200, data, None, content_type="image/png", headers=headers)
        size = len(data)
        try:
            wanted = request.http_range
        except ValueError:
            wanted = None
        start = wanted.start if wanted is not None else None
        if start is not None and start < 0:  # a suffix range: the last -start bytes
            start = max(size + start, 0)
        if wanted is None or start is None or start >= size:
            headers["Content-Range"] = f"bytes */{size}"
            return _Reply(416, b"", None, content_type="image/png", headers=headers)
        stop = size if wanted.stop is None else min(wanted.stop, size)
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
        return _Reply(206, data[start:stop], None, content_type="image/png", headers=headers)
