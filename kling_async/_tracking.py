"""What the client knows about each task, and who is told when that changes.

Every piece of news about a task (a create response, a poll, a callback) goes
through :meth:`Tracker.publish`, which keeps only news that is newer than what
is known and passes it to the task's listeners: waiters of ``await handle``,
``handle.updates()`` iterators, batch bookkeeping. Polling (``_polling``) only
runs for tasks somebody listens to or that hold concurrency units, so a handle
nobody awaits costs nothing.
"""

from __future__ import annotations

import asyncio
import copy
import enum
import logging
import time
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

import attrs

from ._config import PollPolicy
from ._durations import DurationLearner, Kind
from ._exceptions import (
    APIError,
    ClientClosedError,
    KlingError,
    TaskNotFoundError,
    means_task_unknown,
)
from ._models import Endpoint, Task, TaskRequest, TaskStatus
from ._polling import Poller, PollPlan
from ._schedule import Durations, Prior
from ._wire import get_request, parse_task

if TYPE_CHECKING:
    from ._transport import Transport


logger = logging.getLogger("kling_async")

Listener = Callable[[Task | KlingError], None]
"""Told every accepted update of a task, or an error that ends a wait on it."""

#: Consecutive "not found" (1203) answers for a task's id after which Kling is
#: taken at its word and the task settled as gone. More than one: a task an
#: instant old may not be visible yet (read-after-write lag), and settling a
#: running task as gone would lose its result; the second answer comes a poll
#: interval later.
NOT_FOUND_ANSWERS_TO_SETTLE = 2

# Within one updated_at, a later lifecycle stage wins: a duplicate "processing"
# must not overwrite a "succeed" stamped in the same millisecond.
_STAGE = {TaskStatus.SUBMITTED: 0, TaskStatus.PROCESSING: 1}


def _stage(status: TaskStatus) -> int:
    return 2 if status.is_terminal else _STAGE.get(status, 1)


#: Raw statuses a poll's answer may be kept unread with (see Tracker.keep_unread):
#: known, and not the end.
_QUIET_STATUSES = frozenset((TaskStatus.SUBMITTED.value, TaskStatus.PROCESSING.value))


#: Parts of a raw task that tasks in flight mostly carry alike (no result yet,
#: no watermark), by key: a version kept unread holds the one shared copy of
#: such a part instead of its own (a few hundred bytes a task, thousands in
#: flight), and gets its own copy back when read, so no ``Task.raw`` shares one.
_COMMON_PARTS: Final[dict[str, tuple[dict[str, Any], ...]]] = {
    "watermark_info": ({"enabled": False},),
    "task_result": ({"images": []}, {}),
}


def _share_common_parts(data: dict[str, Any]) -> None:
    """Put the shared copy of every common part in ``data`` in place of its own."""
    for key, commons in _COMMON_PARTS.items():
        part = data.get(key)
        if part is not None:
            for common in commons:
                if part == common:
                    data[key] = common
                    break


def _unshared(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """``data`` with a copy of its own of every shared common part in it."""
    shared = [
        key
        for key, commons in _COMMON_PARTS.items()
        if any(data.get(key) is common for common in commons)
    ]
    if not shared:
        return data
    return {**data, **{key: copy.deepcopy(data[key]) for key in shared}}


def _stamped_later(data: Mapping[str, Any], known: Mapping[str, Any]) -> bool:
    """Whether raw task ``data`` is stamped later than raw task ``known``."""
    new, old = data.get("updated_at"), known.get("updated_at")
    return type(new) is int and type(old) is int and new > old


def _supersedes(task: Task, unread: Mapping[str, Any]) -> bool:
    """Whether ``task``, an answer of Kling's API, is news next to the ``unread``
    version (by :func:`is_newer`'s rules, read from the raw stamps): then that
    version need never be structured."""
    new, old = task.raw.get("updated_at"), unread.get("updated_at")
    if type(new) is not int or type(old) is not int:
        return False
    return new > old or (new == old and task.is_terminal)


@attrs.define(eq=False)
class TaskState:
    """The client's knowledge of one task, shared by every handle on it.

    A mutable record with identity (one per task per client), slotted because
    thousands are held at once.
    """

    endpoint: Endpoint
    task_id: str
    #: What :attr:`latest` returns, once any :attr:`unread` version is read.
    _latest: Task | None = attrs.field(default=None, kw_only=True, repr=False)
    external_task_id: str | None = attrs.field(default=None, kw_only=True)
    listeners: list[Listener] = attrs.field(factory=list, init=False, repr=False)
    #: Waiters and iterators currently listening.
    interest: int = attrs.field(default=0, init=False, repr=False)
    #: Listeners (and ledgers) told every change, not only the end: while there
    #: are none, a poll's non-terminal change is kept :attr:`unread`.
    watchers: int = attrs.field(default=0, init=False, repr=False)
    #: A newer, non-terminal version of the task that a poll found while nobody
    #: wanted every change: Kling's raw task and the poller's reader that
    #: structures it (and counts it). Read when someone asks for :attr:`latest`,
    #: or dropped unread when a newer answer supersedes it: most tasks go from
    #: their create to their end without their ``processing`` ever being structured.
    unread: tuple[Mapping[str, Any], Callable[[Mapping[str, Any]], Task | None]] | None = (
        attrs.field(default=None, init=False, repr=False)
    )
    #: Run once when the task ends (with the terminal task) or turns out gone
    #: (with ``None``), e.g. to give back concurrency units. A task with such
    #: duties is polled until then even if nobody waits. Made on first use:
    #: most tasks never get one, and thousands are held.
    on_terminal: list[Callable[[Task | None], None]] | None = attrs.field(
        default=None, init=False, repr=False
    )
    #: Kling no longer knows the task (see :meth:`Tracker.forget`), or this
    #: client no longer follows it (:meth:`Tracker.relinquish`): an outcome.
    gone: KlingError | None = attrs.field(default=None, init=False, repr=False)
    #: Consecutive "not found" answers to polls of the task.
    misses: int = attrs.field(default=0, init=False, repr=False)
    #: Kling will POST this task's updates to the client's callback receiver.
    expects_callbacks: bool = attrs.field(default=False, init=False, repr=False)
    #: A callback for this task has arrived.
    heard: bool = attrs.field(default=False, init=False, repr=False)
    #: What changes its duration (see _durations.Kind); None when unknown, e.g.
    #: a task attached by id: then its endpoint's durations apply.
    kind: Kind | None = attrs.field(default=None, init=False, repr=False)
    first_seen: float = attrs.field(factory=time.monotonic, init=False, repr=False)
    #: The poller's schedule of the task (``_polling.PollPlan``): the poller's
    #: own slot, which nothing else reads or writes.
    poll_plan: PollPlan | None = attrs.field(default=None, init=False, repr=False)
    #: ``latest`` came from a callback, not from Kling's API.
    untrusted: bool = attrs.field(default=False, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.external_task_id is None and self._latest is not None:
            self.external_task_id = self._latest.external_task_id

    @property
    def latest(self) -> Task | None:
        """The newest version of the task the client knows (structured now if a
        poll left it :attr:`unread`)."""
        unread = self.unread
        if unread is not None:
            self.unread = None
            data, read = unread
            task = read(_unshared(data))
            if task is not None and is_newer(task, self._latest):
                self._latest = task
        return self._latest

    @latest.setter
    def latest(self, task: Task | None) -> None:
        self._latest, self.unread = task, None

    @property
    def seen(self) -> bool:
        """Whether any version of the task is known (without reading an unread one)."""
        return self._latest is not None or self.unread is not None

    def known_raw(self) -> Mapping[str, Any] | None:
        """Kling's raw task of the newest version known, read or not: what a poll's
        answer is compared with before anything is structured."""
        if self.unread is not None:
            return self.unread[0]
        return self._latest.raw if self._latest is not None else None

    @property
    def terminal(self) -> bool:
        """Nothing more will happen to the task: it ended, or Kling no longer knows it."""
        # An unread version is never terminal: what is read already says it all.
        return self.gone is not None or (self._latest is not None and self._latest.is_terminal)

    def when_terminal(self, duty: Callable[[Task | None], None]) -> None:
        """Run ``duty(task)`` once the task ends (``duty(None)`` if it turns out
        gone); keeps it polled until then."""
        if self.on_terminal is None:
            self.on_terminal = []
        self.on_terminal.append(duty)

    @property
    def wanted(self) -> bool:
        """Whether anyone needs this task polled."""
        return not self.terminal and (self.interest > 0 or bool(self.on_terminal))

    def is_news(self, task: Task, *, trusted: bool = True) -> bool:
        """Whether ``task`` tells something newer than :attr:`latest` (see
        :func:`is_newer`; ``trusted`` is False for what a callback said)."""
        return is_newer(task, self.latest, trusted=trusted, known_untrusted=self.untrusted)


def is_newer(
    task: Task, known: Task | None, *, trusted: bool = True, known_untrusted: bool = False
) -> bool:
    """Whether ``task`` is news next to ``known``.

    Duplicates and stale updates (an older ``updated_at``, or an earlier stage at
    the same time) are not news; nothing is news after a terminal state. An
    answer of Kling's API (``trusted``) showing a later stage always beats what a
    callback said (``known_untrusted``), whatever its stamp: a forged callback
    stamped in the future must not make every true update look stale.
    """
    if known is None:
        return True
    if known.is_terminal:
        return False
    if trusted and known_untrusted and _stage(task.status) != _stage(known.status):
        return _stage(task.status) > _stage(known.status)
    if (
        known.updated_at is not None
        and task.updated_at is not None
        and task.updated_at != known.updated_at
    ):
        return task.updated_at > known.updated_at
    if task.status == known.status:
        return task.updated_at != known.updated_at or task.raw != known.raw
    return _stage(task.status) >= _stage(known.status)


class CallbackOutcome(enum.Enum):
    """What became of a callback the receiver handed to a tracker."""

    ACCEPTED = "accepted"  # news, published (or being confirmed)
    IGNORED = "ignored"  # a duplicate or stale update
    MISMATCH = "mismatch"  # the payload names another task than the URL's
    UNKNOWN = "unknown"  # no handle of this client holds the task


class Tracker:
    """The registry of task states of one client, and the hub of their updates."""

    def __init__(
        self, transport: Transport, policy: PollPolicy, durations: DurationLearner | None = None
    ) -> None:
        self.transport = transport
        self.policy = policy
        self._states: weakref.WeakValueDictionary[tuple[Endpoint, str], TaskState] = (
            weakref.WeakValueDictionary()
        )
        self._by_external: weakref.WeakValueDictionary[str, TaskState] = (
            weakref.WeakValueDictionary()
        )
        # Creates in flight, and callbacks that overtook their create's response.
        self._creating: set[str] = set()
        self._early: dict[str, tuple[Task, bool]] = {}  # the task, and whether to confirm
        self._pollers: dict[Endpoint, Poller] = {}
        self._pollers_loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        #: How long this client's tasks took, for scheduling polls.
        self.durations = durations or DurationLearner()
        self._warned_silent_callbacks = False
        #: Told every accepted piece of news (the create's owner keeps a durable
        #: ledger current with it).
        self.on_news: Callable[[TaskState, Task], None] | None = None
        #: Told when a task turns out gone (the create's owner settles its entry).
        self.on_gone: Callable[[TaskState, TaskNotFoundError], None] | None = None

    @property
    def typical_duration(self) -> float | None:
        """The median duration of this client's recent tasks, in seconds."""
        return self.durations.typical

    def durations_for(self, state: TaskState) -> Durations | Prior:
        """What is known (or, before any ended, assumed) about how long tasks
        like ``state``'s take."""
        return self.durations.durations(state.endpoint, state.kind)

    def classify(self, state: TaskState, request: TaskRequest) -> None:
        """Note what ``state``'s task asked for, which its duration depends on."""
        if state.kind is None:
            state.kind = self.durations.kind(request)
            poller = self._current_pollers().get(state.endpoint)
            if poller is not None:
                poller.replan(state)

    def expect_callbacks(self, state: TaskState, expected: bool) -> None:
        """Note whether Kling will POST ``state``'s updates to this client's
        callback receiver (the create asked it to): its polls are then only a
        slow safety net."""
        state.expects_callbacks = expected

    def callbacks_silent(self, state: TaskState) -> None:
        """A poll found ``state``'s task changed long ago and not one callback
        came for it: say so, once per client, since until their tasks are
        overdue handles now wait for the safety-net polls."""
        if self._warned_silent_callbacks:
            return
        self._warned_silent_callbacks = True
        logger.warning(
            "task %s changed on Kling's side long ago and no callback has arrived for it: "
            "check that Kling can reach the CallbackReceiver's public_url. Tasks are polled "
            "instead, at most %.0f s apart until they are overdue (PollPolicy.callback_delay). "
            "This is logged once per client.",
            state.task_id,
            self.policy.callback_delay,
        )

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
            if state.external_task_id:
                self._by_external[state.external_task_id] = state
                early = self._early.pop(state.external_task_id, None)
                if early is not None and early[0].task_id == task_id:
                    self._take_callback(state, *early)
        elif latest is not None:
            self.publish(state, latest)
        return state

    async def fetch(self, endpoint: Endpoint, task_id: str) -> Task:
        """Ask Kling for a task once (one GET, by its task_id or its
        external_task_id), publishing nothing: the caller decides what the
        answer is worth (a refresh publishes it, a callback checks it)."""
        return parse_task(await self.transport.send(get_request(endpoint, task_id)))

    def find(self, endpoint: Endpoint, task_id: str) -> TaskState | None:
        """The state of a task some handle of this client holds, if any."""
        return self._states.get((endpoint, task_id))

    # --- news -------------------------------------------------------------------

    def publish(self, state: TaskState, task: Task, *, trusted: bool = True) -> bool:
        """Record ``task`` as news about ``state`` if it is newer; tell listeners.

        ``trusted`` is False for what a callback said, True for Kling's API.
        Returns whether it was news.
        """
        if state.unread is not None and trusted and _supersedes(task, state.unread[0]):
            state.unread = None  # never structured: nobody asked while it was the newest
        if state.gone is not None or not state.is_news(task, trusted=trusted):
            return False
        if trusted:
            state.misses = 0
        state.latest = task
        state.untrusted = not trusted
        if state.external_task_id is None and task.external_task_id:
            state.external_task_id = task.external_task_id
            self._by_external[task.external_task_id] = state
        for listener in tuple(state.listeners):
            listener(task)
        if self.on_news is not None:
            try:
                self.on_news(state, task)
            except Exception:  # a ledger's failure must not keep news from the waits
                logger.exception("recording task %s in the ledger failed", state.task_id)
        if task.is_terminal:
            self._finished(state, task)
        return True

    def keep_unread(
        self,
        state: TaskState,
        data: Any,
        read: Callable[[Mapping[str, Any]], Task | None],
    ) -> bool:
        """Take what a poll said about ``state`` (``data``, Kling's raw task, a
        change from what is known) without structuring it, if nobody needs it now:
        a non-terminal status while no listener wants every change. ``read``
        structures it should anyone ask (:attr:`TaskState.latest`). Returns False
        when the news must be structured and published now."""
        if (
            state.watchers
            or state.untrusted
            or state.gone is not None
            or type(data) is not dict
            or data.get("task_status") not in _QUIET_STATUSES
        ):
            return False
        known = state.known_raw()  # None: an attached task's first answer dates it
        if known is None or not _stamped_later(data, known):
            return False  # not plainly newer: weighed as any news is
        state.misses = 0
        # The one shared string instead of the page's own copy, as a structured
        # task holds (thousands of tasks in flight each keep their raw dict).
        data["task_status"] = TaskStatus(data["task_status"]).value
        _share_common_parts(data)
        # The version it replaces goes: one version of each task is held, read or not.
        state._latest, state.unread = None, (data, read)
        return True

    def publish_polled(self, state: TaskState, task: Task) -> bool:
        """:meth:`publish` what a poll of Kling's API said about ``state``."""
        if not state.seen and task.created_at is not None:
            # Attached by id: its age counts from when Kling created it, not
            # from when this client first heard of it.
            running = max(0.0, time.time() - task.created_at.timestamp())
            state.first_seen = time.monotonic() - running
        return self.publish(state, task)

    def _finished(self, state: TaskState, task: Task) -> None:
        self._poller(state.endpoint).discard(state)
        # Kling's own timestamps give the true lifetime, also for a task this
        # client only attached to; the local clock is the fallback.
        if task.created_at is not None and task.updated_at is not None:
            duration = (task.updated_at - task.created_at).total_seconds()
        else:
            duration = time.monotonic() - state.first_seen
        if self.durations.observe(state.endpoint, state.kind, duration):
            # The first ends of a batch reshape what is known: tasks planned on
            # the schedule for no history would otherwise be polled late.
            self._poller(state.endpoint).replan_all()
        duties, state.on_terminal = state.on_terminal or (), None
        for duty in duties:
            duty(task)

    def fail(self, state: TaskState, error: KlingError) -> None:
        """A poll of ``state`` failed for good with ``error``: end the current
        waits with it. Kling saying it has no such task (1203) is not a failure
        but news: after NOT_FOUND_ANSWERS_TO_SETTLE of them in a row the task is
        settled as gone (:meth:`forget`); until then it stays polled."""
        if means_task_unknown(error) and not isinstance(error, TaskNotFoundError):
            state.misses += 1
            if state.misses < NOT_FOUND_ANSWERS_TO_SETTLE:
                logger.info(
                    "task %s: Kling answered not found (%s); asking again before settling it",
                    state.task_id,
                    error,
                )
                return
            assert isinstance(error, APIError)
            self.forget(
                state, TaskNotFoundError.from_answer(error, state.task_id, state.external_task_id)
            )
            return
        for listener in tuple(state.listeners):
            listener(error)

    def by_external(self, external_task_id: str) -> TaskState | None:
        """The state of the task of ``external_task_id`` some handle holds, if any."""
        return self._by_external.get(external_task_id)

    def relinquish(self, state: TaskState, error: KlingError) -> None:
        """Stop following ``state`` in this client: another owner follows it now
        (a shared ledger's survivor took it over while this process was taken
        for dead). Its waits end with ``error``, polling stops, its duties run;
        nothing is recorded (the create's owner dropped what it held first)."""
        if state.terminal:
            return
        state.gone = error
        self._poller(state.endpoint).discard(state)
        # Unregistered: attaching to the task again (client.images.attach)
        # follows it afresh, not this ended state.
        if self._states.get((state.endpoint, state.task_id)) is state:
            del self._states[(state.endpoint, state.task_id)]
        if state.external_task_id and self._by_external.get(state.external_task_id) is state:
            del self._by_external[state.external_task_id]
        for listener in tuple(state.listeners):
            listener(error)
        duties, state.on_terminal = state.on_terminal or (), None
        for duty in duties:
            duty(None)

    def forget(self, state: TaskState, error: TaskNotFoundError) -> None:
        """Settle ``state`` as gone: Kling does not know the task. Its waits end
        with ``error``, polling stops, its duties run (units are given back) and
        the create's owner settles its ledger entry. Once: a task that ended or
        is gone already is left as it is."""
        if state.terminal:
            return
        state.gone = error
        self._poller(state.endpoint).discard(state)
        logger.warning("%s", error)
        for listener in tuple(state.listeners):
            listener(error)
        if self.on_gone is not None:
            try:
                self.on_gone(state, error)
            except Exception:  # a ledger's failure must not keep the units held
                logger.exception("recording task %s as gone failed", state.task_id)
        duties, state.on_terminal = state.on_terminal or (), None
        for duty in duties:
            duty(None)

    # --- callbacks --------------------------------------------------------------

    def creating(self, external_task_id: str) -> None:
        """Note a create in flight, so a callback that beats its response is kept."""
        self._creating.add(external_task_id)

    def created(self, external_task_id: str) -> None:
        """The create of ``external_task_id`` returned (or failed for good)."""
        self._creating.discard(external_task_id)
        self._early.pop(external_task_id, None)

    def receive_callback(
        self, external_task_id: str, task: Task, *, confirm: bool
    ) -> CallbackOutcome:
        """Take a callback for the task Kling knows by ``external_task_id``.

        A terminal callback is only believed once a poll of the task confirms it
        (when ``confirm``): the URL is the callback's only credential, and a
        leaked one must not be able to fake a result.
        """
        state = self._by_external.get(external_task_id)
        if state is None:
            if external_task_id in self._creating:
                kept = self._early.get(external_task_id)
                if kept is None or is_newer(task, kept[0], trusted=False):
                    self._early[external_task_id] = (task, confirm)
                return CallbackOutcome.ACCEPTED
            return CallbackOutcome.UNKNOWN
        if task.task_id != state.task_id:
            return CallbackOutcome.MISMATCH
        if not state.is_news(task, trusted=False):
            return CallbackOutcome.IGNORED
        self._take_callback(state, task, confirm)
        return CallbackOutcome.ACCEPTED

    def _take_callback(self, state: TaskState, task: Task, confirm: bool) -> None:
        state.heard = True
        if task.is_terminal and confirm:
            # The confirmation is a poll, due now: with many tasks in flight one
            # list page confirms many callbacks at once. If it disagrees, the
            # task goes back to the normal cadence: its callbacks are suspect.
            state.expects_callbacks = False
            self._poller(state.endpoint).hurry(state)
        else:
            self.publish(state, task, trusted=False)

    # --- interest ---------------------------------------------------------------

    def listen(self, state: TaskState, listener: Listener, *, every_change: bool = True) -> None:
        """Add a listener that needs the task polled until it is removed.

        ``every_change=False`` says it only acts on the end (or an error), so
        intermediate changes need not be structured for it.
        """
        if self._closed:
            raise ClientClosedError("the client is closed; create a new Client")
        state.listeners.append(listener)
        state.interest += 1
        state.watchers += every_change
        self.keep_polled(state)

    def unlisten(self, state: TaskState, listener: Listener, *, every_change: bool = True) -> None:
        """Remove a listener (added with the same ``every_change``); polling stops
        when nobody needs the task any more."""
        state.listeners.remove(listener)
        state.interest -= 1
        state.watchers -= every_change
        if not state.wanted:
            self._poller(state.endpoint).discard(state)

    def follow(self, state: TaskState) -> None:
        """Tell :attr:`on_news` every change of ``state``'s task from now on, not
        only its end (a durable ledger keeps its entry current with each status)."""
        state.watchers += 1

    def keep_polled(self, state: TaskState) -> None:
        """Make sure a wanted task is on its endpoint's poller."""
        if state.wanted and not self._closed:
            self._poller(state.endpoint).add(state)

    def _current_pollers(self) -> dict[Endpoint, Poller]:
        """The pollers of the running loop: those of a loop that ended (a client
        used again by a second ``asyncio.run()``) are dead, and are dropped."""
        loop = asyncio.get_running_loop()
        if self._pollers_loop is not loop:
            self._pollers, self._pollers_loop = {}, loop
        return self._pollers

    def _poller(self, endpoint: Endpoint) -> Poller:
        poller = self._current_pollers().get(endpoint)
        if poller is None:
            poller = self._pollers[endpoint] = Poller(self, endpoint)
        return poller

    async def close(self) -> None:
        """Stop all polling and end every pending wait with :class:`ClientClosedError`."""
        if self._closed:
            return
        self._closed = True
        self.durations.save()  # for the next run's first round
        await asyncio.gather(
            *(poller.close() for poller in self._current_pollers().values()),
            return_exceptions=True,
        )
        closed = ClientClosedError(
            "the client was closed while waiting; the task keeps running on Kling's side, "
            "re-attach with client.images.attach(task_id) on an open client"
        )
        for state in list(self._states.values()):
            if not state.terminal:
                self.fail(state, closed)
