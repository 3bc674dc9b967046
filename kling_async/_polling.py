"""One poller per endpoint per client, for every task anyone is waiting on.

A thousand handles awaited at once share this one loop instead of running a
thousand sleeping coroutines: it wakes when the earliest task is due, sends the
due polls (bounded in number), and feeds results to the tracker. Each task's
polls grow further apart as it ages (``PollPolicy``), and are only a slow
safety net while Kling's callbacks are expected for it.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import TYPE_CHECKING

from ._exceptions import KlingError, is_retryable
from ._models import Endpoint
from ._wire import get_request, parse_task

if TYPE_CHECKING:
    from ._tracking import TaskState, Tracker

__all__ = ["Poller"]

logger = logging.getLogger("kling_async")

#: Polls of one endpoint in flight at once; the rest wait their turn.
MAX_CONCURRENT_POLLS = 32


class Poller:
    """Polls the tasks of one endpoint that the tracker says are wanted."""

    def __init__(self, tracker: Tracker, endpoint: Endpoint) -> None:
        self._tracker = tracker
        self._endpoint = endpoint
        self._policy = tracker.policy
        self._active: set[TaskState] = set()
        self._jobs: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_POLLS)

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
            self._runner = loop.create_task(
                self._run(), name=f"kling-poller-{self._endpoint.value}"
            )
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
        """Start every poll that is due; return when the next one will be.

        A method of its own so no task state lingers in the sleeping loop's frame.
        """
        next_due = math.inf
        for state in tuple(self._active):
            if state.polling:
                continue
            if state.next_poll <= now:
                self._start_poll(state)
            else:
                next_due = min(next_due, state.next_poll)
        return next_due

    def _start_poll(self, state: TaskState) -> None:
        state.polling = True
        job = asyncio.get_running_loop().create_task(self._poll(state))
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    async def _poll(self, state: TaskState) -> None:
        try:
            async with self._slots:
                if state not in self._active:  # nobody wants it any more
                    return
                envelope = await self._tracker.transport.send(
                    get_request(self._endpoint, state.task_id)
                )
            self._tracker.publish(state, parse_task(envelope))
        except KlingError as error:
            if is_retryable(error):
                # The transport already retried; the next scheduled poll tries again.
                logger.warning("polling task %s failed, will retry: %s", state.task_id, error)
            else:
                self._tracker.fail(state, error)
        except Exception as error:  # a bug must end the waits, not hang them
            logger.exception("unexpected error polling task %s", state.task_id)
            self._tracker.fail(state, KlingError(f"polling task {state.task_id} failed: {error!r}"))
        finally:
            state.polling = False
            now = asyncio.get_running_loop().time()
            state.next_poll = now + self._delay(state, now)
            if state in self._active:
                self._wake.set()
