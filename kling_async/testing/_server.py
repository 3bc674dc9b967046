"""The fake Kling API server: a real aiohttp application on loopback.

:class:`FakeKlingServer` is the public face: it builds the parts (``_handlers``
for the API over plain data, ``_lifecycle`` for tasks and their timers,
``_quota``, ``_auth``, ``_faults``, ``_files``), runs them behind the aiohttp
adapter (``_adapter``) and reports what they saw.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Collection, Sequence
from decimal import Decimal
from typing import Any, Final

from aiohttp import web

from kling_async._pricing import DEFAULT_PRICES, PriceTable

from ._adapter import make_app
from ._endpoints import COSTS_PATH, RECOGNIZE_PATH, endpoints
from ._handlers import FakeApi
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
from ._state import StateWriter, load_tasks
from ._tasks import DEFAULT_FAILURE_MESSAGE, FAIL_MARKER, FakeTask

__all__ = ["DEFAULT_FAILURE_MESSAGE", "FAIL_MARKER", "FakeKlingServer"]

HOST: Final = "127.0.0.1"


def fault_endpoints() -> tuple[str, ...]:
    """What ``inject(endpoint=...)`` may name: every declared task endpoint,
    and the synchronous ones (image recognition, account costs)."""
    return (*endpoints(), RECOGNIZE_PATH, COSTS_PATH)


def fault_endpoint(given: str) -> str:
    """The endpoint a fault for ``given`` matches: a task endpoint's or a
    synchronous endpoint's path, with or without its leading ``/`` and
    ``/v1/`` (``"/v1/videos/image-recognize"``, ``"account/costs"``)."""
    relative = given.removeprefix("/").removeprefix("v1/")
    known = fault_endpoints()
    if relative not in known:
        raise ValueError(f"unknown endpoint {given!r}; one of {known}")
    return relative


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
        a JSON file the tasks are loaded from on start and written through to
        (merged with what it holds then), so that a server started later
        knows them: the CLI's offline simulation keeps its tasks between
        commands this way. Every change is on disk before the server's next
        answer leaves (a change no answer follows, within 50 ms), by an atomic
        replace: a server killed at any moment, SIGKILL included, loses no
        task whose create it answered. Tasks still running resume their timers
        from their creation time; images and callback URLs are not kept. A
        missing or unreadable file starts empty.
    ``prices``
        the :class:`~kling_async.PriceTable` tasks are billed by (default
        Kling's published prices, :data:`~kling_async.DEFAULT_PRICES`): a task
        that succeeds reports ``final_unit_deduction`` (and, in new-design
        callbacks, ``billing[]``) of its row's price times the images it made;
        a failed one reports 0. :attr:`billed_units` adds them up.
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
        prices: PriceTable = DEFAULT_PRICES,
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
            prices=prices,
        )
        self._options = options
        self._api = FakeApi.build(options)
        self._runner: web.AppRunner | None = None
        self._state: StateWriter | None = None
        self._closing: asyncio.Event | None = None
        self._port: int | None = None
        self._closed = False

    # --- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        """Start listening on 127.0.0.1. A server starts once; use a new one after
        :meth:`close`."""
        if self._runner is not None or self._closed:
            raise RuntimeError("a FakeKlingServer can be started only once")
        self._api.auth.require_library()
        self._closing = asyncio.Event()
        app = make_app(self._api, self._closing)
        if self._options.state_file is not None:
            state = StateWriter(self._options.state_file, lambda: self._api.book.tasks.values())
            self._api.book.on_change = state.changed

            async def written_through(_request: web.BaseRequest, _response: object) -> None:
                # Before the answer's first byte: a client told of a task can
                # count on a server killed after that to know it.
                await state.written()

            app.on_response_prepare.append(written_through)
            self._state = state
        # A short shutdown timeout: a client stuck in a slow response must not
        # hold up a test's teardown.
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=1.0,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, HOST, self._options.port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._port = int(runner.addresses[0][1])
        self._runner = runner
        state_file = self._options.state_file
        self._api.book.open(self.origin, [] if state_file is None else load_tasks(state_file))

    async def close(self) -> None:
        """Stop the server, cancel task timers and pending callbacks; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._closing is not None:
            self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
        await self._api.book.close()
        if self._state is not None and self._runner is not None:
            self._state.close()

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
        return self.origin + self._options.path_prefix

    @property
    def tasks(self) -> dict[str, FakeTask]:
        """Every task created so far, by task_id (the server's own dict: read it,
        change tasks only through :meth:`finish`)."""
        return self._api.book.tasks

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received, in arrival order (if ``record_requests``)."""
        return self._api.requests

    @property
    def callbacks(self) -> list[CallbackRecord]:
        """Every callback delivery attempt, in attempt order."""
        return self._api.book.callbacks.records

    @property
    def faults(self) -> list[Fault]:
        """Injected faults that can still apply."""
        return list(self._api.faults.active)

    @property
    def units_in_use(self) -> int:
        """Concurrency units held by tasks that have not ended."""
        return self._api.quota.in_use

    @property
    def peak_units(self) -> int:
        """The most units ever held at once."""
        return self._api.quota.peak

    @property
    def billed_units(self) -> Decimal:
        """Resource-pack units deducted for every task that ended, as Kling
        would bill them (see ``prices``)."""
        return sum(
            (Decimal(task.final_unit_deduction) for task in self._api.book.tasks.values()),
            Decimal(0),
        )

    @property
    def live_tasks(self) -> int:
        """How many tasks have not ended yet."""
        return len(self._api.book.live)

    def task(self, task_id: str) -> FakeTask:
        """The task with this task_id or external_task_id; :class:`KeyError` if none."""
        task = self._api.book.tasks.get(task_id) or self._api.book.by_external.get(task_id)
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
            for request in self._api.requests
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
        return self._api.quota.utilisation(limit)

    def stats(self) -> dict[str, Any]:
        """The figures ``GET /_fake/stats`` serves, as a dict."""
        return self._api.stats()

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
        ``body`` (default an HTML error page) with ``http_status`` (default 502);
        ``"garbage_after"`` acts and then answers ``body`` (default the real
        answer cut in half) with ``http_status`` (default 200): an unreadable
        success; ``"exists"`` acts and then answers 1201 "external_task_id
        already exists" (``message`` to change it), as a send racing another
        send of the same create is answered.
        ``delay`` also applies before any other kind.

        ``route`` (``"create"``, ``"get"``, ``"list"``, ``"download"`` or
        ``"any"``) and ``endpoint`` (e.g. ``"images/generations"``, or a
        synchronous endpoint's path: ``"/v1/videos/image-recognize"``,
        ``"/account/costs"``, whose requests count as the ``"create"`` and
        ``"get"`` routes) pick the requests; ``times`` how many it applies to (``None``: no end);
        ``probability`` the chance it applies to each (seeded by ``seed``).
        Faults are tried in injection order and at most one applies per request.
        They come before authentication and rate limiting; ``/_fake/`` is exempt.

        Note that aiohttp's client repeats an idempotent request (GET) once by
        itself when the connection drops, so one ``"drop"`` of a get is
        invisible to an aiohttp client: use ``times=2`` or more to see it.
        """
        if endpoint is not None:
            endpoint = fault_endpoint(endpoint)
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
        self._api.faults.active.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Remove every injected fault."""
        self._api.faults.active.clear()

    def finish(self, task_id: str, *, failure: str | None = None) -> FakeTask:
        """End a task now: it succeeds, or fails with ``failure`` when given.

        ``task_id`` may also be an external_task_id. Raises :class:`KeyError` for
        an unknown task and :class:`ValueError` for one that already ended.
        """
        task = self.task(task_id)
        if task.is_terminal:
            raise ValueError(f"task {task.task_id} already ended ({task.status})")
        self._api.book.end(task, failure)
        return task

    async def flush_callbacks(self) -> None:
        """Wait until every callback due so far has been attempted (updates held
        back by a ``reorder`` fault wait for their task's next update)."""
        await self._api.book.callbacks.flush()
