"""One poller per endpoint per client, for every task anyone is waiting on.

A thousand handles awaited at once share this one loop instead of running a
thousand sleeping coroutines: it wakes when the earliest task is due and feeds
what it learns to the tracker. When each task is due comes from the pure
schedule in ``_schedule``: once the client has seen tasks of its kind finish,
not before it may have ended, densely through the window where it likely ends,
less often once it is overdue; before that, gaps that grow with its age
(``PollPolicy``). While Kling's callbacks are expected for a task, polls are
only a slow safety net.

With one task due, it gets its own GET. With several, one request to the list
endpoint (newest first) refreshes every tracked task on its page, due or not,
and costs per page, not per task: a sweep goes out whenever it costs fewer
requests than the GETs it replaces, reads pages sized to what is in flight,
and stops as soon as every due task was seen; the few not found on those pages
fall back to single GETs. Tasks due soon ride along, so while tasks are in
their likely window sweeps follow at a steady cadence and every task in flight
is seen at each. At 1,000 tasks in flight that is two or three requests where
per-task polling sends a thousand.

No unexpected error strands a task: a sweep that fails in any way hands its
tasks to single GETs, and a GET that fails unexpectedly ends the waits on its
task with a :class:`KlingError`.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ._exceptions import (
    APIError,
    InvalidRequestError,
    KlingError,
    NotFoundError,
    PermissionDeniedError,
    is_retryable,
)
from ._models import Endpoint, Task, TaskStatus
from ._schedule import poll_delay
from ._wire import (
    MAX_PAGE_NUMBER,
    MAX_PAGE_SIZE,
    Envelope,
    get_request,
    list_items,
    list_request,
    parse_task,
    same_version,
    task_id_of,
)

if TYPE_CHECKING:
    from ._tracking import TaskState, Tracker


logger = logging.getLogger("kling_async")

#: Polls of one endpoint in flight at once; the rest wait their turn.
MAX_CONCURRENT_POLLS = 32
#: From this many tasks of one endpoint in flight, confirmations of terminal
#: callbacks that arrive in a burst are gathered into list sweeps.
LIST_THRESHOLD = 20
#: Decoding this many tasks of a list page costs about as much as one more
#: request: a page of 500 is worth ~9 GETs, one of 30 little more than one.
ITEMS_PER_REQUEST = 64
#: The fewest due tasks a sweep is ever sent for: for one, its GET is cheaper.
MIN_SWEEP = 2
#: A burst of confirmations (MIN_BURST or more within CONFIRM_GATHER seconds)
#: with many tasks in flight waits up to CONFIRM_GATHER for company, so the
#: burst is a few sweeps rather than one GET each. At a steady trickle each is
#: polled at once: waiting would cost latency and save nothing.
MIN_BURST = 8
CONFIRM_GATHER = 0.02
#: Pages a sweep may read beyond what it planned: other processes of the
#: account interleave their tasks with ours.
EXTRA_SWEEP_PAGES = 2
#: List positions per tracked task, before any sweep has measured it: finished
#: tasks and other processes' tasks sit between ours on the pages.
INITIAL_SPREAD = 1.5
#: Positions a page holds beyond the estimate, for tasks created meanwhile.
PAGE_MARGIN = 8
#: List items the sweeps of one poller decode per second, at most, a page
#: counting as ``ITEMS_PER_REQUEST`` more. Reading an item costs about 4 us of
#: CPU (most of it ``json.loads``) whether or not its task changed, and a sweep
#: reads every task between the shallowest and the deepest due one: without a
#: bound, sweeps in the dense window of many short tasks would cost CPU per task
#: in flight, not per change. A sweep from the top at 1,000 in flight is then
#: followed by the next 0.25 s later (the dense window costs a lag of at most
#: that); at 100, 25 ms.
SWEEP_ITEMS_PER_SECOND = 4000
#: The smallest page a sweep starting below the top of the list asks for.
MIN_TARGETED_PAGE = 64
#: The due-time heap is rebuilt from the plans once it holds this many times
#: more entries than tasks polled (each re-plan leaves its old entry behind).
HEAP_SLACK = 1.5
#: Tasks a sweep looks at or plans at a time before the loop serves others.
REPLAN_CHUNK = 128


class PollPlan:
    """The poller's schedule of one task, in the task state's ``poll_plan``
    slot: only this module reads or writes it. Made on the task's first poll
    plan, and kept when it stops being polled, so a task polled again later
    keeps its turn. Slotted: thousands are held."""

    __slots__ = ("hurry", "interval", "next_poll", "polling", "position")

    def __init__(self) -> None:
        #: Poll again as soon as possible (a terminal callback came).
        self.hurry = False
        #: A poll of this task is in flight.
        self.polling = False
        #: Loop time of the next poll, set when polling starts (0.0: never
        #: planned), and the gap before it.
        self.next_poll = 0.0
        self.interval = 0.0
        #: Where a list page last showed the task (1-based; 0: never seen). The
        #: list is newest first, so the task is there or deeper now.
        self.position = 0

    def start(self) -> None:
        """A poll of the task goes out: it answers any hurry."""
        self.polling, self.hurry = True, False


def _plan(state: TaskState) -> PollPlan:
    """``state``'s schedule, made on first use."""
    plan = state.poll_plan
    if plan is None:
        plan = state.poll_plan = PollPlan()
    return plan


class Poller:
    """Polls the tasks of one endpoint that the tracker says are wanted."""

    def __init__(self, tracker: Tracker, endpoint: Endpoint) -> None:
        self._tracker = tracker
        self._transport = tracker.transport  # the tracker's, whose news it gathers
        self._endpoint = endpoint
        self._policy = tracker.policy
        #: The tasks polled, by task_id: a list item is matched with one lookup.
        self._active: dict[str, TaskState] = {}
        #: ``(next_poll, task_id)`` of every planned poll, earliest first, so a
        #: wake-up finds what is due without looking at every task in flight.
        #: An entry whose task has been planned again since (or is polled, or
        #: gone) is stale and skipped when it comes up.
        self._due: list[tuple[float, str]] = []
        self._jobs: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._sweeping = False
        # False once the list endpoint refused us for good (a gateway without it).
        self._sweeps = tracker.policy.list_sweeps
        self._wake = asyncio.Event()
        self._wake_at = -math.inf  # when the sleeping runner's timer fires
        self._next_sweep_at = -math.inf  # the sweeps' item budget allows one from then
        self._gather_at = -math.inf  # when the confirmations gathered now are polled
        self._confirm_pace = 0.0  # confirmations in about the last CONFIRM_GATHER s
        self._last_confirm = -math.inf
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_POLLS)
        #: List positions per tracked task, as the last sweeps found them.
        self._spread = INITIAL_SPREAD
        #: What structures a task a poll left unread: one bound method for all.
        self._reader = self._read_late
        #: Requests sent, tasks structured from their answers and polls planned,
        #: for reports and benchmarks (work should follow change, not tasks in flight).
        self.gets = 0
        self.list_pages = 0
        self.list_items = 0
        self.parsed = 0
        self.planned = 0

    def add(self, state: TaskState) -> None:
        """Start polling ``state`` (no-op if it is already polled)."""
        if self._polls(state):
            return
        loop = asyncio.get_running_loop()
        self._active[state.task_id] = state
        plan = _plan(state)
        # A task the client has never seen is polled at once; one it just
        # created (or polled) waits its turn on the schedule.
        if not state.seen or plan.hurry:
            plan.next_poll = loop.time()
        elif plan.next_poll == 0.0:
            plan.interval = self._delay(state, loop.time())
            plan.next_poll = loop.time() + plan.interval
        if self._runner is None:
            self._runner = loop.create_task(self._run(), name=f"kling-poll-{self._endpoint.value}")
        if not plan.polling:
            self._push(state, plan)
        self._due_at(plan.next_poll)

    def replan(self, state: TaskState) -> None:
        """Plan ``state``'s next poll again: what is known about it changed (its
        kind became known after it was first scheduled)."""
        if not self._polls(state):
            return
        plan = _plan(state)
        if plan.polling or plan.hurry or not state.seen:
            return
        now = asyncio.get_running_loop().time()
        plan.interval = self._delay(state, now)
        plan.next_poll = now + plan.interval
        self._push(state, plan)
        self._due_at(plan.next_poll)

    def replan_all(self) -> None:
        """:meth:`replan` every task waiting for its next poll."""
        for state in tuple(self._active.values()):
            self.replan(state)

    def hurry(self, state: TaskState) -> None:
        """Poll ``state`` as soon as possible (a terminal callback wants confirming);
        a poll already in flight may predate it, so another follows that one.
        Nobody waiting yet (a callback that overtook its create), the state is
        marked so that the first wait polls it at once."""
        plan = _plan(state)
        plan.hurry = True
        if not self._polls(state):
            if not state.wanted:
                return
            self.add(state)
        if not plan.polling:
            now = asyncio.get_running_loop().time()
            if self._in_confirmation_burst(now) and len(self._active) >= LIST_THRESHOLD:
                if self._gather_at <= now:
                    self._gather_at = now + CONFIRM_GATHER
                plan.next_poll = self._gather_at
            else:
                plan.next_poll = now
            self._push(state, plan)
            self._due_at(plan.next_poll)

    def _in_confirmation_burst(self, now: float) -> bool:
        """Count one more confirmation; whether they come fast enough to fill a sweep.

        The count decays exponentially with a CONFIRM_GATHER time constant: at a
        steady rate r it settles near ``r * CONFIRM_GATHER``.
        """
        elapsed = now - self._last_confirm
        self._confirm_pace = self._confirm_pace * math.exp(-elapsed / CONFIRM_GATHER) + 1.0
        self._last_confirm = now
        return self._confirm_pace >= MIN_BURST

    def discard(self, state: TaskState) -> None:
        """Stop polling ``state``; an in-flight poll still delivers its answer."""
        if self._polls(state):
            del self._active[state.task_id]

    def _polls(self, state: TaskState) -> bool:
        """Whether ``state`` is among the tasks this poller polls."""
        return self._active.get(state.task_id) is state

    def _push(self, state: TaskState, plan: PollPlan) -> None:
        """Enter ``state``'s planned poll (``plan.next_poll``) in the due-time heap."""
        due = self._due
        heapq.heappush(due, (plan.next_poll, state.task_id))
        if len(due) > HEAP_SLACK * len(self._active) + 64:
            # Mostly stale entries of tasks planned again: start afresh.
            self._rebuild_due()

    def _rebuild_due(self) -> None:
        plans = ((task_id, state.poll_plan) for task_id, state in self._active.items())
        self._due = [
            (plan.next_poll, task_id) for task_id, plan in plans if plan and not plan.polling
        ]
        heapq.heapify(self._due)

    def _current(self, entry: tuple[float, str]) -> TaskState | None:
        """The task a heap entry plans, if the entry is still its plan."""
        when, task_id = entry
        state = self._active.get(task_id)
        if state is None:
            return None
        plan = state.poll_plan
        if plan is None or plan.polling or plan.next_poll != when:
            return None
        return state

    def _pop_due(self, now: float) -> list[TaskState]:
        """Take every task due by ``now`` out of the heap, each once."""
        heap = self._due
        due: list[TaskState] = []
        taken: set[str] = set()
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            state = self._current(entry)
            if state is not None and entry[1] not in taken:
                taken.add(entry[1])
                due.append(state)
        return due

    def _next_due(self) -> float:
        """When the earliest planned poll is (stale entries dropped on the way)."""
        heap = self._due
        while heap:
            if self._current(heap[0]) is not None:
                return heap[0][0]
            heapq.heappop(heap)
        return math.inf

    async def close(self) -> None:
        """Stop the loop and every poll in flight."""
        tasks = [*self._jobs, *([self._runner] if self._runner else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._active.clear()
        self._due.clear()

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

    def _delay(self, state: TaskState, now: float, sharing: float = 1.0) -> float:
        """Seconds until ``state``'s next poll (see ``_schedule.poll_delay``),
        ``sharing`` being how many tasks the request that polled it served."""
        policy = self._policy
        self.planned += 1
        try:
            return poll_delay(
                now - state.first_seen,  # both on the monotonic clock the loop uses
                self._tracker.durations_for(state) if policy.learn else None,
                policy,
                callbacks=state.expects_callbacks,
                sharing=sharing,
                noise=policy.rng.uniform(-1.0, 1.0),
            )
        except Exception:  # a bug in planning must not leave the task unpolled
            logger.exception("unexpected error planning the next poll of task %s", state.task_id)
            return policy.max_delay

    def _check_callbacks(self, state: TaskState) -> None:
        """``state`` expects callbacks and has heard none, yet a poll shows a
        status change Kling calls back about, stamped long enough ago that its
        callback should be here: the receiver may be unreachable."""
        latest = state.latest
        if latest is None or latest.status is TaskStatus.SUBMITTED or latest.updated_at is None:
            return  # nothing to call back about yet (a task queued on Kling's side)
        if time.time() - latest.updated_at.timestamp() >= self._policy.callback_delay / 2:
            self._tracker.callbacks_silent(state)

    def _start_due_polls(self, now: float) -> float:
        """Start the polls that are due; return when the next one will be.

        The due tasks come off the heap: a wake-up costs per task due, not per
        task in flight. A method of its own so no task state lingers in the
        sleeping loop's frame.
        """
        if self._sweeping:
            return math.inf  # the sweep under way wakes the runner when it ends
        due = self._pop_due(now)
        if not due:
            return self._next_due()
        sweeping = self._sweeps and len(self._active) >= MIN_SWEEP
        if sweeping and now < self._next_sweep_at and not any(_plan(state).hurry for state in due):
            # Over the item budget: the due tasks wait for the next sweep
            # rather than go out one GET each (a confirmation does not wait).
            for state in due:
                self._push(state, _plan(state))
            return self._next_sweep_at
        if sweeping:
            # A sweep reads as deep as its oldest due task, so it takes along
            # every task at least halfway to its next poll: scattered due times
            # merge into a steady cadence of sweeps instead of one per task.
            size, pages = self._page_plan()
            needed = max(MIN_SWEEP, pages * (1 + size / ITEMS_PER_REQUEST))
            if len(due) + self._near(now, limit=needed - len(due)) >= needed:
                self._sweeping = True
                for state in due:
                    _plan(state).start()
                self._spawn(self._sweep(due, size, pages, near_at=now))
                return math.inf
        for state in due:
            _plan(state).start()
            self._spawn(self._poll(state))
        return self._next_due()

    def _near(self, now: float, *, limit: float) -> int:
        """How many tasks are at least halfway to their next poll, counted up to ``limit``."""
        count = 0
        if limit <= 0:
            return count
        for state in self._active.values():
            if _near(state.poll_plan, now):
                count += 1
                if count >= limit:
                    break
        return count

    async def _take_near(self, now: float, *, from_position: int = 1) -> list[TaskState]:
        """Start the tasks at least halfway to their next poll at ``now``, for a
        sweep about to read the list from ``from_position`` on anyway: its pages
        cost no more. A task last seen above that position (or never seen, once
        the sweep starts below the top) may be on a page it skips, so it keeps
        its plan. Thousands are gone through in chunks, the loop served between them."""
        states = list(self._active.values())
        near: list[TaskState] = []
        for start in range(0, len(states), REPLAN_CHUNK):
            if start:
                await asyncio.sleep(0)
            for state in states[start : start + REPLAN_CHUNK]:
                plan = state.poll_plan
                if _near(plan, now) and self._polls(state):
                    assert plan is not None  # _near says so
                    if from_position > 1 and plan.position < from_position:
                        continue
                    plan.start()
                    near.append(state)
        return near

    def _page_plan(self) -> tuple[int, int]:
        """The page size and page count a sweep reaching every tracked task needs.

        Sized to what is in flight, with room for what sits between: a small
        page costs the server and the client less to encode and decode.
        """
        depth = math.ceil(len(self._active) * self._spread) + PAGE_MARGIN
        size = min(MAX_PAGE_SIZE, depth)
        return size, math.ceil(depth / size)

    def _spawn(self, work: Any) -> None:
        job = asyncio.get_running_loop().create_task(work)
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    def _reschedule(self, states: Iterable[TaskState], sharing: float = 1.0) -> None:
        now = asyncio.get_running_loop().time()
        earliest = math.inf
        for state in states:
            plan = _plan(state)
            plan.polling = False
            if state.expects_callbacks and not state.heard:
                self._check_callbacks(state)
            if state.terminal:
                continue  # it ended: nothing left to plan
            plan.interval = 0.0 if plan.hurry else self._delay(state, now, sharing)
            plan.next_poll = now + plan.interval
            if self._polls(state):
                self._push(state, plan)
            earliest = min(earliest, plan.next_poll)
        self._due_at(earliest)

    def _take(self, state: TaskState, task: Task) -> None:
        """Publish what a poll said about ``state``."""
        self._tracker.publish_polled(state, task)

    def _read_late(self, data: Mapping[str, Any]) -> Task | None:
        """Structure a task a poll left unread (see ``Tracker.keep_unread``), now
        that someone asks; ``None`` if it cannot be read (logged)."""
        try:
            task = parse_task(Envelope(data, None))
        except APIError as error:
            logger.warning("unreadable task %s from a poll: %s", data.get("task_id"), error)
            return None
        self.parsed += 1
        return task

    # --- single GETs ------------------------------------------------------------

    async def _poll(self, state: TaskState) -> None:
        try:
            async with self._slots:
                if not self._polls(state):  # nobody wants it any more
                    return
                self.gets += 1
                envelope = await self._transport.send(get_request(self._endpoint, state.task_id))
            data = envelope.data
            if not _unchanged(state, data) and not self._tracker.keep_unread(
                state, data, self._reader
            ):
                self.parsed += 1
                self._take(state, parse_task(envelope))
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

    async def _sweep(
        self, due: list[TaskState], size: int, pages: int, *, near_at: float | None = None
    ) -> None:
        # Read from the page of the shallowest due task, in smaller pages, as
        # deep as a sweep from the top would (in at most twice its requests).
        reach = (pages + EXTRA_SWEEP_PAGES) * size
        size, first_page = _targeted(due, size, reach, 2 * (pages + EXTRA_SWEEP_PAGES))
        last_page = min(MAX_PAGE_NUMBER, max(first_page, math.ceil(reach / size)))
        if near_at is not None:
            # Taken along: scattered due times merge into a steady cadence of
            # sweeps instead of one per task (the runner starts nothing meanwhile).
            due = due + await self._take_near(near_at, from_position=(first_page - 1) * size + 1)
        missing = set(due)
        # Tasks on the pages whose status changed: due or not, their plan is stale.
        changed: list[TaskState] = []
        found = 0  # tracked tasks on the pages read
        tracked = len(self._active)
        deepest = 0  # list position of the deepest tracked task seen
        read = items_read = 0
        try:
            for page in range(first_page, last_page + 1):
                async with self._slots:
                    self.list_pages += 1
                    envelope = await self._transport.send(list_request(self._endpoint, page, size))
                items = list_items(envelope)
                read += 1
                items_read += len(items)
                self.list_items += len(items)
                on_page, at = self._take_page(items, envelope, missing, changed, (page - 1) * size)
                found += on_page
                deepest = at or deepest
                if not missing or len(items) < size:
                    break
        except KlingError as error:
            if not _list_refused(error):
                logger.warning("list sweep failed, polling tasks one by one: %s", error)
            else:
                # It will not work next time either: asking would double every poll.
                self._sweeps = False
                logger.warning(
                    "the list endpoint %s refused a sweep (%s): polling tasks one by one "
                    "from now on (PollPolicy(list_sweeps=False) says so up front)",
                    self._endpoint.value,
                    error,
                )
        except Exception:
            # Whatever it was, the tasks not seen yet still need polling: hand
            # them to single GETs, which end their waits if it happens again.
            logger.exception("unexpected error in a list sweep, polling tasks one by one")
        finally:
            self._next_sweep_at = (
                asyncio.get_running_loop().time()
                + (items_read + read * ITEMS_PER_REQUEST) / SWEEP_ITEMS_PER_SECOND
            )
            self._learn_spread(tracked, found, deepest, complete=not missing)
            # Planned again: the due tasks the pages showed, and the tasks whose
            # status changed (one a GET is polling is left to that GET). A task
            # that was neither keeps its plan: nothing it depends on moved, so
            # re-planning it would cost work per task in flight, not per change.
            polled = [state for state in due if state not in missing]
            polled += [
                state for state in changed if not _plan(state).polling and self._polls(state)
            ]
        try:
            # Thousands of tasks are planned in chunks, the loop served between
            # them: one block would stall every other coroutine of the process.
            for start in range(0, len(polled), REPLAN_CHUNK):
                if start:
                    await asyncio.sleep(0)
                self._reschedule(polled[start : start + REPLAN_CHUNK], sharing=found / max(read, 1))
        finally:
            self._sweeping = False
            self._due_at(-math.inf)  # the runner waits for the sweep to end
        for state in missing:  # not on the pages read: ask for each
            self._spawn(self._poll(state))

    def _learn_spread(self, tracked: int, found: int, deepest: int, *, complete: bool) -> None:
        """Size the next sweep's pages from where this one found the tasks."""
        if not tracked:
            return
        observed = deepest / tracked
        if not complete:  # due tasks beyond the pages read: go deeper next time
            self._spread = max(self._spread * 2, observed)
        elif found >= tracked:  # every tracked task seen: the depth is exact
            self._spread = max(observed, (self._spread + observed) / 2)
        else:  # some beyond the pages read: only a lower bound
            self._spread = max(self._spread, observed)
        # A sweep never needs more pages than the endpoint allows anyway.
        self._spread = min(self._spread, MAX_PAGE_SIZE * EXTRA_SWEEP_PAGES)

    def _take_page(
        self,
        items: list[Any],
        envelope: Envelope,
        missing: set[TaskState],
        changed: list[TaskState],
        offset: int,
    ) -> tuple[int, int]:
        """Publish every tracked task on a list page that changed; skip the rest
        cheaply, before any structuring: an item whose status and ``updated_at``
        are what the client knows costs a few dict lookups.

        Takes the due tasks on it out of ``missing``, adds the changed ones to
        ``changed``, and returns how many tracked tasks it held and the list
        position (1-based) of the deepest one, or 0.
        """
        deepest = found = 0
        polled = self._active
        for position, item in enumerate(items, offset + 1):
            # Only the tasks this poller polls: others' tasks, finished ones and
            # ones nobody waits for any more cost one failed lookup each.
            task_id = task_id_of(item)
            state = polled.get(task_id) if task_id is not None else None
            if state is None:
                continue
            found += 1
            deepest = position
            plan = state.poll_plan
            if plan is not None:
                plan.position = position
            missing.discard(state)
            if _unchanged(state, item):
                continue
            if self._tracker.keep_unread(state, item, self._reader):
                changed.append(state)  # a new status: its plan is stale all the same
                continue
            try:
                task = parse_task(
                    Envelope(item, envelope.request_id, http_status=envelope.http_status)
                )
            except APIError as error:
                logger.warning("unreadable task %s on a list page: %s", state.task_id, error)
                continue
            self.parsed += 1
            changed.append(state)
            self._take(state, task)
        return found, deepest


def _targeted(due: Iterable[TaskState], size: int, reach: int, requests: int) -> tuple[int, int]:
    """The page size (at most ``size``) and the first page of a sweep for ``due``
    that reads the list down to position ``reach`` in at most ``requests`` pages.

    A list page holds the newest tasks first, so a task seen at some position
    is there or deeper now: a sweep may start at the page of the shallowest due
    task's last position and skip the newer tasks above it. Due tasks are
    mostly old ones, near their end and bunched together, so reading from there
    in smaller pages (twice their spread, at least ``MIN_TARGETED_PAGE``, and
    no smaller than ``requests`` pages reaching ``reach`` need) decodes a
    fraction of the list. Page 1 of ``size`` when any due task was never seen
    on a page, or was last seen on that first page; a task that came up since
    (the list shrank) is missed and polled by a GET of its own.
    """
    positions = [state.poll_plan.position if state.poll_plan is not None else 0 for state in due]
    shallowest = min(positions, default=0)
    if shallowest <= size:
        # Never seen, or on the first page anyway: smaller pages would only
        # cost requests (a few tasks in flight fit one page whole).
        return size, 1
    spread = max(positions) - shallowest + 1
    targeted = max(
        MIN_TARGETED_PAGE,
        2 * spread,
        math.ceil((reach - shallowest + 1) / requests),
        # Never past the endpoint's last page number, however deep the task is.
        math.ceil(shallowest / MAX_PAGE_NUMBER),
    )
    targeted = min(size, targeted)
    return targeted, (shallowest - 1) // targeted + 1


def _near(plan: PollPlan | None, now: float) -> bool:
    """Whether a task planned by ``plan`` is not due yet but at least halfway to it."""
    return plan is not None and not plan.polling and now < plan.next_poll <= now + plan.interval / 2


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
    """Whether ``data`` (a task as Kling sent it) is what ``state`` already knows."""
    known = state.known_raw()
    return known is not None and same_version(known, data)


def _list_refused(error: KlingError) -> bool:
    """Whether the list endpoint itself is refused (a gateway without it, an
    account without the permission, a page size it will not take): asking again
    would fail again. Other failures (credentials, quota, a blip) are not about
    listing, and the next sweep may well work."""
    if isinstance(error, (NotFoundError, InvalidRequestError)):
        return True
    return isinstance(error, PermissionDeniedError) and error.code == 1103
