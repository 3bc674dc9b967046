"""``client.batch()``: thousands of requests through the concurrency quota.

A feeder takes requests in order and hands each to the client's create owner
(``_submissions``), which waits for its units in the limiter (so the account's
quota stays full but is not exceeded), sends it and settles it; every created
task reports back when it ends, and results come out in completion order.
One request's failure is one result with an ``error``; only a problem of
the whole account (quota used up, IP not whitelisted, bad credentials) stops the
batch, raised from the iterator.

Keys. With a journal, each request is recorded under a key that a later run of
the same input finds again. A key belongs to the request, never to its place
among the others, so that editing, inserting or deleting *other* requests never
makes a request already created look new (and be billed again):

- an explicit key, ``BatchItem(request, key="order-17")``: the idempotency key.
  It is the request's identity within the journal, whatever the batch's name
  or the request's content; one key is one task.
- otherwise ``"{name}#{digest}#{occurrence}"``: the batch's name, a digest of
  the request's content (its body without the id and callback URL the client
  fills in) and how many requests of the same content came before it in this
  input (0 for the first). Identical requests are distinct tasks; inserting a
  copy above one only makes the last copy new, and editing a request makes it
  a new request.

A journal written by 0.1.0 keyed requests by position (``"{name}#{position}#{digest}"``).
It is still read: a request whose key is not found is looked up under the old
key its position in this input gives, and an entry found so is recorded again
under the new key. An unchanged input therefore resumes exactly, and once a
run of this version has been over it, it can be edited freely; an input edited
*before* that may create again the requests that moved.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import attrs

from ._budget import Budget
from ._exceptions import (
    AuthenticationError,
    ClientClosedError,
    ConfigurationError,
    KlingError,
    PermissionDeniedError,
    QuotaExceededError,
    TaskFailedError,
    ValidationError,
)
from ._handle import TaskHandle
from ._ledger import EntryState, Ledger, LedgerEntry
from ._limiter import Limiter
from ._models import Cost, Task, TaskRequest, TaskStatus
from ._records import records
from ._resources import ready
from ._wire import request_body

if TYPE_CHECKING:
    from ._submissions import Submission, Submissions
    from ._tracking import Tracker

__all__ = ["Batch", "BatchCost", "BatchItem", "BatchRequests", "BatchResult"]

logger = logging.getLogger("kling_async")

#: The longest explicit key: an id of the caller's, not a document.
MAX_KEY_LENGTH = 256


def _valid_key(_item: object, _attribute: attrs.Attribute[str], key: str) -> None:
    if not isinstance(key, str) or not key:
        raise ValidationError("key", "must be a non-empty string")
    if len(key) > MAX_KEY_LENGTH:
        raise ValidationError("key", f"must be at most {MAX_KEY_LENGTH} characters")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        # A journal stores text as UTF-8: a lone surrogate cannot be a key.
        raise ValidationError("key", "must be valid Unicode text (no lone surrogates)") from None


@attrs.frozen(kw_only=True)
class BatchItem:
    """A request of a batch with its idempotency ``key``.

    With a journal, the key is the request's identity: a later run that meets the
    same key finds what the earlier one did (a result, a running task, a create
    to look up) and sends nothing new, whatever else changed in the input. Keys
    must be unique within a journal; a key repeated within one batch is refused
    (that request's result is a :class:`ValidationError`). Without a journal the
    key is not used.
    """

    request: TaskRequest
    key: str = attrs.field(validator=_valid_key)


#: What ``client.batch()`` takes: requests, or :class:`BatchItem` s to give keys.
BatchRequests = Iterable[TaskRequest | BatchItem] | AsyncIterable[TaskRequest | BatchItem]

#: Requests of a batch waiting for quota units at once. Enough that a few tasks
#: of every size (n = 1..9) are on offer when units free up.
LOOKAHEAD = 16


@attrs.frozen(kw_only=True)
class BatchResult:
    """How one request of a batch ended.

    ``index`` is its position in the input. ``handle`` is ``None`` when the
    create itself failed. ``task`` is the terminal task (also when it failed);
    ``error`` says why there is no successful task, else ``None``.
    """

    index: int
    request: TaskRequest
    handle: TaskHandle | None = None
    task: Task | None = None
    error: KlingError | None = None
    #: True when the task ended in an earlier run of the batch and the result
    #: was read from its journal: nothing was sent for it this time.
    resumed: bool = False
    #: What the price table estimated the request at, in resource-pack units
    #: (``None`` when it has no price for it).
    estimate: Decimal | None = None

    @property
    def ok(self) -> bool:
        """True when the task succeeded."""
        return self.task is not None and self.task.status is TaskStatus.SUCCEED

    @property
    def cost(self) -> Cost | None:
        """What Kling deducted for the task (``None`` when no task ended, or
        Kling did not say)."""
        return self.task.cost if self.task is not None else None

    def to_dict(self) -> dict[str, Any]:
        """The result as plain, JSON-ready data: ``index``, ``ok``, ``task_id``,
        ``external_task_id``, ``task`` (:meth:`Task.to_dict`, or ``None``) and
        ``error`` (its ``type`` and ``message``, plus ``code`` and ``request_id``
        for an :class:`APIError`; or ``None``), and ``estimate``, the units the
        price table estimated (a string, or ``None``; what Kling deducted is in
        ``task``). The request is left out (it may hold megabytes of base64
        images): ``index`` ties a result to its input.
        """
        task_id = self.handle.task_id if self.handle is not None else None
        return {
            "index": self.index,
            "ok": self.ok,
            "task_id": task_id or (self.task.task_id if self.task is not None else None),
            "external_task_id": self.request.external_task_id,
            "task": records.unstructure(self.task, Task | None),
            "error": records.unstructure(self.error, KlingError | None),
            "estimate": None if self.estimate is None else str(self.estimate),
        }

    def to_json(self, *, indent: int | None = None) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)


@attrs.frozen(kw_only=True)
class BatchCost:
    """A batch's money so far, in resource-pack units, over the requests whose
    task was created (those refused or never sent cost nothing): ``estimated``
    adds up their estimates, ``deducted`` what Kling billed their tasks;
    ``unreported`` counts the ended tasks Kling gave no deduction for,
    ``unpriced`` the tasks the price table could not estimate."""

    estimated: Decimal = Decimal(0)
    deducted: Decimal = Decimal(0)
    unreported: int = 0
    unpriced: int = 0

    def adding(self, result: BatchResult) -> BatchCost:
        """This total with ``result`` counted."""
        if result.handle is None and result.task is None:
            return self  # not created: nothing to estimate or bill
        cost = result.cost
        ended = result.task is not None and result.task.is_terminal
        return BatchCost(
            estimated=self.estimated + (result.estimate or 0),
            deducted=self.deducted + (cost.units if cost and cost.units is not None else 0),
            unreported=self.unreported + (ended and (cost is None or cost.units is None)),
            unpriced=self.unpriced + (result.estimate is None),
        )


def content_digest(request: TaskRequest) -> str:
    """A digest of what ``request`` asks Kling for: its body without the id and
    callback URL the client fills in (32 hex digits)."""
    body = dict(request_body(request))
    body.pop("external_task_id", None)
    body.pop("callback_url", None)
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # surrogatepass: the same bytes as UTF-8 for any valid text; a lone surrogate
    # (refused later, by validation) must not make the digest itself raise.
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def printable_name(name: str) -> str:
    """``name`` as text a journal can store: a file name that was not UTF-8 (its
    bytes carried as lone surrogates, as ``os.fsdecode`` does) shows them as
    ``\\xe9``, so the same name always gives the same key and never a surrogate."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        pass
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that stands for no byte
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


def batch_key(name: str, digest: str, occurrence: int) -> str:
    """The key of a request without an explicit key: ``"{name}#{digest}#{occurrence}"``
    (see the module docstring)."""
    return f"{printable_name(name)}#{digest}#{occurrence}"


def explicit_key(key: str) -> str:
    """The journal key of a :class:`BatchItem`'s own key: the same in every batch."""
    return f"key:{key}"


def legacy_batch_key(name: str, position: int, digest: str) -> str | None:
    """The key a journal written by 0.1.0 holds for the request at ``position``
    with ``digest``; ``None`` for a name such a journal could not have stored."""
    if printable_name(name) != name:
        return None
    return f"{name}#{position}#{digest}"


def _stops_the_batch(error: KlingError) -> bool:
    """Errors that every further request would hit too: stop instead of repeating them."""
    if isinstance(error, (QuotaExceededError, AuthenticationError, ConfigurationError)):
        return True
    if isinstance(error, ClientClosedError):
        return True
    return isinstance(error, PermissionDeniedError) and error.code == 1304


class Batch:
    """An async iterator over a batch's results, in completion order.

    Iterate it once (``async for result in batch``) or call :meth:`collect`.
    Breaking out stops submitting: requests still waiting for quota units are
    dropped, creates already on the wire get their answer first (even when the
    client is closed at once, as ``async with Client()`` does). Tasks created
    keep running on Kling, stay attached to the client (polled until they end,
    releasing their concurrency units) and are listed in :attr:`pending`.
    """

    def __init__(
        self,
        submissions: Submissions,
        tracker: Tracker,
        requests: BatchRequests,
        *,
        limiter: Limiter,
        max_in_flight: int | None = None,
        journal: Ledger | None = None,
        name: str = "batch",
        budget: Budget | None = None,
    ) -> None:
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._submissions = submissions
        self._journal = journal
        self._name = name
        self._tracker = tracker
        self._requests = requests
        self._limiter = limiter
        #: The batch's own budget (``max_units``), if it has one.
        self.budget = budget
        #: What the results so far were estimated at and billed (:class:`BatchCost`).
        self.cost = BatchCost()
        self._slots = asyncio.Semaphore(max_in_flight) if max_in_flight else None
        self._lookahead = asyncio.Semaphore(LOOKAHEAD)
        self._results: asyncio.Queue[BatchResult | Exception | None] = asyncio.Queue()
        self._live: set[Submission] = set()  # creates not settled yet
        #: How many requests of each content digest were fed so far (for their keys).
        self._occurrences: dict[str, int] = {}
        #: Explicit keys fed so far: one key is one task, never two requests.
        self._explicit_keys: set[str] = set()
        self._outstanding = 0
        self._started = False
        #: Handles of every task this batch created, in creation order.
        self.handles: list[TaskHandle] = []
        #: external_task_ids of creates that may or may not exist on Kling
        #: (look them up with client.images.get, or client.resume()).
        self.uncertain: list[str] = []
        self.finished = 0
        self.failed = 0

    @property
    def pending(self) -> list[TaskHandle]:
        """Tasks this batch created that have not ended yet."""
        return [handle for handle in self.handles if not handle.done()]

    @property
    def in_flight(self) -> int:
        """Requests taken from the input whose result has not come out yet."""
        return self._outstanding

    def __aiter__(self) -> AsyncIterator[BatchResult]:
        if self._started:
            raise RuntimeError("a batch can be iterated only once")
        self._started = True
        return self._run()

    async def collect(self) -> list[BatchResult]:
        """Run the whole batch and return its results in input order."""
        results = [result async for result in self]
        return sorted(results, key=lambda result: result.index)

    async def _run(self) -> AsyncIterator[BatchResult]:
        feeder = asyncio.create_task(self._feed(), name="kling-batch-feeder")
        fed = False
        try:
            while not (fed and self._outstanding == 0):
                item = await self._results.get()
                if item is None:  # the input is used up
                    fed = True
                elif isinstance(item, Exception):
                    raise item
                else:
                    self._outstanding -= 1
                    self.finished += 1
                    self.failed += not item.ok
                    yield item
        finally:
            await self._stop(feeder)

    async def _stop(self, feeder: asyncio.Task[None]) -> None:
        """Stop feeding, drop creates still waiting for units, and wait for those
        on the wire: the create owner settles them whatever happens here (a
        cancelled cleanup included), so a task Kling created is never lost."""
        feeder.cancel()
        await asyncio.gather(feeder, return_exceptions=True)
        live = list(self._live)
        for submission in live:
            self._submissions.abandon(submission)
        runners = [s.runner for s in live if s.runner is not None and not s.runner.done()]
        if runners:
            await asyncio.wait(runners)
        self._report_stop()

    def _report_stop(self) -> None:
        if self._outstanding:
            pending = [handle.task_id for handle in self.pending]
            if pending:
                logger.info(
                    "batch stopped with %d tasks still running on Kling: %s",
                    len(pending),
                    ", ".join(pending),
                )

    async def _feed(self) -> None:
        try:
            index = 0
            async for item in _each(self._requests):
                if isinstance(item, BatchItem):
                    request, key = item.request, item.key
                else:
                    request, key = item, None
                if self._slots is not None:
                    await self._slots.acquire()
                # Up to LOOKAHEAD requests wait in the limiter together, queued in
                # input order, so its first-fit rule can start a small one beside
                # a large one that does not fit yet.
                await self._lookahead.acquire()
                self._outstanding += 1
                try:
                    request = await ready(request)  # its image files read, off the loop
                    if key is not None and self._journal is not None:
                        self._claim(key)
                except KlingError as error:  # a file that cannot be used: nothing sent
                    self._lookahead.release()
                    self._ended_create(index, request, error)
                else:
                    if self._journal is None:
                        self._start(index, request)
                    else:
                        await self._resume_or_start(index, request, key, self._journal)
                index += 1
        except Exception as error:  # the caller's own request iterator failed
            self._results.put_nowait(error)
            return
        self._results.put_nowait(None)

    def _claim(self, key: str) -> None:
        """Take ``key`` for one request of this batch; a second request under it
        would settle on the first one's create (a task for two, or a create
        resumed while it is on the wire): refused, nothing sent."""
        if key in self._explicit_keys:
            raise ValidationError(
                "key", f"{key!r} is the key of an earlier request of this batch; nothing was sent"
            )
        self._explicit_keys.add(key)

    async def _journal_entry(
        self, position: int, request: TaskRequest, key: str | None, journal: Ledger
    ) -> tuple[str, LedgerEntry | None]:
        """The request's journal key, and the entry an earlier run left under it
        (or under the key a journal of 0.1.0 gave it)."""
        if key is not None:
            journal_key = explicit_key(key)
            return journal_key, await journal.by_key(journal_key)
        digest = content_digest(request)
        occurrence = self._occurrences.get(digest, 0)
        self._occurrences[digest] = occurrence + 1
        journal_key = batch_key(self._name, digest, occurrence)
        entry = await journal.by_key(journal_key)
        if entry is None:
            legacy = legacy_batch_key(self._name, position, digest)
            if legacy is not None and (entry := await journal.by_key(legacy)) is not None:
                # Known under its new key from now on, before anything else records
                # it (the create owner records the entry it is given).
                entry = attrs.evolve(entry, key=journal_key)
                journal.record(entry)
        return journal_key, entry

    async def _resume_or_start(
        self, index: int, request: TaskRequest, key: str | None, journal: Ledger
    ) -> None:
        """What an earlier run of this batch left in the journal decides: a result
        read back, a task re-attached, a create looked up, or a fresh create."""
        key, entry = await self._journal_entry(index, request, key, journal)
        if entry is None:
            self._start(index, request, key=key)
        elif entry.state is EntryState.TERMINAL and entry.task_id is not None:
            self._lookahead.release()
            self._ended_before(index, request, entry, journal)
        elif entry.state in (EntryState.CREATED, EntryState.GONE) and entry.task_id is not None:
            # Created: follow it. Gone (Kling no longer knew it): its outcome,
            # TaskNotFoundError, comes out as the result; nothing is sent.
            self._lookahead.release()
            handle = self._submissions.reattach(
                entry, ledger=journal, limiter=self._limiter, request=request, budget=self.budget
            )
            self.handles.append(handle)
            self._follow(index, request, handle)
        else:  # intended, sent, uncertain, or not created (Ctrl-C before it was sent)
            self._start(index, request, key=key, entry=entry)

    def _ended_before(
        self, index: int, request: TaskRequest, entry: LedgerEntry, journal: Ledger
    ) -> None:
        handle = self._submissions.reattach(
            entry, ledger=journal, limiter=self._limiter, request=request, budget=self.budget
        )
        task = handle.task
        assert task is not None
        self.handles.append(handle)
        error = TaskFailedError(task) if task.status is TaskStatus.FAILED else None
        self._finish(
            BatchResult(
                index=index, request=request, handle=handle, task=task, error=error, resumed=True
            )
        )

    def _start(
        self,
        index: int,
        request: TaskRequest,
        *,
        key: str | None = None,
        entry: LedgerEntry | None = None,
    ) -> None:
        try:
            if entry is not None:
                submission = self._submissions.resume_entry(
                    entry,
                    ledger=self._journal,
                    limiter=self._limiter,
                    request=request,
                    on_admitted=self._lookahead.release,
                    budget=self.budget,
                )
            else:
                submission = self._submissions.start(
                    request,
                    limiter=self._limiter,
                    ledger=self._journal,
                    key=key,
                    on_admitted=self._lookahead.release,
                    budget=self.budget,
                    batch=printable_name(self._name),
                )
        except KlingError as error:  # refused before anything was sent
            self._lookahead.release()
            self._ended_create(index, request, error)
            return
        self._live.add(submission)
        submission.result.add_done_callback(lambda result: self._settled(index, submission, result))

    def _settled(
        self, index: int, submission: Submission, result: asyncio.Future[TaskHandle]
    ) -> None:
        self._live.discard(submission)
        if result.cancelled():  # dropped before it was sent: the batch stopped
            return
        error = result.exception()
        if error is None:
            handle = result.result()
            self.handles.append(handle)
            self._follow(index, submission.request, handle)
        elif isinstance(error, KlingError):
            if submission.uncertain:
                self.uncertain.append(submission.external_task_id)
            self._ended_create(index, submission.request, error)

    def _ended_create(self, index: int, request: TaskRequest, error: KlingError) -> None:
        if _stops_the_batch(error):
            self._results.put_nowait(error)
        else:
            self._finish(BatchResult(index=index, request=request, error=error))

    def _follow(self, index: int, request: TaskRequest, handle: TaskHandle) -> None:
        """Put the task's result in the queue when it ends."""

        def result(task: Task | None = None, error: KlingError | None = None) -> BatchResult:
            if task is not None and task.status is TaskStatus.FAILED:
                error = TaskFailedError(task)
            return BatchResult(index=index, request=request, handle=handle, task=task, error=error)

        state = handle._state
        if state.gone is not None:  # Kling no longer knows it: an outcome
            self._finish(result(error=state.gone))
            return
        if state.terminal:
            self._finish(result(state.latest))
            return

        def ended(error: KlingError) -> None:
            if _stops_the_batch(error):  # the client closed under the batch
                self._results.put_nowait(error)
            else:
                self._finish(result(error=error))

        def listener(item: Task | KlingError) -> None:
            if isinstance(item, KlingError):
                self._tracker.unlisten(state, listener, every_change=False)
                ended(item)
            elif item.is_terminal:
                self._tracker.unlisten(state, listener, every_change=False)
                self._finish(result(item))

        try:
            # It acts on the end only: changes on the way need not be structured.
            self._tracker.listen(state, listener, every_change=False)
        except ClientClosedError as error:
            ended(error)

    def _finish(self, result: BatchResult) -> None:
        if self._slots is not None:
            self._slots.release()
        if result.estimate is None:
            result = attrs.evolve(result, estimate=self._submissions.estimate_of(result.request))
        self.cost = self.cost.adding(result)
        self._results.put_nowait(result)


async def _each(requests: BatchRequests) -> AsyncIterator[TaskRequest | BatchItem]:
    if isinstance(requests, AsyncIterable):
        async for request in requests:
            yield request
    else:
        for request in requests:
            yield request
