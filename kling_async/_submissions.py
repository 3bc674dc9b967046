"""One owner for the life of every create, from intent to a tracked task.

``generate``, ``multi_image``, ``submit``, batches and ``close`` all go through
:class:`Submissions`. For each create it:

1. fixes the external_task_id (and the callback URL) before anything is sent;
2. records the intent in the ledger, durably when the ledger is durable;
3. waits for the task's ``n`` units of the concurrency quota, when limited;
4. sends, and settles the outcome by the pure rules of ``_create_rules``:
   created (a task_id), not created, or uncertain, looking the id up after any
   ambiguous failure and across 1303 re-queues, always under the same id;
5. hands the task to the tracker, holding its units until it ends (once per
   task, whoever settles it) or turns out gone (Kling answers 1203 for it:
   :class:`TaskNotFoundError`, the entry settled ``gone``).

Under a budget (``Client(budget=...)``, a batch's ``max_units``) the create's
estimate is reserved before step 2, and the create refused with
:class:`BudgetExceededError` (nothing recorded, nothing sent) when it does not
fit; the reservation is settled by what Kling deducted when the task ends, or
released when the create did not land (see ``_budget``). A request the price
table cannot estimate is refused under a budget (:class:`UnknownPriceError`):
a guess could overrun it.

Whatever a user-supplied ledger or limiter raises, the caller gets its handle
or an error carrying the external_task_id, and the failure is logged; a ledger
that cannot record or flush the intent stops the create before it is sent.
``resume()`` leaves alone the creates this process is running.

The work runs in a task of its own (the *runner*), so the caller's coroutine
may be cancelled at any point without cutting a create short: one still queued
for units is dropped (nothing was sent), one on the wire settles in the
background, stays attached to the client and is logged at WARNING with its
ids. ``close()`` waits, bounded by the request timeout, for creates on the wire
to settle, reports those it cannot settle, and gives back every unit its tasks
held.
"""

from __future__ import annotations

import asyncio
import copy
import enum
import logging
import secrets
import time
import weakref
from collections.abc import Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final

import attrs

from ._budget import Budget
from ._create_rules import CreateProgress, Decision, Step, after_lookup, after_sent, never_sent
from ._endpoints import UnitsRule, by_request_type, declaration_for
from ._exceptions import (
    ClientClosedError,
    ConfigurationError,
    KlingError,
    NotFoundError,
    TaskNotFoundError,
    UnknownPriceError,
    ValidationError,
    for_create,
)
from ._handle import TaskHandle
from ._ledger import EntryState, Ledger, LedgerEntry
from ._limiter import Limiter
from ._models import (
    BalanceDeduction,
    Endpoint,
    Task,
    TaskRequest,
    TaskStatus,
    request_from_mapping,
)
from ._pricing import DEFAULT_PRICES, PriceTable
from ._wire import Envelope, WireRequest, create_request, get_request, parse_created

if TYPE_CHECKING:
    from ._callbacks import CallbackReceiver
    from ._tracking import TaskState, Tracker
    from ._transport import Transport


logger = logging.getLogger("kling_async")

#: How long ``close()`` waits for creates on the wire when the client has no
#: request timeout of its own.
DEFAULT_CLOSE_WAIT: Final = 60.0


def new_external_task_id() -> str:
    """A fresh external_task_id, 32 hex digits: the time in milliseconds (12),
    then 80 random bits from the OS (20), so forked workers never repeat each
    other's (a seeded PRNG would). In time order, so that a journal adds each
    new id at the end of its index of ids rather than each on a page of its
    own: a commit of five intents and five created states writes 8 pages to
    the WAL, against 12 with ids all random."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"


class Phase(enum.Enum):
    """Where a create is, as far as giving it up goes."""

    QUEUED = "queued"
    """Waiting for quota units, nothing that may have landed: safe to drop."""
    ON_THE_WIRE = "on the wire"
    """Sent, or settling whether a send landed: it must run to its end."""
    SETTLED = "settled"


class _UseLimiter(enum.Enum):
    CLIENT = enum.auto()


CLIENT_LIMITER: Final = _UseLimiter.CLIENT
"""``start()``'s default: the client's own limiter, if it has one."""


class Submission:
    """One create in progress.

    :attr:`result` resolves to the task's handle, or to the error that ended the
    create (carrying its ``external_task_id``); it is cancelled when the create
    was given up before anything was sent.
    """

    __slots__ = (
        "_on_admitted",
        "_watchers",
        "abandoned",
        "batch",
        "budgets",
        "estimate",
        "external_task_id",
        "holding",
        "key",
        "ledger",
        "look_up_first",
        "phase",
        "possibly_landed",
        "reached_kling",
        "receiver_callback",
        "request",
        "result",
        "runner",
        "send_refusal",
        "uncertain",
        "unwatched",
    )

    def __init__(
        self,
        request: TaskRequest,
        *,
        ledger: Ledger,
        receiver_callback: bool,
        key: str | None = None,
        look_up_first: bool = False,
        on_admitted: Callable[[], None] | None = None,
        budgets: tuple[Budget, ...] = (),
        estimate: Decimal | None = None,
        batch: str | None = None,
    ) -> None:
        assert request.external_task_id is not None
        self.request = request
        self.ledger = ledger
        self.look_up_first = look_up_first
        self.external_task_id: str = request.external_task_id
        self.receiver_callback = receiver_callback
        self.key = key
        self.result: asyncio.Future[TaskHandle] = asyncio.get_running_loop().create_future()
        self._watchers: list[asyncio.Future[TaskHandle]] = []
        self.phase = Phase.QUEUED
        self.abandoned = False
        self.unwatched = False  # its caller was cancelled: only the log will tell
        self.holding = False  # the create's units are held in its limiter
        self.possibly_landed = False
        #: Whether any request of this create (a send or a lookup) reached Kling.
        self.reached_kling = False
        self.uncertain = False  # settled without knowing whether Kling has the task
        self.runner: asyncio.Task[None] | None = None
        self._on_admitted = on_admitted
        #: The budgets the create's estimate (resource-pack units) is reserved in.
        self.budgets = budgets
        self.estimate = estimate
        self.batch = batch
        #: Set when a resumed create was counted over budget (or its budget
        #: could not answer): it may be looked up (it may exist, and is billed
        #: if it does) but never sent again.
        self.send_refusal: KlingError | None = None

    @property
    def units(self) -> int:
        """The task's share of the concurrency quota, as its endpoint declares
        (``n``; one per task; the most an ``auto`` series may produce)."""
        return by_request_type(self.request).units.held(self.request)

    def watch(self) -> asyncio.Future[TaskHandle]:
        """A future of the create's outcome for one caller to await. Cancelling it
        (the caller was cancelled) leaves :attr:`result` alone, as
        ``asyncio.shield`` would; it is settled together with :attr:`result`,
        not one pass of the event loop later."""
        watcher: asyncio.Future[TaskHandle] = self.result.get_loop().create_future()
        if self.result.done():
            _copy_outcome(self.result, watcher)
        else:
            self._watchers.append(watcher)
        return watcher

    def settle(self, handle: TaskHandle | None = None, error: BaseException | None = None) -> None:
        """End :attr:`result`, and every watcher with it, with ``handle``, or
        ``error``, or (neither given) cancelled; nothing if it ended already."""
        result = self.result
        if result.done():
            return
        if handle is not None:
            result.set_result(handle)
        elif error is not None:
            result.set_exception(error)
            # The outcome always reaches someone (the caller, a batch, the log):
            # marked retrieved, so asyncio never warns about it.
            result.exception()
        else:
            result.cancel()
        watchers, self._watchers = self._watchers, []
        for watcher in watchers:
            _copy_outcome(result, watcher)

    def admitted(self) -> None:
        """The create holds its units (or needs none) and goes to the wire; tell
        whoever rations how many wait for units (a batch's lookahead), once."""
        callback, self._on_admitted = self._on_admitted, None
        if callback is not None:
            callback()

    def __repr__(self) -> str:
        return f"<Submission external_task_id={self.external_task_id!r} {self.phase.value}>"


@attrs.define(eq=False)
class _HeldUnits:
    """Units a created task holds until it ends (or the client closes): given
    back exactly once, whichever comes first."""

    limiter: Limiter
    units: int
    #: Whether the limiter counted them as a created task's: a ``created()``
    #: hook that raised did not, and the release must say the same.
    counted_created: bool = True
    given_back: bool = False

    def give_back(self, _task: object = None) -> None:
        if not self.given_back:
            self.given_back = True
            _quietly("release", self.limiter.release, self.units, created=self.counted_created)

    def hand_over(self) -> None:
        """The client closes while the task runs: a shared limiter keeps its
        units counted for another process to take over; any other gets them back."""
        if not self.given_back:
            self.given_back = True
            hand_over = getattr(self.limiter, "hand_over", None)
            if hand_over is not None:
                _quietly("hand_over", hand_over, self.units)
            else:
                _quietly("release", self.limiter.release, self.units, created=self.counted_created)


@attrs.define(eq=False)
class _LedgerBinding:
    """The ledger entry of a created task, in a ledger that records results:
    kept current with the task's news (see ``Submissions._note``)."""

    entry: LedgerEntry
    ledger: Ledger


def _quietly(hook: str, call: Callable[..., object], *args: Any, **kwargs: Any) -> bool:
    """Call a user-supplied ledger or limiter hook that must not strand a create
    (``Ledger.record``, ``Limiter.created``/``release``/``observe``): whatever it
    raises is logged with its traceback, and the create goes on. Returns whether
    it succeeded."""
    try:
        call(*args, **kwargs)
    except Exception:
        owner = getattr(call, "__self__", None)
        logger.exception("%s.%s() failed; the create goes on", type(owner).__name__, hook)
        return False
    return True


def _for_task(limiter: Limiter | None, external_task_id: str) -> Limiter | None:
    """The limiter as one create and its task see it: a shared limiter
    (``contrib.redis``) counts units per task, so it is told which task each
    call is for; an in-process limiter is used as it is."""
    for_task = getattr(limiter, "for_task", None)
    return limiter if for_task is None else for_task(external_task_id)


class Submissions:
    """The owner of every create of one client (see the module docstring)."""

    def __init__(
        self,
        transport: Transport,
        tracker: Tracker,
        ledger: Ledger,
        *,
        receiver: CallbackReceiver | None = None,
        limiter: Limiter | None = None,
        prices: PriceTable = DEFAULT_PRICES,
        budget: Budget | None = None,
    ) -> None:
        if not hasattr(ledger, "records_results"):
            # Read after a create lands, when failing would strand its handle.
            raise ConfigurationError(
                f"{type(ledger).__name__} is not a complete Ledger: it must declare "
                "records_results (False unless the client should keep its entries "
                "current with task results), or subclass kling_async.Ledger"
            )
        self._transport = transport
        self._tracker = tracker
        self._receiver = receiver
        self.ledger = ledger
        self.limiter = limiter
        self.prices = prices
        #: The client's budget, if it has one (a batch may add its own).
        self.budget = budget
        self._live: set[Submission] = set()
        # The running create of each external_task_id (the first, should a
        # caller start two with one id), for resume() to leave alone.
        self._live_ids: dict[str, Submission] = {}
        self._held: dict[TaskState, _HeldUnits] = {}
        # The ledger entry each created task is followed in, for ledgers that
        # record results; weak, as the tracker holds its states: a task nobody
        # holds any more is followed no further (downloads come after its end).
        self._bindings: weakref.WeakKeyDictionary[TaskState, _LedgerBinding] = (
            weakref.WeakKeyDictionary()
        )
        self._closing = False
        self._origin: Submissions | None = None  # the owner a with_transport view shares
        tracker.on_news = self._note
        tracker.on_gone = self._note_gone

    def with_transport(self, transport: Transport) -> Submissions:
        """This owner, sending its creates through ``transport`` (a
        ``with_options`` view): it shares everything else, creates in flight and
        units held included, so the client's ``close()`` covers both."""
        view = copy.copy(self)
        view._transport = transport
        view._origin = self._origin or self
        return view

    @property
    def closing(self) -> bool:
        """True once the client's ``close()`` began: no create starts any more."""
        return (self._origin or self)._closing

    # --- starting ---------------------------------------------------------------

    def prepare(self, request: TaskRequest) -> tuple[TaskRequest, bool]:
        """``request`` as it will be sent: with an external_task_id (generated if
        it has none) and, with a receiver and no URL of the caller's own, a
        per-task callback URL. Returns it and whether the URL is the receiver's."""
        external_task_id = request.external_task_id or new_external_task_id()
        receiver = self._receiver if request.callback_url is None else None
        changes: dict[str, Any] = {}
        if request.external_task_id is None:
            changes["external_task_id"] = external_task_id
        if receiver is not None:
            changes["callback_url"] = receiver.url_for(external_task_id)
        return (attrs.evolve(request, **changes) if changes else request), receiver is not None

    def start(
        self,
        request: TaskRequest,
        *,
        limiter: Limiter | _UseLimiter | None = CLIENT_LIMITER,
        ledger: Ledger | None = None,
        key: str | None = None,
        look_up_first: bool = False,
        on_admitted: Callable[[], None] | None = None,
        budget: Budget | None = None,
        batch: str | None = None,
    ) -> Submission:
        """Begin a create in the background and return it; :attr:`Submission.result`
        gives its handle. Raises :class:`ClientClosedError` on a closed client,
        :class:`ValidationError` when ``n`` exceeds the limiter's known capacity,
        and :class:`UnknownPriceError` under a budget when the price table cannot
        estimate the request. ``budget`` is a batch's own, checked besides the
        client's; ``batch`` the batch's name, recorded with the entry.

        ``ledger`` records it somewhere else than the client's ledger (a batch's
        journal); ``key`` is its batch key. ``look_up_first`` asks Kling for the
        external_task_id before sending anything: a create resumed after a crash
        may have landed already.
        """
        if self.closing or self._transport.closed:
            raise ClientClosedError("the client is closed; create a new Client")
        chosen = self.limiter if limiter is CLIENT_LIMITER else limiter
        assert not isinstance(chosen, _UseLimiter)
        prepared, receiver_callback = self.prepare(request)
        assert prepared.external_task_id is not None
        chosen = _for_task(chosen, prepared.external_task_id)
        budgets = self._budgets(budget)
        submission = Submission(
            prepared,
            ledger=ledger if ledger is not None else self.ledger,
            receiver_callback=receiver_callback,
            key=key,
            look_up_first=look_up_first,
            on_admitted=on_admitted,
            budgets=budgets,
            estimate=self._estimate(prepared, priced=bool(budgets)),
            batch=batch,
        )
        units = submission.units
        if chosen is not None and chosen.capacity is not None and units > chosen.capacity:
            field = "n" if units == prepared.n else "series_amount"
            raise for_create(
                ValidationError(
                    field,
                    f"needs {units} units, more than the account's max_concurrency of "
                    f"{chosen.capacity}: the task could never start",
                ),
                submission.external_task_id,
                "nothing was sent",
            )
        self._live.add(submission)
        self._live_ids.setdefault(submission.external_task_id, submission)
        submission.runner = asyncio.get_running_loop().create_task(
            self._run(submission, chosen), name=f"kling-create-{submission.external_task_id}"
        )
        return submission

    def _budgets(self, budget: Budget | None) -> tuple[Budget, ...]:
        """The budgets a create is reserved in: a batch's own, then the client's."""
        return tuple(b for b in (budget, self.budget) if b is not None)

    def _estimate(self, request: TaskRequest, *, priced: bool) -> Decimal | None:
        """The units ``request`` will cost at most, or ``None`` when the price
        table cannot say; under a budget (``priced``) that refuses the create
        (:class:`UnknownPriceError`): a guess could overrun the budget."""
        try:
            return self.prices.estimate(request).units
        except UnknownPriceError as error:
            if priced:
                assert request.external_task_id is not None
                raise for_create(error, request.external_task_id, "nothing was sent") from None
            return None

    def estimate_of(self, request: TaskRequest) -> Decimal | None:
        """What ``request`` will cost at most by the client's price table, or
        ``None`` when the table cannot say."""
        return self._estimate(request, priced=False)

    async def submit(
        self,
        request: TaskRequest,
        *,
        limiter: Limiter | _UseLimiter | None = CLIENT_LIMITER,
    ) -> TaskHandle:
        """Create the task and return its handle once Kling accepted it.

        Cancelling the caller does not cut the create short: see the module docstring.
        """
        submission = self.start(request, limiter=limiter)
        try:
            return await submission.watch()
        except asyncio.CancelledError:
            self._left(submission)
            raise

    def _left(self, submission: Submission) -> None:
        """The caller of ``submit()`` was cancelled: from now on only the log can
        tell it about the task, now (if the create has just settled) or once it does."""
        submission.unwatched = True
        self.abandon(submission)
        result = submission.result
        if result.done() and not result.cancelled() and result.exception() is None:
            self._report_unwatched(result.result())

    def abandon(self, submission: Submission) -> None:
        """Nobody waits for this create any more: drop it if nothing was sent,
        else let it settle in the background (logged when it does)."""
        submission.abandoned = True
        runner = submission.runner
        if submission.phase is Phase.QUEUED and runner is not None and not runner.done():
            runner.cancel()

    # --- the life of one create ---------------------------------------------------

    @staticmethod
    def _entry(submission: Submission, create: WireRequest) -> LedgerEntry:
        body = dict(create.body or {})
        if submission.receiver_callback:
            del body["callback_url"]  # a credential; made again from the id
        return LedgerEntry(
            external_task_id=submission.external_task_id,
            endpoint=submission.request.endpoint,
            body=body,
            units=submission.units,
            state=EntryState.INTENDED,
            receiver_callback=submission.receiver_callback,
            key=submission.key,
            estimate=submission.estimate,
            pack=by_request_type(submission.request).units.pack,
            batch=submission.batch,
        )

    async def _run(self, submission: Submission, limiter: Limiter | None) -> None:
        create = create_request(submission.request)
        entry = self._entry(submission, create)
        external_task_id = submission.external_task_id
        self._tracker.creating(external_task_id)
        ledger = submission.ledger
        try:
            if not await self._reserve(submission):
                return  # refused by a budget: nothing recorded, nothing sent
            ledger.record(entry)
            await ledger.flush()  # the intent survives a crash before it is sent
            if limiter is not None:
                await limiter.acquire(submission.units)
                submission.holding = True
            submission.admitted()
            decision, task = await self._settle(submission, create, entry, limiter)
        except asyncio.CancelledError:
            # Given up while queued (abandon), or cut short by close().
            unsent = submission.phase is Phase.QUEUED and not submission.possibly_landed
            self._give_back(submission, limiter, may_run=not unsent)
            if unsent:
                self._release(submission)
                _quietly(
                    "record", ledger.record, entry.moved(EntryState.NOT_CREATED, error="cancelled")
                )
                self._fail(submission, None)
            else:
                error = ClientClosedError("the client closed while the create was on the wire")
                self._uncertain(submission, entry, error)
        except Exception as error:  # a bug, or a user's ledger or limiter failing
            self._give_back(
                submission,
                limiter,
                may_run=submission.phase is not Phase.QUEUED or submission.possibly_landed,
            )
            logger.exception("unexpected error in the create of %s", external_task_id)
            failure = KlingError(f"the create failed unexpectedly: {type(error).__name__}")
            failure.__cause__ = error
            if submission.phase is Phase.QUEUED and not submission.possibly_landed:
                self._release(submission)
                moved = entry.moved(EntryState.NOT_CREATED, error=str(failure))
                _quietly("record", ledger.record, moved)
                self._fail(submission, for_create(failure, external_task_id, "nothing was sent"))
            else:
                self._uncertain(submission, entry, failure)
        else:
            if decision.step is Step.CREATED:
                assert task is not None
                self._attach(submission, entry, task, limiter)
            else:
                self._give_back(submission, limiter, may_run=decision.step is Step.UNCERTAIN)
                refusal = decision.error or KlingError("the create failed")
                if decision.step is Step.UNCERTAIN:
                    self._uncertain(submission, entry, refusal)
                else:
                    self._release(submission)
                    moved = entry.moved(EntryState.NOT_CREATED, error=str(refusal))
                    _quietly("record", ledger.record, moved)
                    outcome = (
                        "Kling has no such task: nothing was created"
                        if submission.reached_kling
                        else "nothing was sent"
                    )
                    self._fail(submission, for_create(refusal, external_task_id, outcome))
        finally:
            self._tracker.created(external_task_id)
            submission.phase = Phase.SETTLED
            self._live.discard(submission)
            if self._live_ids.get(external_task_id) is submission:
                del self._live_ids[external_task_id]
            if not submission.result.done():  # a bug in the outcome code above
                self._give_back(submission, limiter)
                failure = KlingError("the create ended without an outcome (a bug, logged)")
                logger.error("the create of %s ended without an outcome", external_task_id)
                self._fail(submission, for_create(failure, external_task_id, _MAY_EXIST))

    async def _settle(
        self,
        submission: Submission,
        create: WireRequest,
        entry: LedgerEntry,
        limiter: Limiter | None,
    ) -> tuple[Decision, Task | None]:
        """Send and look up as the rules say until the create is settled."""
        loop = asyncio.get_running_loop()
        policy = self._transport.retry
        can_requeue = limiter is not None
        if submission.look_up_first:  # resumed: it may have landed before a crash
            submission.phase = Phase.ON_THE_WIRE
            decision = Decision(Step.LOOKUP, CreateProgress(possibly_landed=True))
        else:
            decision = Decision(Step.SEND, CreateProgress())
        started = loop.time()
        task: Task | None = None
        while not decision.step.final:
            if decision.delay > 0:
                await asyncio.sleep(decision.delay)
            progress, elapsed = decision.progress, loop.time() - started
            if decision.step is Step.SEND and submission.send_refusal is not None:
                # Looked up and not found: sending it would spend past the budget.
                refused = attrs.evolve(progress, error=submission.send_refusal)
                decision = Decision(Step.NOT_CREATED, refused)
                continue
            if decision.step is Step.SEND:
                submission.phase = Phase.ON_THE_WIRE
                task, error = await self._ask(create)
                submission.reached_kling |= error is None or not never_sent(error)
                if error is not None and limiter is not None:
                    _quietly("observe", limiter.observe, error)
                decision = after_sent(
                    progress, error, policy=policy, elapsed=elapsed, can_requeue=can_requeue
                )
                if decision.progress.possibly_landed and not progress.possibly_landed:
                    _quietly("record", submission.ledger.record, entry.moved(EntryState.SENT))
                if error is not None and not decision.step.final:
                    _log_retry(submission, error, decision)
            elif decision.step is Step.LOOKUP:
                # Made here, not up front: most creates never look anything up.
                lookup = get_request(submission.request.endpoint, submission.external_task_id)
                task, error = await self._ask(lookup)
                submission.reached_kling |= error is None or not never_sent(error)
                found: bool | KlingError = task is not None or (
                    False if isinstance(error, NotFoundError) else error or False
                )
                decision = after_lookup(
                    progress, found, policy=policy, elapsed=elapsed, can_requeue=can_requeue
                )
                if isinstance(found, KlingError) and not decision.step.final:
                    _log_retry(submission, found, decision)
            elif decision.step is Step.RESIGN:
                then, otherwise = decision.then, decision.otherwise
                assert then is not None
                assert otherwise is not None
                decision = Decision(then, progress) if self._transport.resign() else otherwise
            else:  # Step.REQUEUE: 1303, wait for units again at the head of the queue
                assert limiter is not None
                submission.phase = Phase.ON_THE_WIRE if progress.possibly_landed else Phase.QUEUED
                submission.holding = False
                _quietly("release", limiter.release, submission.units, created=False)
                await limiter.acquire(submission.units, first=True)
                submission.holding = True
                started = loop.time()
                decision = Decision(Step.SEND, progress)
            submission.possibly_landed = decision.progress.possibly_landed
        return decision, task

    async def _ask(self, request: WireRequest) -> tuple[Task | None, KlingError | None]:
        """One exchange: the task in the answer, or the error it met."""
        try:
            envelope: Envelope = await self._transport.exchange(request)
        except KlingError as error:
            return None, error
        try:
            return parse_created(envelope), None
        except KlingError as error:
            # code 0 but no task_id: Kling acted, and its answer does not say on
            # what. The rules (_create_rules.may_have_landed) take it as ambiguous.
            return None, error

    # --- outcomes -------------------------------------------------------------------

    def _attach(
        self,
        submission: Submission,
        entry: LedgerEntry,
        task: Task,
        limiter: Limiter | None,
    ) -> None:
        request = submission.request
        state = self._tracker.state(
            request.endpoint,
            task.task_id,
            latest=task,
            external_task_id=submission.external_task_id,
        )
        self._tracker.expect_callbacks(state, submission.receiver_callback)
        self._bill(state, submission.external_task_id, submission.budgets, submission.estimate)
        created = entry.moved(EntryState.CREATED, task_id=task.task_id, status=task.status.value)
        # The task exists: whatever the ledger or limiter raise from here on,
        # the caller gets its handle (the failures are logged).
        _quietly("record", submission.ledger.record, created)
        self._follow_in(submission.ledger, state, created)
        if limiter is not None:
            submission.holding = False  # the task holds them now, or already did
            if state in self._held:
                # Another create or resume of this id settled on the same task
                # first and holds its units: these were this create's own.
                _quietly("release", limiter.release, submission.units, created=False)
            else:
                counted = _quietly("created", limiter.created, submission.units)
                self._hold(state, limiter, submission.units, counted_created=counted)
        handle = TaskHandle(self._tracker, state, request)
        submission.settle(handle)
        if submission.unwatched:
            self._report_unwatched(handle)

    @staticmethod
    def _report_unwatched(handle: TaskHandle) -> None:
        logger.warning(
            "a create settled after its caller stopped waiting: task %s "
            "(external_task_id %s) exists on Kling and stays attached to the client",
            handle.task_id,
            handle.external_task_id,
        )

    def _follow_in(self, ledger: Ledger, state: TaskState, entry: LedgerEntry) -> None:
        """Keep ``entry`` current with the task's news, when the ledger wants results."""
        if ledger.records_results:
            if state not in self._bindings:
                self._tracker.follow(state)  # every status change, for the entry
            self._bindings[state] = _LedgerBinding(entry, ledger)
            if state.latest is not None and state.latest.is_terminal:
                self._note(state, state.latest)

    def _hold(
        self, state: TaskState, limiter: Limiter, units: int, *, counted_created: bool = True
    ) -> bool:
        """The running task holds ``units`` until it ends, turns out gone, or the
        client closes; it is polled until then, so they come back. A task holds
        units once, whoever settles it: returns False, holding nothing, when it
        already holds some."""
        if state in self._held:
            return False
        held = _HeldUnits(limiter, units, counted_created)
        if state.terminal:
            held.give_back()
            return True
        self._held[state] = held

        def give_back(_task: Task | None) -> None:
            if self._held.get(state) is held:
                del self._held[state]
            held.give_back()

        state.when_terminal(give_back)
        self._tracker.keep_polled(state)
        return True

    def _uncertain(self, submission: Submission, entry: LedgerEntry, error: KlingError) -> None:
        submission.uncertain = True
        _quietly(
            "record", submission.ledger.record, entry.moved(EntryState.UNCERTAIN, error=str(error))
        )
        logger.warning(
            "cannot tell whether Kling created the task of external_task_id %s (%s); "
            "look it up with client.images.get(%r) or client.resume()",
            submission.external_task_id,
            error,
            submission.external_task_id,
        )
        external_task_id = submission.external_task_id
        outcome = f"it may exist on Kling: look it up with client.images.get({external_task_id!r})"
        self._fail(submission, for_create(error, external_task_id, outcome))

    def _fail(self, submission: Submission, error: KlingError | None) -> None:
        """End the create's result with ``error``; ``None`` for a create dropped
        before it was sent, which ends cancelled (or closed, on ``close()``)."""
        submission.admitted()
        if error is None and self.closing:
            closed = ClientClosedError("the client was closed before the create was sent")
            error = for_create(closed, submission.external_task_id, "nothing was created")
        submission.settle(error=error)

    def _give_back(
        self, submission: Submission, limiter: Limiter | None, *, may_run: bool = False
    ) -> None:
        """Give the create's units back; one that ``may_run`` on Kling (uncertain)
        is handed over instead by a shared limiter, which keeps its units counted."""
        if submission.holding and limiter is not None:
            submission.holding = False
            hand_over = getattr(limiter, "hand_over", None)
            if may_run and hand_over is not None:
                _quietly("hand_over", hand_over, submission.units)
            else:
                _quietly("release", limiter.release, submission.units, created=False)

    # --- budgets --------------------------------------------------------------------

    async def _reserve(self, submission: Submission) -> bool:
        """Reserve the create's estimate in each of its budgets, before its intent
        is recorded. Returns False, the create failed with
        :class:`BudgetExceededError` (or the error of a budget that could not
        answer), when one refuses it (the others give theirs back). A resumed
        create that may have landed is counted even so (it is billed if it
        exists) and is only looked up, never sent again."""
        estimate = submission.estimate
        if not submission.budgets or estimate is None:
            return True
        key = submission.external_task_id
        taken: list[Budget] = []
        for budget in submission.budgets:
            try:
                await budget.reserve(key, estimate)
            except KlingError as refusal:
                # Over budget, or a shared budget that cannot answer: either way
                # the create is not sent on the budget's word.
                if submission.look_up_first:
                    submission.send_refusal = refusal
                    _quietly("adopt", budget.adopt, key, estimate)
                    taken.append(budget)
                    continue
                for held in taken:
                    _quietly("release", held.release, key)
                self._fail(submission, for_create(refusal, key, "nothing was sent"))
                return False
            taken.append(budget)
        return True

    @staticmethod
    def _release(submission: Submission) -> None:
        """The create did not land: its budgets get its reservation back."""
        for budget in submission.budgets:
            _quietly("release", budget.release, submission.external_task_id)

    def _bill(
        self, state: TaskState, key: str, budgets: tuple[Budget, ...], estimate: Decimal | None
    ) -> None:
        """When the task ends, what Kling deducted replaces its reservation (the
        estimate stays when Kling did not say, or the task turned out gone)."""
        if not budgets:
            return

        def settle(task: Task | None) -> None:
            cost = task.cost if task is not None else None
            units = cost.units if cost is not None and cost.units is not None else estimate
            if units is None:
                return  # nothing reserved and nothing reported: nothing to count
            for budget in budgets:
                _quietly("settle", budget.settle, key, units)

        if state.terminal:
            settle(state.latest)
            return
        state.when_terminal(settle)
        self._tracker.keep_polled(state)

    def _note(self, state: TaskState, task: Task) -> None:
        """Keep a durable ledger's entry current with the task's status and results."""
        binding = self._bindings.get(state)
        if binding is None or binding.entry.state.settled:
            return
        entry = binding.entry
        if entry.status == task.status.value and not task.is_terminal:
            return
        moved = entry.moved(
            EntryState.TERMINAL if task.is_terminal else EntryState.CREATED,
            status=task.status.value,
            images=task.images,
            error=task.status_message if task.is_terminal else None,
            cost=task.cost if task.is_terminal else None,
            units_used=units_used(entry, task) if task.is_terminal else None,
        )
        binding.entry = moved
        _quietly("record", binding.ledger.record, moved)

    def _note_gone(self, state: TaskState, error: TaskNotFoundError) -> None:
        """Settle a durable ledger's entry for a task Kling no longer knows."""
        binding = self._bindings.get(state)
        if binding is None or binding.entry.state.settled:
            return
        binding.entry = binding.entry.moved(EntryState.GONE, error=error.message)
        _quietly("record", binding.ledger.record, binding.entry)

    def note_downloaded(self, task_id: str, paths: list[str]) -> None:
        """Record in a durable ledger which files hold the task's images."""
        for endpoint in Endpoint:
            state = self._tracker.find(endpoint, task_id)
            binding = self._bindings.get(state) if state is not None else None
            if binding is not None:
                binding.entry = binding.entry.moved(binding.entry.state, downloaded=tuple(paths))
                _quietly("record", binding.ledger.record, binding.entry)

    # --- resuming -----------------------------------------------------------------------

    def reattach(
        self,
        entry: LedgerEntry,
        *,
        ledger: Ledger | None = None,
        limiter: Limiter | _UseLimiter | None = CLIENT_LIMITER,
        request: TaskRequest | None = None,
        budget: Budget | None = None,
    ) -> TaskHandle:
        """A handle on the task of an entry that Kling created (task_id known),
        following it in its ledger; a running task holds its units again, and
        its estimate in the budgets (a task that ended counts what it was billed)."""
        assert entry.task_id is not None
        chosen = self.limiter if limiter is CLIENT_LIMITER else limiter
        assert not isinstance(chosen, _UseLimiter)
        budgets = self._budgets(budget)
        if entry.state is EntryState.GONE:  # settled so by an earlier run: an outcome
            state = self._tracker.state(
                entry.endpoint, entry.task_id, external_task_id=entry.external_task_id
            )
            self._tracker.forget(state, gone_error(entry))
            self._adopt(entry, budgets, request, state)
            return TaskHandle(self._tracker, state, request)
        chosen = _for_task(chosen, entry.external_task_id)
        latest = None
        if entry.state is EntryState.TERMINAL and entry.status is not None:
            latest = entry_task(entry)
        state = self._tracker.state(
            entry.endpoint, entry.task_id, latest=latest, external_task_id=entry.external_task_id
        )
        self._tracker.expect_callbacks(
            state, entry.receiver_callback and self._receiver is not None
        )
        self._follow_in(ledger if ledger is not None else self.ledger, state, entry)
        self._adopt(entry, budgets, request, state)
        # Count the units first: a limiter whose adopt() fails holds none, and
        # the task must not give back what was never counted.
        holds = chosen is not None and not state.terminal and state not in self._held
        if holds and chosen is not None and _quietly("adopt", chosen.adopt, entry.units):
            self._hold(state, chosen, entry.units)
        return TaskHandle(self._tracker, state, request)

    def _adopt(
        self,
        entry: LedgerEntry,
        budgets: tuple[Budget, ...],
        request: TaskRequest | None,
        state: TaskState,
    ) -> None:
        """Count a task that exists in ``budgets``: what it was billed if it
        ended, else its estimate until it ends (never refused: it is billed
        whatever the budget says)."""
        if not budgets:
            return
        estimate = entry.estimate
        if estimate is None and request is not None:
            estimate = self._estimate(request, priced=False)
        key = entry.external_task_id
        for budget in budgets:
            if estimate is not None:
                _quietly("adopt", budget.adopt, key, estimate)
        billed = entry.cost.units if entry.cost is not None else None
        if entry.state is EntryState.TERMINAL and billed is not None:
            for budget in budgets:
                _quietly("settle", budget.settle, key, billed)
            return
        self._bill(state, key, budgets, estimate)

    def resume_entry(
        self,
        entry: LedgerEntry,
        *,
        ledger: Ledger | None = None,
        limiter: Limiter | _UseLimiter | None = CLIENT_LIMITER,
        request: TaskRequest | None = None,
        on_admitted: Callable[[], None] | None = None,
        budget: Budget | None = None,
    ) -> Submission:
        """Settle an entry whose create may or may not have landed: look its id up
        and send it again (same id) only if Kling has no such task."""
        live = self.live(entry.external_task_id)
        if live is not None:
            # This process is creating it right now: a second create of the same
            # id would race it. Follow that create's outcome instead.
            return _following(live, on_admitted)
        if request is None:
            request = request_from_mapping(entry.body, endpoint=entry.endpoint)
        request = attrs.evolve(request, external_task_id=entry.external_task_id)
        return self.start(
            request,
            limiter=limiter,
            ledger=ledger,
            key=entry.key,
            # Not created (refused, confirmed absent, or never sent): nothing can
            # have landed, so there is nothing to look up; sent again as a fresh
            # create it says what happens now ("nothing was sent" without a key),
            # never "cannot tell" about a create that never reached Kling.
            look_up_first=entry.state is not EntryState.NOT_CREATED,
            on_admitted=on_admitted,
            budget=budget,
            batch=entry.batch,
        )

    async def resume(self) -> list[TaskHandle]:
        """Settle every unsettled entry of the client's ledger; return the handles of
        the tasks that exist. Entries that cannot be settled stay in the ledger."""
        handles: list[TaskHandle] = []
        submissions: list[Submission] = []
        for entry in await self.ledger.unsettled():
            if self.live(entry.external_task_id) is not None:
                # Not left behind by a crash: a create of this process, on its
                # way; its own caller gets its outcome.
                continue
            if entry.state is EntryState.CREATED and entry.task_id is not None:
                handles.append(self.reattach(entry))
                continue
            try:
                submissions.append(self.resume_entry(entry))
            except KlingError as error:  # a body that no longer validates, say
                logger.warning("cannot resume %s: %s", entry.external_task_id, error)
        for submission in submissions:
            try:
                handles.append(await submission.watch())
            except asyncio.CancelledError:
                self._left(submission)
                raise
            except KlingError as error:
                logger.info("resumed create %s: %s", submission.external_task_id, error)
        return handles

    def relinquish(self, external_task_id: str, error: KlingError) -> bool:
        """Another process took the running task of ``external_task_id`` over (a
        shared ledger's survivor, while this one was taken for dead): stop
        following it here. Nothing more is recorded for it and no units are
        given back (both are the new owner's); its handles end with ``error``.
        Returns whether this client followed it."""
        state = self._tracker.by_external(external_task_id)
        if state is None or state.terminal:
            return False
        self._bindings.pop(state, None)
        held = self._held.pop(state, None)
        if held is not None:
            held.given_back = True  # the new owner holds them now
        self._tracker.relinquish(state, error)
        return True

    def live(self, external_task_id: str) -> Submission | None:
        """The create of ``external_task_id`` this client is running, if any."""
        return self._live_ids.get(external_task_id)

    # --- closing ----------------------------------------------------------------------

    async def close(self) -> list[str]:
        """Stop taking creates; let those on the wire settle (bounded by the request
        timeout); give back every unit this client's tasks hold. Returns the
        external_task_ids it could not settle."""
        self._closing = True
        live = list(self._live)
        for submission in live:
            self.abandon(submission)
        runners = [s.runner for s in live if s.runner is not None and not s.runner.done()]
        unsettled: list[str] = []
        if runners:
            wait = self._transport.request_timeout or DEFAULT_CLOSE_WAIT
            _done, pending = await asyncio.wait(runners, timeout=wait)
            for runner in pending:
                runner.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            unsettled = [s.external_task_id for s in live if s.runner in pending]
        if unsettled:
            logger.warning(
                "client closed with %d creates it could not settle; they may or may not "
                "exist on Kling (external_task_ids): %s",
                len(unsettled),
                ", ".join(unsettled),
            )
        held, self._held = self._held, {}
        for units in held.values():
            units.hand_over()
        try:
            await self.ledger.flush()
        except Exception as error:  # a broken ledger must not stop the client closing
            logger.error("the ledger could not be flushed on close: %s", error)
        return unsettled


_MAY_EXIST: Final = "it may exist on Kling: look it up by external_task_id, or client.resume()"


def _following(live: Submission, on_admitted: Callable[[], None] | None) -> Submission:
    """A submission with no runner of its own whose result is ``live``'s: a
    resume or a batch rerun meeting a create this process is running."""
    follower = Submission(
        live.request,
        ledger=live.ledger,
        receiver_callback=live.receiver_callback,
        key=live.key,
        on_admitted=on_admitted,
    )
    follower.phase = Phase.ON_THE_WIRE
    follower.admitted()  # it waits for no units of its own

    def copy_outcome(result: asyncio.Future[TaskHandle]) -> None:
        follower.phase = Phase.SETTLED
        follower.uncertain = live.uncertain
        if result.cancelled():
            follower.settle()
        else:
            error = result.exception()
            follower.settle(None if error is not None else result.result(), error)

    live.result.add_done_callback(copy_outcome)
    return follower


def _copy_outcome(source: asyncio.Future[TaskHandle], target: asyncio.Future[TaskHandle]) -> None:
    """End ``target`` as ``source`` ended, unless it ended already (cancelled)."""
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif (error := source.exception()) is not None:
        target.set_exception(error)
    else:
        target.set_result(source.result())


def gone_error(entry: LedgerEntry) -> TaskNotFoundError:
    """The outcome of an entry settled as gone."""
    assert entry.task_id is not None
    return TaskNotFoundError(
        entry.error or f"task {entry.task_id} is not known to Kling",
        task_id=entry.task_id,
        external_task_id=entry.external_task_id,
        code=1203,
    )


def _log_retry(submission: Submission, error: KlingError, decision: Decision) -> None:
    next_step = {
        Step.SEND: "sending it again",
        Step.LOOKUP: "looking its external_task_id up",
        Step.RESIGN: "signing a new token",
        Step.REQUEUE: "waiting for quota units",
    }[decision.step]
    logger.info(
        "create %s: %s; retrying by %s in %.2fs",
        submission.external_task_id,
        error,
        next_step,
        decision.delay,
    )


def entry_task(entry: LedgerEntry) -> Task:
    """The task as the ledger last knew it (a terminal entry's result)."""
    assert entry.task_id is not None
    status = TaskStatus(entry.status or TaskStatus.SUBMITTED.value)
    cost = entry.cost
    balance = None
    if cost is not None and (cost.quota is not None or cost.list_price is not None):
        balance = BalanceDeduction(
            quota=None if cost.quota is None else str(cost.quota),
            list_price=None if cost.list_price is None else str(cost.list_price),
        )
    return Task(
        task_id=entry.task_id,
        status=status,
        status_message=entry.error if status is TaskStatus.FAILED else None,
        images=entry.images,
        external_task_id=entry.external_task_id,
        final_unit_deduction=None if cost is None or cost.units is None else str(cost.units),
        final_balance_deduction=balance,
    )


def units_used(entry: LedgerEntry, task: Task) -> int:
    """The concurrency units a finished task turned out to need: its images for
    an endpoint that holds one unit per image produced (an ``auto`` series
    holds the most while it runs), else what it held. A failed task needed
    what it held."""
    rule = declaration_for(entry.endpoint).units.rule
    if rule is UnitsRule.PER_IMAGE_PRODUCED and task.images:
        return min(len(task.images), entry.units)
    return entry.units
