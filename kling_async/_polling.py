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

No unexpected error strands a task: a sweep that fails in any way hands its
tasks to single GETs, and a GET that fails unexpectedly ends the waits on its
task with a :class:`KlingError`.
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
#: A sweep reads 500 tasks a page, which costs about as much to decode as a
#: handful of single GETs: below this many tasks to poll, GETs are cheaper.
MIN_SWEEP = 8
#: With many tasks in flight, confirmations of terminal callbacks arriving in a
#: burst (MIN_SWEEP or more within this many seconds) wait up to this long for
#: company, so the burst is a few sweeps rather than one GET each. At a steady
#: trickle each is polled at once: waiting would cost latency and save nothing.
CONFIRM_GATHER = 0.02
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
        self._wake_at = -math.inf  # when the sleeping runner's timer fires
        self._gather_at = -math.inf  # when the confirmations gathered now are polled
        self._confirm_pace = 0.0  # confirmations in about the last CONFIRM_GATHER s
        self._last_confirm = -math.inf
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
        if state.latest is None or state.hurry:
            state.next_poll = loop.time()
        elif state.next_poll == 0.0:
            state.interval = self._delay(state, loop.time())
            state.next_poll = loop.time() + state.interval
        if self._runner is None:
            self._runner = loop.create_task(self._run(), name=f"kling-poll-{self._endpoint.value}")
        self._due_at(state.next_poll)

    def hurry(self, state: TaskState) -> None:
        """Poll ``state`` as soon as possible (a terminal callback wants confirming);
        a poll already in flight may predate it, so another follows that one.
        Nobody waiting yet (a callback that overtook its create), the state is
        marked so that the first wait polls it at once."""
        state.hurry = True
        if state not in self._active:
            if not state.wanted:
                return
            self.add(state)
        if not state.polling:
            now = asyncio.get_running_loop().time()
            if self._in_confirmation_burst(now) and len(self._active) >= LIST_THRESHOLD:
                if self._gather_at <= now:
                    self._gather_at = now + CONFIRM_GATHER
                state.next_poll = self._gather_at
            else:
                state.next_poll = now
            self._due_at(state.next_poll)

    def _in_confirmation_burst(self, now: float) -> bool:
        """Count one more confirmation; whether they come fast enough to fill a sweep.

        The count decays exponentially with a CONFIRM_GATHER time constant: at a
        steady rate r it settles near ``r * CONFIRM_GATHER``.
        """
        elapsed = now - self._last_confirm
        self._confirm_pace = self._confirm_pace * math.exp(-elapsed / CONFIRM_GATHER) + 1.0
        self._last_confirm = now
        return self._confirm_pace >= MIN_SWEEP

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

    def _due_at(self, when: float) -> None:
        """Wake the runner if ``when`` comes before its own timer: most finished
        polls schedule the next one later than that, and need not wake it."""
        if when < self._wake_at:
            self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._active:
                next_due = self._start_due_polls(loop.time())
                self._wake.clear()
                self._wake_at = next_due
                timer = loop.call_at(next_due, self._wake.set) if next_due < math.inf else None
                try:
                    await self._wake.wait()
                finally:
                    self._wake_at = -math.inf
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
        list_mode = len(self._active) >= LIST_THRESHOLD
        if list_mode and self._sweeping:
            return math.inf  # the sweep under way wakes the runner when it ends
        next_due = math.inf
        due: list[TaskState] = []
        for state in self._active:
            if state.polling:
                continue
            when = state.next_poll
            if when <= now:
                due.append(state)
            elif when < next_due:
                next_due = when
        if not due:
            return next_due
        if list_mode:
            # A sweep reads as deep as its oldest due task, so it takes along
            # every task at least halfway to its next poll: scattered due times
            # merge into few sweeps instead of one deep sweep per straggler.
            near = [
                state
                for state in self._active
                if not state.polling and now < state.next_poll <= now + state.interval / 2
            ]
            if len(due) + len(near) >= MIN_SWEEP:
                due += near
                self._sweeping = True
                for state in due:
                    state.polling, state.hurry = True, False
                self._spawn(self._sweep(due))
                return math.inf
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
        earliest = math.inf
        for state in states:
            state.polling = False
            state.interval = 0.0 if state.hurry else self._delay(state, now)
            state.next_poll = now + state.interval
            earliest = min(earliest, state.next_poll)
        self._due_at(earliest)

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
            if not _unchanged(state, envelope.data):
                self._tracker.publish(state, parse_task(envelope))
        except KlingError as error:
            self._failed(state, error)
        except Exception as error:  # a bug must end the waits, not hang them
            logger.exception("unexpected error polling task %s", state.task_id)
            self._tracker.fail(state, _unexpected(f"polling task {state.task_id}", error))
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
        except Exception:
            # Whatever it was, the tasks not seen yet still need polling: hand
            # them to single GETs, which end their waits if it happens again.
            logger.exception("unexpected error in a list sweep, polling tasks one by one")
        finally:
            self._sweeping = False
            self._reschedule(seen)
            self._due_at(-math.inf)  # the runner waits for the sweep to end
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
            if _unchanged(state, item):
                continue
            try:
                task = parse_task(
                    Envelope(item, envelope.request_id, http_status=envelope.http_status)
                )
            except APIError as error:
                logger.warning("unreadable task %s on a list page: %s", task_id, error)
                continue
            self._tracker.publish(state, task)


def _unexpected(doing: str, error: Exception) -> KlingError:
    """A KlingError that ends waits after an unexpected ``error``, chained to it.

    The message names only its type: its text may hold what it was handed
    (a header, a token), and the waits' errors travel into users' logs.
    """
    wrapped = KlingError(
        f"{doing} failed with an unexpected {type(error).__name__} (the cause is chained); "
        "this is a bug or a broken dependency, please report it"
    )
    wrapped.__cause__ = error
    return wrapped


def _unchanged(state: TaskState, data: Any) -> bool:
    """Whether ``data`` (a task as Kling sent it) is what ``state`` already knows:
    then there is nothing to decode."""
    known = state.latest
    return (
        known is not None
        and isinstance(data, dict)
        and known.raw.get("updated_at") == data.get("updated_at")
        and known.raw.get("task_status") == data.get("task_status")
    )
