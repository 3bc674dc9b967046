"""One poller per endpoint per client, for every task anyone is waiting on.

A thousand handles awaited at once share this one loop instead of running a
thousand sleeping coroutines: it wakes when the earliest task is due and feeds
what it learns to the tracker. Each task's polls grow further apart as it ages
(``PollPolicy``), and are only a slow safety net while Kling's callbacks are
expected for it.

With few tasks in flight each due task gets its own GET. With many, one sweep
of the list endpoint (500 tasks a page, newest first) refreshes every tracked
task it sees, whether due or not, and stops as soon as every due task was seen;
the few not found on those pages fall back to single GETs. At 1,000 tasks in
flight that is two or three requests where per-task polling sends a thousand.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ._exceptions import APIError, KlingError, is_retryable
from ._models import Endpoint
from ._wire import MAX_PAGE_SIZE, Envelope, get_request, list_request, parse_task

if TYPE_CHECKING:
    from ._tracking import TaskState, Tracker

__all__ = ["Poller"]

logger = logging.getLogger("kling_async")

#: Polls of one endpoint in flight at once; the rest wait their turn.
MAX_CONCURRENT_POLLS = 32
#: From this many tasks of one endpoint in flight, polls read list pages.
LIST_THRESHOLD = 20
#: Pages a sweep may read beyond what its own tasks would fill: other
#: processes of the account interleave their tasks with ours.
EXTRA_SWEEP_PAGES = 2


class Poller:
    """Polls the tasks of one endpoint that the tracker says are wanted."""

    def __init__(self, tracker: Tracker, endpoint: Endpoint) -> None:
        self._tracker = tracker
        self._endpoint = endpoint
        self._policy = tracker.policy
        self._active: set[TaskState] = set()
        self._jobs: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._sweeping = False
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_POLLS)
        #: Requests sent, for reports and benchmarks.
        self.gets = 0
        self.list_pages = 0

    def add(self, state: TaskState) -> None:
        """Start polling ``state`` (no-op if it is already polled)."""
        if state in self._active:
            return
        loop = asyncio.get_running_loop()
        self._active.add(state)
        # A task the client has never seen is polled at once; one it just
        # created (or polled) waits its turn on the backoff schedule.
        if state.latest is None:
            state.next_poll = loop.time()
        elif state.next_poll == 0.0:
            state.next_poll = loop.time() + self._delay(state, loop.time())
        if self._runner is None:
            self._runner = loop.create_task(self._run(), name=f"kling-poll-{self._endpoint.value}")
        self._wake.set()

    def hurry(self, state: TaskState) -> None:
        """Poll ``state`` as soon as possible (a terminal callback wants confirming);
        a poll already in flight may predate it, so another follows that one."""
        if state not in self._active:
            if not state.wanted:
                return  # nobody waits: a later wait polls it anyway
            self.add(state)
        state.hurry = True
        if not state.polling:
            state.next_poll = asyncio.get_running_loop().time()
        self._wake.set()

    def discard(self, state: TaskState) -> None:
        """Stop polling ``state``; an in-flight poll still delivers its answer."""
        self._active.discard(state)

    async def close(self) -> None:
        """Stop the loop and every poll in flight."""
        tasks = [*self._jobs, *([self._runner] if self._runner else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._active.clear()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._active:
                next_due = self._start_due_polls(loop.time())
                self._wake.clear()
                timer = loop.call_at(next_due, self._wake.set) if next_due < math.inf else None
                try:
                    await self._wake.wait()
                finally:
                    if timer is not None:
                        timer.cancel()
        finally:
            self._runner = None

    def _delay(self, state: TaskState, now: float) -> float:
        """Seconds until ``state``'s next poll: by its age, or, while Kling's
        callbacks are expected and the task is not overdue, the slow safety net."""
        age = now - state.first_seen  # both on the monotonic clock the loop uses
        delay = self._policy.delay(age)
        if state.callbacks:
            typical = self._tracker.typical_duration
            overdue_at = (
                self._policy.overdue_factor * typical
                if typical is not None
                else self._policy.callback_delay
            )
            if age < overdue_at:
                delay = max(delay, min(self._policy.callback_delay, overdue_at - age))
        return delay

    def _start_due_polls(self, now: float) -> float:
        """Start the polls that are due; return when the next one will be.

        A method of its own so no task state lingers in the sleeping loop's frame.
        """
        next_due = math.inf
        due: list[TaskState] = []
        for state in self._active:
            if state.polling:
                continue
            if state.next_poll <= now:
                due.append(state)
            else:
                next_due = min(next_due, state.next_poll)
        if not due:
            return next_due
        if len(self._active) >= LIST_THRESHOLD:
            if not self._sweeping:
                self._sweeping = True
                for state in due:
                    state.polling, state.hurry = True, False
                self._spawn(self._sweep(due))
            return next_due
        for state in due:
            state.polling, state.hurry = True, False
            self._spawn(self._poll(state))
        return next_due

    def _spawn(self, work: Any) -> None:
        job = asyncio.get_running_loop().create_task(work)
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    def _reschedule(self, states: Iterable[TaskState]) -> None:
        now = asyncio.get_running_loop().time()
        for state in states:
            state.polling = False
            state.next_poll = now if state.hurry else now + self._delay(state, now)
        self._wake.set()

    # --- single GETs ------------------------------------------------------------

    async def _poll(self, state: TaskState) -> None:
        try:
            async with self._slots:
                if state not in self._active:  # nobody wants it any more
                    return
                self.gets += 1
                envelope = await self._tracker.transport.send(
                    get_request(self._endpoint, state.task_id)
                )
            self._tracker.publish(state, parse_task(envelope))
        except KlingError as error:
            self._failed(state, error)
        except Exception as error:  # a bug must end the waits, not hang them
            logger.exception("unexpected error polling task %s", state.task_id)
            self._tracker.fail(state, KlingError(f"polling task {state.task_id} failed: {error!r}"))
        finally:
            self._reschedule((state,))

    def _failed(self, state: TaskState, error: KlingError) -> None:
        if is_retryable(error):
            # The transport already retried; the next scheduled poll tries again.
            logger.warning("polling task %s failed, will retry: %s", state.task_id, error)
        else:
            self._tracker.fail(state, error)

    # --- list sweeps ------------------------------------------------------------

    async def _sweep(self, due: list[TaskState]) -> None:
        missing = set(due)
        seen: set[TaskState] = set()
        try:
            pages = math.ceil(len(self._active) / MAX_PAGE_SIZE) + EXTRA_SWEEP_PAGES
            for page in range(1, pages + 1):
                async with self._slots:
                    self.list_pages += 1
                    envelope = await self._tracker.transport.send(
                        list_request(self._endpoint, page, MAX_PAGE_SIZE)
                    )
                items = envelope.data
                if not isinstance(items, list):
                    raise APIError(
                        "list response data is not an array",
                        request_id=envelope.request_id,
                        http_status=envelope.http_status,
                    )
                self._take_page(items, envelope, seen)
                missing -= seen
                if not missing or len(items) < MAX_PAGE_SIZE:
                    break
        except KlingError as error:
            logger.warning("list sweep failed, polling tasks one by one: %s", error)
        finally:
            self._sweeping = False
            self._reschedule(seen)
        for state in missing:  # not on the pages read: ask for each
            self._spawn(self._poll(state))

    def _take_page(self, items: list[Any], envelope: Envelope, seen: set[TaskState]) -> None:
        """Publish every tracked task on a list page; skip the rest cheaply."""
        for item in items:
            task_id = item.get("task_id") if isinstance(item, dict) else None
            state = (
                self._tracker.find(self._endpoint, task_id) if isinstance(task_id, str) else None
            )
            if state is None:
                continue
            seen.add(state)
            known = state.latest
            if (
                known is not None
                and known.raw.get("updated_at") == item.get("updated_at")
                and known.raw.get("task_status") == item.get("task_status")
            ):
                continue  # unchanged: no need to decode it
            try:
                task = parse_task(
                    Envelope(item, envelope.request_id, http_status=envelope.http_status)
                )
            except APIError as error:
                logger.warning("unreadable task %s on a list page: %s", task_id, error)
                continue
            self._tracker.publish(state, task)
