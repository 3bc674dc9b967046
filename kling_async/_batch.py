"""``client.batch()``: thousands of requests through the concurrency quota.

A feeder takes requests in order, waits for their units in the limiter (so the
account's quota stays full but is not exceeded) and starts each create; every
created task reports back when it ends, and results come out in completion
order. One request's failure is one result with an ``error``; only a problem of
the whole account (quota used up, IP not whitelisted, bad credentials) stops the
batch, raised from the iterator.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

import attrs

from ._exceptions import (
    AuthenticationError,
    ClientClosedError,
    ConfigurationError,
    KlingError,
    PermissionDeniedError,
    QuotaExceededError,
    TaskFailedError,
)
from ._handle import TaskHandle
from ._limiter import ConcurrencyLimiter
from ._models import Task, TaskRequest, TaskStatus
from ._resources import with_external_id
from ._wire import converter

if TYPE_CHECKING:
    from ._resources import Images
    from ._tracking import Tracker

__all__ = ["Batch", "BatchResult"]

logger = logging.getLogger("kling_async")

BatchRequests = Iterable[TaskRequest] | AsyncIterable[TaskRequest]

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

    @property
    def ok(self) -> bool:
        """True when the task succeeded."""
        return self.task is not None and self.task.status is TaskStatus.SUCCEED

    def to_dict(self) -> dict[str, Any]:
        """The result as plain, JSON-ready data: ``index``, ``ok``, ``task_id``,
        ``external_task_id``, ``task`` (:meth:`Task.to_dict`, or ``None``) and
        ``error`` (its ``type`` and ``message``, plus ``code`` and ``request_id``
        for an :class:`APIError`; or ``None``). The request is left out (it may
        hold megabytes of base64 images): ``index`` ties a result to its input.
        """
        task_id = self.handle.task_id if self.handle is not None else None
        return {
            "index": self.index,
            "ok": self.ok,
            "task_id": task_id or (self.task.task_id if self.task is not None else None),
            "external_task_id": self.request.external_task_id,
            "task": converter.unstructure(self.task, Task | None),
            "error": converter.unstructure(self.error, KlingError | None),
        }

    def to_json(self, *, indent: int | None = None) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)


def _stops_the_batch(error: KlingError) -> bool:
    """Errors that every further request would hit too: stop instead of repeating them."""
    if isinstance(error, (QuotaExceededError, AuthenticationError, ConfigurationError)):
        return True
    if isinstance(error, ClientClosedError):
        return True
    return isinstance(error, PermissionDeniedError) and error.code == 1304


class _Fed:
    """Marks the end of the input in the results queue."""


class Batch:
    """An async iterator over a batch's results, in completion order.

    Iterate it once (``async for result in batch``) or call :meth:`collect`.
    Breaking out stops submitting: requests still waiting for quota units are
    dropped, creates already on the wire get their answer first. Tasks created
    keep running on Kling, stay attached to the client (polled until they end,
    releasing their concurrency units) and are listed in :attr:`pending`.
    """

    def __init__(
        self,
        images: Images,
        tracker: Tracker,
        requests: BatchRequests,
        *,
        limiter: ConcurrencyLimiter,
        max_in_flight: int | None = None,
    ) -> None:
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._images = images
        self._tracker = tracker
        self._requests = requests
        self._limiter = limiter
        self._slots = asyncio.Semaphore(max_in_flight) if max_in_flight else None
        self._lookahead = asyncio.Semaphore(LOOKAHEAD)
        self._results: asyncio.Queue[BatchResult | Exception | _Fed] = asyncio.Queue()
        self._creates: dict[asyncio.Task[None], str] = {}
        self._sending: set[asyncio.Task[None]] = set()  # creates on the wire now
        self._sent = asyncio.Event()  # a create got its answer
        self._outstanding = 0
        self._started = False
        #: Handles of every task this batch created, in creation order.
        self.handles: list[TaskHandle] = []
        #: external_task_ids of creates cut short when the batch stopped: they
        #: may or may not exist on Kling (look them up with client.images.get).
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
                if isinstance(item, _Fed):
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
        feeder.cancel()
        await asyncio.gather(feeder, return_exceptions=True)
        try:
            await self._settle_creates()
        finally:
            # Cancelled while settling: what is still on the wire becomes uncertain.
            for create in self._creates:
                create.cancel()
            await asyncio.gather(*self._creates, return_exceptions=True)
        self._report_stop()

    async def _settle_creates(self) -> None:
        """Cancel the creates still waiting for quota units; let those on the
        wire get their answer, so a task Kling created is attached, not lost.
        A create answered 1303 goes back to waiting, and is cancelled then."""
        while self._creates:
            waiting = [c for c in self._creates if c not in self._sending and not c.done()]
            for create in waiting:
                create.cancel()
            self._sent.clear()
            answered = asyncio.ensure_future(self._sent.wait())
            try:
                await asyncio.wait([*self._creates, answered], return_when=asyncio.FIRST_COMPLETED)
            finally:
                answered.cancel()
            await asyncio.sleep(0)  # let finished creates' done-callbacks leave _creates

    def _report_stop(self) -> None:
        if self._outstanding:
            pending = [handle.task_id for handle in self.pending]
            if pending:
                logger.info(
                    "batch stopped with %d tasks still running on Kling: %s",
                    len(pending),
                    ", ".join(pending),
                )
            if self.uncertain:
                logger.warning(
                    "batch stopped during %d creates that may or may not have landed "
                    "(external_task_ids): %s",
                    len(self.uncertain),
                    ", ".join(self.uncertain),
                )

    async def _feed(self) -> None:
        try:
            index = 0
            async for request in _each(self._requests):
                if self._slots is not None:
                    await self._slots.acquire()
                await self._lookahead.acquire()
                # The id is fixed here so that a create cut short can be named.
                request, external_task_id = with_external_id(request)
                self._outstanding += 1
                create = asyncio.create_task(self._submit(index, request))
                self._creates[create] = external_task_id
                create.add_done_callback(self._creates.pop)
                index += 1
        except Exception as error:  # the caller's own request iterator failed
            self._results.put_nowait(error)
            return
        self._results.put_nowait(_Fed())

    async def _submit(self, index: int, request: TaskRequest) -> None:
        # Up to LOOKAHEAD requests wait in the limiter together, queued in input
        # order, so its first-fit rule can start a small one beside a large one
        # that does not fit yet. One at a time would leave those units idle.
        try:
            await self._limiter.acquire(request.n)
        finally:
            self._lookahead.release()
        me = asyncio.current_task()
        assert me is not None  # a coroutine of the batch's own tasks

        def sending(on_the_wire: bool) -> None:
            if on_the_wire:
                self._sending.add(me)
            else:
                self._sending.discard(me)
                self._sent.set()

        try:
            handle = await self._images.submit_holding(request, self._limiter, on_sending=sending)
        except asyncio.CancelledError:
            if me in self._sending:  # cut short on the wire: Kling may have the task
                self.uncertain.append(str(request.external_task_id))
            raise
        except KlingError as error:
            if _stops_the_batch(error):
                self._results.put_nowait(error)
            else:
                self._finish(BatchResult(index=index, request=request, error=error))
            return
        finally:
            self._sending.discard(me)
        self.handles.append(handle)
        self._follow(index, request, handle)

    def _follow(self, index: int, request: TaskRequest, handle: TaskHandle) -> None:
        """Put the task's result in the queue when it ends."""

        def result(task: Task | None = None, error: KlingError | None = None) -> BatchResult:
            if task is not None and task.status is TaskStatus.FAILED:
                error = TaskFailedError(task)
            return BatchResult(index=index, request=request, handle=handle, task=task, error=error)

        state = handle._state
        if state.terminal:
            self._finish(result(state.latest))
            return

        def listener(item: Task | KlingError) -> None:
            if isinstance(item, KlingError):
                self._tracker.unlisten(state, listener)
                self._finish(result(error=item))
            elif item.is_terminal:
                self._tracker.unlisten(state, listener)
                self._finish(result(item))

        self._tracker.listen(state, listener)

    def _finish(self, result: BatchResult) -> None:
        if self._slots is not None:
            self._slots.release()
        self._results.put_nowait(result)


async def _each(requests: BatchRequests) -> AsyncIterator[TaskRequest]:
    if isinstance(requests, AsyncIterable):
        async for request in requests:
            yield request
    else:
        for request in requests:
            yield request
