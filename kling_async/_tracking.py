"""What the client knows about each task, and who is told when that changes.

Every piece of news about a task (a poll result, a create response, later a
callback) goes through :meth:`Tracker.publish`, which keeps only news that is
newer than what is known, and passes it to the task's listeners: waiters of
``await handle``, ``handle.updates()`` iterators, batch bookkeeping. Polling
(``_polling``) only runs for tasks somebody listens to, so a handle nobody
awaits costs nothing.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from ._config import PollPolicy
from ._exceptions import ClientClosedError, KlingError
from ._models import Endpoint, Task, TaskStatus

if TYPE_CHECKING:
    from ._polling import Poller
    from ._transport import Transport

__all__ = ["Listener", "TaskState", "Tracker"]

logger = logging.getLogger("kling_async")

Listener = Callable[[Task | KlingError], None]
"""Told every accepted update of a task, or an error that ends a wait on it."""

# Within one updated_at, a later lifecycle stage wins: a duplicate "processing"
# must not overwrite a "succeed" stamped in the same millisecond.
_STAGE = {TaskStatus.SUBMITTED: 0, TaskStatus.PROCESSING: 1}


def _stage(status: TaskStatus) -> int:
    return 2 if status.is_terminal else _STAGE.get(status, 1)


class TaskState:
    """The client's knowledge of one task, shared by every handle on it."""

    __slots__ = (
        "__weakref__",
        "endpoint",
        "external_task_id",
        "interest",
        "latest",
        "listeners",
        "next_poll",
        "pinned",
        "polling",
        "polls",
        "task_id",
    )

    def __init__(
        self,
        endpoint: Endpoint,
        task_id: str,
        *,
        latest: Task | None = None,
        external_task_id: str | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.task_id = task_id
        self.latest = latest
        self.external_task_id = external_task_id or (latest.external_task_id if latest else None)
        self.listeners: list[Listener] = []
        self.interest = 0  # waiters and iterators currently listening
        self.pinned = False  # kept polled until terminal even with no listener
        self.polling = False  # a poll of this task is in flight
        self.polls = 0
        self.next_poll = 0.0  # loop time of the next poll, set when polling starts

    @property
    def terminal(self) -> bool:
        return self.latest is not None and self.latest.is_terminal

    @property
    def wanted(self) -> bool:
        """Whether anyone needs this task polled."""
        return not self.terminal and (self.interest > 0 or self.pinned)

    def is_news(self, task: Task) -> bool:
        """Whether ``task`` tells something newer than :attr:`latest`.

        Duplicates and stale updates (an older ``updated_at``, or an earlier stage
        at the same time) are not news; nothing is news after a terminal state.
        """
        known = self.latest
        if known is None:
            return True
        if known.is_terminal:
            return False
        if (
            known.updated_at is not None
            and task.updated_at is not None
            and task.updated_at != known.updated_at
        ):
            return task.updated_at > known.updated_at
        if task.status == known.status:
            return task.updated_at != known.updated_at or task.raw != known.raw
        return _stage(task.status) >= _stage(known.status)


class Tracker:
    """The registry of task states of one client, and the hub of their updates."""

    def __init__(self, transport: Transport, policy: PollPolicy) -> None:
        self.transport = transport
        self.policy = policy
        self._states: weakref.WeakValueDictionary[tuple[Endpoint, str], TaskState] = (
            weakref.WeakValueDictionary()
        )
        self._pollers: dict[Endpoint, Poller] = {}
        self._closed = False

    def state(
        self,
        endpoint: Endpoint,
        task_id: str,
        *,
        latest: Task | None = None,
        external_task_id: str | None = None,
    ) -> TaskState:
        """The one state for this task in this client, created on first use."""
        key = (endpoint, task_id)
        state = self._states.get(key)
        if state is None:
            state = TaskState(endpoint, task_id, latest=latest, external_task_id=external_task_id)
            self._states[key] = state
        elif latest is not None:
            self.publish(state, latest)
        return state

    def find(self, endpoint: Endpoint, task_id: str) -> TaskState | None:
        """The state of a task some handle of this client holds, if any."""
        return self._states.get((endpoint, task_id))

    def publish(self, state: TaskState, task: Task) -> bool:
        """Record ``task`` as news about ``state`` if it is newer; tell listeners.

        Returns whether it was news.
        """
        if not state.is_news(task):
            return False
        state.latest = task
        if state.external_task_id is None:
            state.external_task_id = task.external_task_id
        for listener in tuple(state.listeners):
            listener(task)
        if task.is_terminal:
            self._poller(state.endpoint).discard(state)
        return True

    def fail(self, state: TaskState, error: KlingError) -> None:
        """End the current waits on ``state`` with ``error`` (a poll that cannot succeed)."""
        for listener in tuple(state.listeners):
            listener(error)

    def listen(self, state: TaskState, listener: Listener) -> None:
        """Add a listener that needs the task polled until it is removed."""
        if self._closed:
            raise ClientClosedError("the client is closed; create a new Client")
        state.listeners.append(listener)
        state.interest += 1
        if state.wanted:
            self._poller(state.endpoint).add(state)

    def unlisten(self, state: TaskState, listener: Listener) -> None:
        """Remove a listener; polling stops when nobody needs the task any more."""
        state.listeners.remove(listener)
        state.interest -= 1
        if not state.wanted:
            self._poller(state.endpoint).discard(state)

    def _poller(self, endpoint: Endpoint) -> Poller:
        poller = self._pollers.get(endpoint)
        if poller is None:
            from ._polling import Poller

            poller = self._pollers[endpoint] = Poller(self, endpoint)
        return poller

    async def close(self) -> None:
        """Stop all polling and end every pending wait with :class:`ClientClosedError`."""
        if self._closed:
            return
        self._closed = True
        await asyncio.gather(*(poller.close() for poller in self._pollers.values()))
        closed = ClientClosedError(
            "the client was closed while waiting; the task keeps running on Kling's side, "
            "re-attach with client.images.attach(task_id) on an open client"
        )
        for state in list(self._states.values()):
            if not state.terminal:
                self.fail(state, closed)
