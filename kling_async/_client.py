"""The Client: configuration in, resources out, one session for everything."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import sys
import warnings
from collections.abc import AsyncIterator, Callable, Iterable
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from ._auth import Credentials, JWTCredentials, StaticToken, resolve_credentials
from ._batch import Batch, BatchRequests
from ._budget import Budget, as_budget
from ._callbacks import CallbackReceiver
from ._config import DEFAULT_TIMEOUT, PollPolicy, RetryPolicy, resolve_base_url
from ._download import DownloadSource, download, read_image
from ._durations import (
    DurationCache,
    DurationLearner,
    DurationStore,
    default_cache_path,
    scope_of,
)
from ._exceptions import ConfigurationError
from ._handle import TaskHandle
from ._journal import Journal, JournalDurations
from ._ledger import Ledger, MemoryLedger
from ._limiter import ConcurrencyLimiter, Limiter
from ._models import ImageResult, Task, TaskRequest
from ._pricing import DEFAULT_PRICES, Estimate, PriceTable
from ._resources import Account, Images
from ._submissions import Submissions
from ._tracking import Tracker
from ._transport import Transport

__all__ = ["Client"]

logger = logging.getLogger("kling_async")


class Client:
    """An asynchronous Kling API client.

    ::

        async with kling_async.Client() as client:
            handle = await client.images.generate(prompt="a red fox")
            task = await handle

    Parameters (all but ``api_key`` keyword-only):

    ``api_key``
        A bearer token: the official API's key (works for every model) or a
        gateway's token. Else ``KLING_API_KEY``.
    ``access_key``, ``secret_key``
        The official API's key pair, signed into JWTs (needs the ``jwt``
        extra). Else ``KLING_ACCESS_KEY`` + ``KLING_SECRET_KEY``. Missing
        credentials are reported at the first request.
    ``credentials``
        Any object with the :class:`Credentials` protocol instead of keys, e.g.
        a custom token provider.
    ``base_url``
        The API root before ``/v1``; else ``KLING_BASE_URL``; else, with the
        official key pair (``access_key``/``secret_key``), the official API
        (:data:`OFFICIAL_BASE_URL`), and with a bearer token the powertokens
        gateway (:data:`DEFAULT_BASE_URL`). The root in use is logged at DEBUG.
    ``max_concurrency``
        The account's concurrency quota in units (a task holds ``n`` from
        creation until it ends): creates then queue locally for free units,
        adapt when Kling answers 1303, and never fail with it. Without it each
        create is sent at once and a 1303 raises :class:`ConcurrencyLimitError`.
        A :class:`ConcurrencyLimiter` may be passed instead of a number (one
        shared by several clients of the account), or any :class:`Limiter`
        (``kling_async.contrib.redis`` has one shared by processes).
    ``timeout``
        Bounds each HTTP exchange: seconds, or an ``aiohttp.ClientTimeout``
        (default 60 s total, 10 s to connect).
    ``max_connections``
        The size of the connection pool (default 100).
    ``retry``, ``polling``
        A :class:`RetryPolicy` and a :class:`PollPolicy`.
    ``session``
        An ``aiohttp.ClientSession`` you own, to share; the client leaves it open.
    ``callbacks``
        A :class:`CallbackReceiver`: tasks are created with a per-task callback
        URL and resolve as soon as Kling reports them, polling slowed to a
        safety net.
    ``ledger``
        Where every create is recorded before it is sent (a :class:`Ledger`;
        default a :class:`MemoryLedger`).
    ``journal``
        A path, or a :class:`Journal`: a durable SQLite ledger that
        :meth:`resume` reads after a crash (instead of ``ledger``).
    ``prices``
        The :class:`PriceTable` that :meth:`estimate` prices requests with
        (default :data:`DEFAULT_PRICES`, Kling's published prices), and that
        budgets reserve estimates from.
    ``budget``
        The most this client may spend, in resource-pack units (a number, or a
        :class:`Budget` shared with other clients): each create's estimate is
        reserved before it is sent, and a create it would take past the budget
        is refused with :class:`BudgetExceededError`, nothing sent. Under a
        budget, a request the price table cannot estimate is refused with
        :class:`UnknownPriceError` rather than guessed. Tasks re-attached by
        :meth:`resume` count too.
    ``durations_cache``
        Where how long tasks took is kept between runs, so that a first round
        is polled on the learned schedule: a file path, ``True`` (the default
        place: ``$KLING_DURATIONS_CACHE``, else ``kling-async/durations.json``
        in the user's cache directory, ``$XDG_CACHE_HOME`` respected), or
        ``False`` for nowhere (``KLING_DURATIONS_CACHE=off`` says the same).
        With a journal (``journal=`` or a :class:`Journal` as ``ledger``),
        ``True`` keeps them in the journal instead, in a table of their own.
        Read on first use, written on close; safe to delete.

    No I/O happens in the constructor: the session is created on first use, on
    the running event loop. Use ``async with`` or ``await client.close()``.
    """

    def __init__(
        self,
        api_key: str | None = None,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        base_url: str | None = None,
        credentials: Credentials | None = None,
        max_concurrency: int | Limiter | None = None,
        timeout: float | aiohttp.ClientTimeout | None = None,
        max_connections: int = 100,
        retry: RetryPolicy | None = None,
        polling: PollPolicy | None = None,
        session: aiohttp.ClientSession | None = None,
        callbacks: CallbackReceiver | None = None,
        ledger: Ledger | None = None,
        journal: str | os.PathLike[str] | Journal | None = None,
        prices: PriceTable = DEFAULT_PRICES,
        budget: Budget | Decimal | int | str | None = None,
        durations_cache: str | os.PathLike[str] | bool = True,
    ) -> None:
        self._created_at = _caller(self)
        #: The prices :meth:`estimate` uses: Kling's published ones unless given.
        self.prices = prices
        #: The client's :class:`Budget` (``None`` without one): ``await
        #: client.budget.state()`` says what is spent, reserved and left.
        self.budget = as_budget(budget, "budget")
        if credentials is None:
            credentials = resolve_credentials(api_key, access_key, secret_key)
        elif api_key or access_key or secret_key:
            raise ConfigurationError("give credentials or keys, not both")
        self.base_url = resolve_base_url(
            base_url, official_credentials=isinstance(credentials, JWTCredentials)
        )
        timeout = _checked_settings(timeout, max_connections, max_concurrency)
        self._auth_kind = (
            "bearer token"
            if isinstance(credentials, StaticToken)
            else "access key (JWT)"
            if isinstance(credentials, JWTCredentials)
            else "none"
            if credentials is None
            else type(credentials).__name__
        )
        logger.debug("API root %s (credentials: %s)", self.base_url, self._auth_kind)
        self._transport = Transport(
            base_url=self.base_url,
            credentials=credentials,
            timeout=timeout,
            max_connections=max_connections,
            retry=retry or RetryPolicy(),
            session=session,
        )
        # Journals this client opened from a path: it closes them.
        self._journals: dict[Path, Journal] = {}
        if journal is not None:
            if ledger is not None:
                raise ConfigurationError("give a ledger or a journal, not both")
            ledger = self._journal(journal)
        self._tracker = Tracker(
            self._transport,
            polling or PollPolicy(),
            DurationLearner(_durations_cache(durations_cache, self.base_url, ledger)),
        )
        #: The receiver Kling's callbacks for this client's tasks arrive at, if any.
        self.callbacks = callbacks
        if callbacks is not None:
            callbacks.attach(self._tracker)
        #: Units of the account's concurrency quota this client holds, when
        #: ``max_concurrency`` was given (``None`` otherwise).
        self.limiter = (
            ConcurrencyLimiter(max_concurrency)
            if isinstance(max_concurrency, int)
            else max_concurrency
        )
        # Without max_concurrency, batches share a limiter that learns the quota.
        self._learned_limiter: ConcurrencyLimiter | None = None
        #: The client a with_options() copy was made from (it closes everything).
        self._view_of: Client | None = None
        self._submissions = Submissions(
            self._transport,
            self._tracker,
            ledger if ledger is not None else MemoryLedger(),
            receiver=callbacks,
            limiter=self.limiter,
            prices=prices,
            budget=self.budget,
        )
        #: Image task APIs: ``generate``, ``multi_image``, ``get``, ``list``, ``attach``.
        self.images = Images(self._transport, self._tracker, self._submissions)
        #: The account's resource packs: ``costs``.
        self.account = Account(self._transport)

        # A shared ledger (contrib.redis) is bound to the Kling account it records for.
        attach_client = getattr(ledger, "attach_client", None)
        if attach_client is not None:
            attach_client(self)

    @classmethod
    @contextlib.asynccontextmanager
    async def offline(cls, *, task_seconds: float = 2.0, **options: Any) -> AsyncIterator[Client]:
        """A client of an offline simulation: an embedded
        :class:`~kling_async.testing.FakeKlingServer` on 127.0.0.1, started here
        and stopped on exit, which follows the Kling API and makes placeholder
        PNGs instead of generations (tasks take ``task_seconds``). Needs no key
        and no second process; the way to try the library, or to run an
        application's own code, with nothing sent to Kling::

            async with kling_async.Client.offline() as client:
                task = await client.images.run(ImageGenerationRequest(prompt="a fox"))

        ``options`` are :class:`Client`'s keyword arguments, except credentials
        and ``base_url`` (the simulation's own). It is never chosen silently: a
        ``Client()`` without a key still reports the missing key.
        """
        taken = sorted(
            {"api_key", "access_key", "secret_key", "credentials", "base_url"} & set(options)
        )
        if taken:
            raise TypeError(f"Client.offline() chooses {', '.join(taken)} itself")
        from .testing import FakeKlingServer  # the simulation is only loaded when asked for

        async with FakeKlingServer(
            task_duration=task_seconds, processing_delay=task_seconds / 4
        ) as server:
            logger.info("offline simulation at %s: images are placeholders", server.url)
            async with cls("offline-simulation", base_url=server.url, **options) as client:
                yield client

    def with_options(
        self,
        *,
        timeout: float | aiohttp.ClientTimeout | None = None,
        retry: RetryPolicy | None = None,
    ) -> Client:
        """This client with another request ``timeout`` or ``retry`` policy, for the
        calls made through it: ``await client.with_options(timeout=5).images.get(id)``.

        The copy shares everything else with this client (its connection pool,
        credentials, concurrency limiter, ledger, callbacks and the tasks it
        tracks), so it costs nothing to make and needs no closing: closing this
        client ends its copies too.
        """
        view = copy.copy(self)
        checked = _checked_settings(timeout, 1, None) if timeout is not None else None
        view._transport = self._transport.derived(timeout=checked, retry=retry)
        view._submissions = self._submissions.with_transport(view._transport)
        view.images = Images(view._transport, self._tracker, view._submissions)
        view.account = Account(view._transport, self.account.pacer)
        view._view_of = self
        return view

    def estimate(self, requests: TaskRequest | Iterable[TaskRequest]) -> Estimate:
        """What a request, or a batch of them (added up), will cost at most, from
        the client's price table; nothing is sent. Raises
        :class:`UnknownPriceError` for a request the table cannot price, rather
        than guess::

            estimate = client.estimate(ImageGenerationRequest(prompt="a fox", n=4))
            estimate.units, estimate.money, estimate.currency  # 32, 0.112, "USD"
        """
        if isinstance(requests, TaskRequest):
            return self.prices.estimate(requests)
        return self.prices.total(requests)

    @property
    def ledger(self) -> Ledger:
        """Where every create of this client is recorded before it is sent;
        ``await client.ledger.unsettled()`` lists creates not yet settled."""
        return self._submissions.ledger

    def _journal(self, journal: str | os.PathLike[str] | Journal) -> Journal:
        """The journal at a path (opened once per client, closed with it), or the
        caller's own :class:`Journal`."""
        if isinstance(journal, Journal):
            return journal
        path = Path(journal).absolute()
        if path not in self._journals:
            self._journals[path] = Journal(path)
        return self._journals[path]

    async def resume(self) -> list[TaskHandle]:
        """Settle every create the ledger holds that did not end (after a crash,
        read from a :class:`Journal`), and return the handles of its tasks.

        A create Kling confirmed is re-attached by its task_id (polled, holding
        its concurrency units until it ends). One that may or may not have landed
        is looked up by its external_task_id, and sent again, under the same id,
        only if Kling has no such task. Creates that cannot be settled now (Kling
        unreachable) stay in the ledger, logged, for the next ``resume()``.
        """
        return await self._submissions.resume()

    async def download(
        self,
        source: DownloadSource,
        directory: str | os.PathLike[str],
        *,
        concurrency: int = 4,
        overwrite: bool = False,
        watermarked: bool = False,
    ) -> list[Path]:
        """Save every image of a finished task (or handle, or a list of images) in
        ``directory`` and return the paths, in image order.

        Files are named ``<task_id>_<index>.<ext>`` (``<index>.<ext>`` for bare
        images; by position instead of index if Kling's indexes repeat),
        streamed in chunks, and written to a temporary file that is renamed into
        place when complete, so an existing file is always whole and is skipped
        unless ``overwrite``. Transient failures are retried; at most
        ``concurrency`` files download at once. If one image fails, the others
        are stopped (their partial files removed) before the error is raised.
        ``watermarked`` fetches the watermarked copies, named
        ``<task_id>_<index>_watermarked.<ext>``. No credentials are sent to the
        result URLs.

        A failed task raises :class:`TaskFailedError`, and a task that has not
        finished ``ValueError``: neither has images to save.
        """
        paths = await download(
            self._transport,
            source,
            directory,
            concurrency=concurrency,
            overwrite=overwrite,
            watermarked=watermarked,
        )
        if isinstance(source, (Task, TaskHandle)):
            self._submissions.note_downloaded(source.task_id, [str(path) for path in paths])
        return paths

    async def read(self, image: ImageResult | str, *, watermarked: bool = False) -> bytes:
        """The bytes of one result image (an :class:`ImageResult`, or its URL),
        without touching the disk: e.g. to upload them elsewhere or open them
        with an imaging library. Transient failures are retried; no credentials
        are sent to the result URL. ``watermarked`` reads an image's
        watermarked copy.
        """
        return await read_image(self._transport, image, watermarked=watermarked)

    def batch(
        self,
        requests: BatchRequests,
        *,
        max_in_flight: int | None = None,
        journal: str | os.PathLike[str] | Journal | None = None,
        name: str = "batch",
        max_units: Budget | Decimal | int | str | None = None,
    ) -> Batch:
        """Run many requests through the account's concurrency quota.

        Returns an async iterator of :class:`BatchResult` in completion order
        (``await batch.collect()`` gives a list in input order). Requests are
        submitted as quota units free up: the client's ``max_concurrency`` when
        set, else a limit learned from Kling's 1303 answers, starting small.
        ``max_in_flight`` also caps how many tasks run at once. One request's
        failure is one result with an ``error``; a problem of the whole account
        (quota used up, IP whitelist, credentials) stops the batch and is raised.

        With a ``journal`` (a path or a :class:`Journal`), each request is recorded
        under a key: its own, given as ``BatchItem(request, key=...)`` (the
        idempotency key), else one made of ``name``, its content and how many
        identical requests precede it (never its position, so editing, inserting
        or deleting other requests changes nothing for it). Running the same batch
        again (after a crash, Ctrl-C or a kill) skips what is done:
        a request whose task ended comes back as a result read from the journal
        (``result.resumed``), one in flight is re-attached, one whose create may
        have landed is looked up before it is sent again. Nothing is created twice.

        ``max_units`` caps what the batch may spend, in resource-pack units,
        besides the client's ``budget``: a request whose estimate would take the
        batch past it is not sent and comes out with a
        :class:`BudgetExceededError`. A rerun over the same journal counts what
        the earlier runs' tasks were billed. ``batch.cost`` adds up what the
        results were estimated at and billed.
        """
        limiter = self.limiter
        if limiter is None:
            if self._learned_limiter is None:
                self._learned_limiter = ConcurrencyLimiter(None)
            limiter = self._learned_limiter
        return Batch(
            self._submissions,
            self._tracker,
            requests,
            limiter=limiter,
            max_in_flight=max_in_flight,
            journal=self._journal(journal) if journal is not None else None,
            name=name,
            budget=as_budget(max_units, "max_units"),
        )

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._transport.closed

    async def close(self) -> None:
        """Close the client. Idempotent.

        Creates still waiting for quota units are dropped (nothing was sent);
        creates on the wire get their answer first, bounded by the request
        timeout, so a task Kling created is attached, not lost (those that cannot
        be settled are logged with their external_task_ids and stay listed by
        the ledger). Then polling stops, pending waits end with
        :class:`ClientClosedError`, every concurrency unit this client's tasks
        held is given back, and the session is closed.
        """
        if self._view_of is not None:
            return  # a with_options() copy owns nothing: its client closes it all
        if self._transport.closed:
            return
        await self._submissions.close()
        if self.callbacks is not None:
            self.callbacks.detach(self._tracker)
        await self._tracker.close()
        await self._transport.close()
        journals, self._journals = self._journals, {}
        for journal in journals.values():
            await journal.close()

    async def __aenter__(self) -> Client:
        """Enter: the client's journal, if it has one, is opened and owned now, so
        a journal another run holds is refused here (:class:`JournalInUseError`)
        rather than at the first create; a shared ledger (``contrib.redis``)
        whose namespace belongs to another Kling account is refused here too
        (:class:`ConfigurationError`)."""
        ledger = self._submissions.ledger
        if isinstance(ledger, Journal):
            await ledger.open()
        else:
            opening = getattr(ledger, "open", None)  # a shared ledger binds its namespace
            if opening is not None:
                await opening()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Client {self.base_url} auth={self._auth_kind} {state}>"

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        # Named after this package, with where the client was made: aiohttp's own
        # "Unclosed client session" says neither. (_warn is bound early because
        # module globals may be gone when this runs at interpreter exit.)
        transport = getattr(self, "_transport", None)  # None if __init__ raised
        if transport is not None and transport.holds_session:
            _warn(
                f"unclosed kling_async.Client {self!r} created at {self._created_at}: "
                "use 'async with kling_async.Client(...)' or 'await client.close()'",
                ResourceWarning,
                source=self,
            )
            transport.abandon()


def _caller(client: Client) -> str:
    """``file:line`` of the code that constructs ``client``, for the unclosed warning."""
    frame = sys._getframe(1)  # Client.__init__
    while frame.f_back is not None and frame.f_locals.get("self") is client:
        frame = frame.f_back  # past Client.__init__ and any subclass's __init__
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


def _checked_settings(
    timeout: object, max_connections: object, max_concurrency: object
) -> aiohttp.ClientTimeout:
    """Refuse settings that would fail later, or silently mean something else
    (aiohttp reads a pool limit of 0 as "no limit"), and return the timeout."""
    if isinstance(timeout, aiohttp.ClientTimeout):
        checked = timeout
    elif timeout is None:
        checked = DEFAULT_TIMEOUT
    elif (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not 0 < timeout < math.inf
    ):
        raise ConfigurationError(
            "timeout must be a positive number of seconds or an aiohttp.ClientTimeout; "
            f"got {timeout!r}"
        )
    else:
        checked = aiohttp.ClientTimeout(total=timeout, connect=min(10.0, timeout))
    if isinstance(max_connections, bool) or not isinstance(max_connections, int):
        raise ConfigurationError(f"max_connections must be an integer; got {max_connections!r}")
    if max_connections < 1:
        raise ConfigurationError(f"max_connections must be at least 1; got {max_connections}")
    if isinstance(max_concurrency, int) and max_concurrency < 1:
        raise ConfigurationError(
            f"max_concurrency must be at least 1 (the account's quota in units); "
            f"got {max_concurrency}"
        )
    return checked


def _durations_cache(
    setting: str | os.PathLike[str] | bool, base_url: str, ledger: Ledger | None
) -> DurationStore | None:
    """Where learned durations are kept, as ``Client(durations_cache=...)`` asks:
    by default in the client's journal when it has one, else the user's cache file."""
    if setting is False:
        return None
    path = default_cache_path() if setting is True else Path(setting)
    if path is None:  # KLING_DURATIONS_CACHE=off: nowhere, the journal included
        return None
    if setting is True and isinstance(ledger, Journal):
        return JournalDurations(ledger, scope_of(base_url))
    return DurationCache.for_base_url(path, base_url)
