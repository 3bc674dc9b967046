"""The account's concurrency quota, shared by every process through Redis."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Final

import attrs
from redis.exceptions import RedisError

from kling_async._exceptions import ConcurrencyLimitError, KlingError, RateLimitError
from kling_async._limiter import (
    FIRST_CREATE_SPACING,
    MAX_COOLDOWN,
    MAX_CREATE_SPACING,
    MIN_COOLDOWN,
    UNKNOWN_CAPACITY_START,
    refuse_what_never_fits,
)

from . import _scripts
from ._account import stop_tasks, text

if TYPE_CHECKING:
    from ._account import RedisAccount

__all__ = ["RedisLimiter", "TaskUnits"]

logger = logging.getLogger("kling_async")

#: How often waiting creates ask again when no release was announced: the
#: safety net for a lost announcement (pub/sub is at most once).
DEFAULT_POLL_INTERVAL: Final = 0.5
#: Bounds of the pause between tries while Redis cannot be reached.
_RETRY_FIRST, _RETRY_MAX = 0.05, 2.0

_Op = list[Any]


@attrs.define(eq=False)
class _QueuedAcquire:
    """A create of this process waiting for its units in the shared queue."""

    id: str
    task: str
    units: int
    future: asyncio.Future[None]
    since: float


@attrs.define
class _Held:
    """Units this process holds for one task (or one create in flight)."""

    units: int
    running: bool = False


class RedisLimiter:
    """The account's n-weighted concurrency quota, shared by processes and hosts.

    It behaves as :class:`~kling_async.ConcurrencyLimiter` does, for the whole
    account rather than one process: a task holds ``n`` units from its create
    until it ends; on 1303 the limit drops to the units running tasks hold and
    new creates pause (at least ``min_cooldown``, jittered, doubling while
    1303s go on); successes grow the limit back (doubling while no ceiling is
    known, then one unit per turnover); 1302 spaces creates apart. Admission is
    first-fit in arrival order, and a create that waited ``fairness_window``
    is passed by nobody, in any process, so an ``n=9`` task is not starved by
    a stream of ``n=1`` tasks.

    Every decision is one Lua script (see ``_scripts.LIMITER``), so it is
    atomic. Units are held **per task** (its external_task_id: the create
    owner names it through :meth:`for_task`), under this process's fenced
    lease (:class:`RedisAccount`): a release is idempotent and only the task's
    holder's counts, so a process that was taken for dead (and whose task a
    survivor adopted) never frees units it no longer holds. A dead process's
    units stay counted until a survivor adopts its tasks or the account's
    ``orphan_ttl`` passes; a client that closes hands its running tasks over
    (:meth:`hand_over`) instead of freeing them. Pass it as
    ``Client(max_concurrency=...)``.

    Only :meth:`acquire` waits. ``release``, ``created``, ``observe`` and
    ``adopt`` queue their change and return; one background task applies the
    queue in order, with the next admission, in one round trip. A release is
    announced on a channel, so waiting creates in every process ask at once;
    they also ask every ``poll_interval`` seconds in case an announcement was
    lost. Should Redis be unreachable, creates wait (they are never let through
    unchecked) and queued changes are applied once it is back; a call whose
    answer was lost is retried under the same sequence number, and Redis
    answers it without applying it twice.
    """

    def __init__(
        self,
        account: RedisAccount,
        capacity: int | None,
        *,
        fairness_window: float = 2.0,
        min_cooldown: float = MIN_COOLDOWN,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        rng: random.Random | None = None,
    ) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.account = account
        self.capacity = capacity
        #: The account-wide limit in force, as last read from Redis.
        self.limit = capacity if capacity is not None else UNKNOWN_CAPACITY_START
        #: Units this process holds: by its running tasks and its creates in flight.
        self.in_use = 0
        #: Units this process holds for tasks Kling confirmed it created.
        self.running = 0
        #: Units held by every process of the account (orphans included), as last read.
        self.account_in_use = 0
        self.fairness_window = fairness_window
        self.min_cooldown = min_cooldown
        self.poll_interval = poll_interval
        self._rng = rng or random.Random()
        self._script = account.script(_scripts.LIMITER)
        self._keys = [
            account.key("limiter"),
            account.key("starving"),
            account.key("last"),
        ]
        self._channel = account.key("freed")
        self._ids = itertools.count()
        #: What this process holds in Redis, per task: re-asserted after a reset.
        self._held: dict[str, _Held] = {}
        #: Tasks of calls that named none (the plain Limiter protocol), by units.
        self._anonymous: dict[int, list[str]] = {}
        self._queue: deque[_QueuedAcquire] = deque()
        self._ops: list[_Op] = []
        self._queued = 0  # operations ever queued
        self._applied = 0  # operations applied in Redis
        self._flushes: list[tuple[int, asyncio.Future[None]]] = []
        self._seq = 0
        self._wake: asyncio.Event | None = None
        self._runner: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._closed = False
        #: This process's successful creates, and the account's 1303s as last read.
        self.creates = 0
        self.rejected_creates = 0
        #: Round trips to Redis, and the time they took (for benchmarks).
        self.calls = 0
        self.call_seconds = 0.0

    def __repr__(self) -> str:
        return (
            f"<RedisLimiter {self.account.name!r} {self.in_use} units here, "
            f"{self.account_in_use}/{self.limit} in the account (max {self.capacity}), "
            f"{len(self._queue)} waiting>"
        )

    @property
    def waiting(self) -> int:
        """Creates of this process queued for units."""
        return len(self._queue)

    # --- the Limiter protocol ---------------------------------------------------------

    def for_task(self, task: str) -> TaskUnits:
        """This limiter for the create and the task of external_task_id
        ``task``: every call names it, so its units are counted per task."""
        return TaskUnits(self, task)

    def _task(self, task: str | None, units: int, *, new: bool) -> str:
        """The task a call is for; a call that names none (the plain Limiter
        protocol) gets a name of its own, taken back by a release of as many units."""
        if task is not None:
            return task
        pool = self._anonymous.setdefault(units, [])
        if new or not pool:
            name = f"{self.account.member}#{next(self._ids)}"
            if new:
                pool.append(name)
            return name
        return pool[0]

    async def acquire(self, units: int, *, first: bool = False, task: str | None = None) -> None:
        """Wait until ``units`` may be held, then hold them (see the class docstring)."""
        if self._closed:
            raise RuntimeError("the limiter is closed")
        refuse_what_never_fits(self.capacity, units)
        # A client of another Kling account holds nothing in this namespace.
        with contextlib.suppress(RedisError):  # unreachable: checked by the next acquire
            await self.account.check()
        self._start()
        waiter = _QueuedAcquire(
            str(next(self._ids)),
            self._task(task, units, new=True),
            units,
            asyncio.get_running_loop().create_future(),
            time.monotonic(),
        )
        if first:
            self._queue.appendleft(waiter)
        else:
            self._queue.append(waiter)
        self._kick()
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                # Admitted just as the caller gave up: nothing was created.
                self.release(units, created=False, task=waiter.task)
            else:
                with contextlib.suppress(ValueError):
                    self._queue.remove(waiter)
                self._queue_op(["forget", waiter.id])
            raise

    def release(self, units: int, *, created: bool = True, task: str | None = None) -> None:
        """Give back units: the task ended, or (``created=False``) its create failed.
        Idempotent per task; Redis ignores it when another member holds the task."""
        name = self._task(task, units, new=False)
        held = self._held.get(name)
        if held is not None and held.running and not created:
            # Another try of a create whose task Kling confirmed (a second
            # create of the id, answered "already exists", found by lookup):
            # the units are the task's, counted once; it gives them back.
            return
        if task is None and name in self._anonymous.get(units, []):
            self._anonymous[units].remove(name)
        held = self._held.pop(name, None)
        if held is not None:
            self.in_use -= held.units
            if held.running:
                self.running -= held.units
        self._queue_op(["release", name, int(created)])

    def created(self, units: int, *, task: str | None = None) -> None:
        """A create of ``units`` succeeded: the limit may grow, the spacing relax."""
        name = self._task(task, units, new=False)
        self.creates += 1
        held = self._held.get(name)
        if held is not None and not held.running:
            held.running = True
            self.running += held.units
        self._queue_op(["created", name])

    def hand_over(self, units: int, *, task: str | None = None) -> None:
        """The client closes while Kling still runs the task: its units stay
        counted, held by nobody, until a survivor adopts it (or ``orphan_ttl``)."""
        name = self._task(task, units, new=False)
        held = self._held.pop(name, None)
        if held is not None:
            self.in_use -= held.units
            if held.running:
                self.running -= held.units
        self._queue_op(["hand_over", name])

    def observe(self, error: KlingError) -> None:
        """Learn from a failed create: 1303 shrinks the limit, 1302 slows creates."""
        if isinstance(error, ConcurrencyLimitError):
            logger.info("concurrency quota full (1303): the account's limit shrinks")
            self._queue_op(["1303", "", round(self._rng.uniform(1.0, 1.5) * 1000)])
        elif isinstance(error, RateLimitError):
            self._queue_op(["1302", ""])

    def adopt(self, units: int, *, task: str | None = None) -> None:
        """Count the units of a task already running on Kling that this process
        takes over (resumed after a restart, or a dead member's): held by a
        dead member or by nobody, they move here, counted once."""
        name = self._task(task, units, new=True)
        self._note_held(name, units, running=True)
        self._queue_op(["adopt", name, units])

    def hold(self, units: int, *, task: str) -> None:
        """Take over the units of a dead member's create that may have landed:
        they stay counted (moved here) until it is known not to exist. Redis
        moves only units the dead member held: a create it was still queued
        for was never sent, and waits for room again when it is sent."""
        self._note_held(task, units, running=False)
        self._queue_op(["hold", task, units])

    def _note_held(self, task: str, units: int, *, running: bool) -> None:
        held = self._held.get(task)
        if held is None:
            self._held[task] = _Held(units, running)
            self.in_use += units
            if running:
                self.running += units
        elif running and not held.running:
            held.running = True
            self.running += held.units

    # --- adoption of a dead member's tasks -----------------------------------------------

    def adopting(self, owner: str) -> RedisLimiter:
        """This limiter, for tasks taken over from the dead member ``owner``
        (kept for compatibility: units are counted per task, so taking a task
        over moves its units whoever held them)."""
        return self

    def adopt_from(self, owner: str, units: int, *, task: str | None = None) -> None:
        """Take over ``units`` of a running task of the dead member ``owner``."""
        self.adopt(units, task=task)

    def release_orphans(self, owner: str) -> None:
        """Every task of the dead member ``owner`` that may still run was taken
        over: what it still holds was for tasks that ended or creates that
        never landed."""
        self._queue_op(["release_orphans", owner])

    def drop(self, task: str) -> None:
        """Forget, here only, the units of ``task``: another member took it
        over while this one was taken for dead, and holds them now. Nothing is
        sent to Redis (a release would be another's units, and is ignored)."""
        held = self._held.pop(task, None)
        if held is not None:
            self.in_use -= held.units
            if held.running:
                self.running -= held.units

    def reassert(self) -> None:
        """Redis lost the account's state: write again what this process holds
        (called by the account when it notices the reset)."""
        for task, held in self._held.items():
            self._queue_op(["assert", task, held.units, int(held.running)])

    # --- the background task ---------------------------------------------------------------

    async def flush(self) -> None:
        """Return once every change queued so far is applied in Redis."""
        target = self._queued
        if self._applied >= target or self._runner is None:
            return
        future = asyncio.get_running_loop().create_future()
        self._flushes.append((target, future))
        self._kick()
        await future

    def _queue_op(self, op: _Op) -> None:
        if self._closed:
            logger.debug("limiter closed; %s not applied", op[0])
            return
        self._ops.append(op)
        self._queued += 1
        self._start()
        self._kick()

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _start(self) -> None:
        """Start the background tasks on first use, on the running loop."""
        if self._runner is not None or self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a sync call outside any loop: started by the next async one
            return
        self._wake = asyncio.Event()
        self._wake.set()
        self._runner = loop.create_task(self._run(), name=f"kling-limiter-{self.account.member}")
        self._listener = loop.create_task(
            self._listen(), name=f"kling-limiter-listen-{self.account.member}"
        )

    async def _run(self) -> None:
        assert self._wake is not None
        wake_in: float | None = None
        retry = _RETRY_FIRST
        pending: tuple[int, list[_Op], list[_QueuedAcquire]] | None = None
        while True:
            if pending is None:
                timeout = self.poll_interval if self._queue else None
                if wake_in is not None:
                    timeout = wake_in if timeout is None else min(timeout, wake_in)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                self._wake.clear()
                waiters = [waiter for waiter in self._queue if not waiter.future.done()]
                if not self._ops and not waiters:
                    self._settle_flushes()
                    if self._closed:
                        return
                    wake_in = None
                    continue
                self._seq += 1
                pending = (self._seq, list(self._ops), waiters)
            seq, ops, waiters = pending
            try:
                reply = await self._call(seq, ops, waiters)
            except (RedisError, asyncio.TimeoutError) as error:
                # Nothing was let through; the same call (same sequence number)
                # is tried again, and Redis applies it at most once.
                logger.warning("shared limiter: Redis unreachable (%s); retrying", error)
                await asyncio.sleep(retry)
                retry = min(_RETRY_MAX, retry * 2)
                continue
            retry = _RETRY_FIRST
            pending = None
            del self._ops[: len(ops)]
            self._applied += len(ops)
            wake_in = self._take(reply, waiters)
            self._settle_flushes()

    async def _call(self, seq: int, ops: list[_Op], waiters: list[_QueuedAcquire]) -> list[Any]:
        now = time.monotonic()
        args: list[str | int | float] = [
            round(self.fairness_window * 1000),
            "" if self.capacity is None else self.capacity,
            str(seq),
            json.dumps(ops, separators=(",", ":")),
            json.dumps(
                [[w.id, w.task, w.units, round((now - w.since) * 1000)] for w in waiters],
                separators=(",", ":"),
            ),
            round(self.min_cooldown * 1000),
            self._channel,
            round(MAX_COOLDOWN * 1000),
            round(MAX_CREATE_SPACING * 1000),
            round(FIRST_CREATE_SPACING * 1000),
            UNKNOWN_CAPACITY_START,
        ]
        started = time.perf_counter()
        # Bounded: a connection that hangs (Redis stopped) is tried again.
        reply = await asyncio.wait_for(
            self.account.call(self._script, self._keys, args), max(1.0, self.account.lease)
        )
        self.calls += 1
        self.call_seconds += time.perf_counter() - started
        return reply

    def _take(self, reply: list[Any], waiters: list[_QueuedAcquire]) -> float | None:
        """Admit what Redis admitted; return when to ask again by time alone."""
        limit, in_use, wake, _creates, rejected, _running, *admitted = reply
        self.limit = int(limit)
        self.account_in_use = int(in_use)
        self.rejected_creates = int(rejected)
        by_id = {waiter.id: waiter for waiter in waiters}
        for raw in admitted:
            waiter = by_id[text(raw)]
            self._note_held(waiter.task, waiter.units, running=False)
            with contextlib.suppress(ValueError):
                self._queue.remove(waiter)
            if waiter.future.done():  # its caller gave up meanwhile: nothing was sent
                self.release(waiter.units, created=False, task=waiter.task)
            else:
                waiter.future.set_result(None)
        wake_ms = int(wake)
        return None if wake_ms < 0 else wake_ms / 1000 + 0.001

    def _settle_flushes(self) -> None:
        still: list[tuple[int, asyncio.Future[None]]] = []
        for target, future in self._flushes:
            if self._applied >= target or self._closed:
                if not future.done():
                    future.set_result(None)
            else:
                still.append((target, future))
        self._flushes = still

    async def _listen(self) -> None:
        """Ask again as soon as any process announces a release."""
        retry = _RETRY_FIRST
        while True:
            pubsub = self.account.redis.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                retry = _RETRY_FIRST
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and self._queue:
                        self._kick()
            except RedisError as error:
                logger.debug("shared limiter: release announcements lost (%s)", error)
                await asyncio.sleep(retry)
                retry = min(_RETRY_MAX, retry * 2)
            finally:
                with contextlib.suppress(RedisError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def close(self, timeout: float | None = None) -> None:
        """Apply what is queued (for at most ``timeout`` seconds, default the
        account's ``close_timeout``), then stop; what could not be applied is
        logged. Creates still waiting fail with :class:`RuntimeError`. Idempotent."""
        if self._closed:
            return
        try:
            await asyncio.wait_for(
                self.flush(), self.account.close_timeout if timeout is None else timeout
            )
        except asyncio.TimeoutError:
            logger.warning(
                "shared limiter closed with %d changes not applied (Redis unreachable): %s",
                len(self._ops),
                self._ops,
            )
        self._closed = True
        for waiter in self._queue:
            if not waiter.future.done():
                waiter.future.set_exception(RuntimeError("the shared limiter was closed"))
        self._queue.clear()
        await stop_tasks(self._runner, self._listener)
        self._settle_flushes()


class TaskUnits:
    """A :class:`RedisLimiter` seen by one create and its task: every call
    names the task (its external_task_id), so Redis counts its units once,
    releases them once, and moves them when the task is taken over."""

    def __init__(self, limiter: RedisLimiter, task: str) -> None:
        self._limiter = limiter
        self.task = task
        self.capacity = limiter.capacity

    def __repr__(self) -> str:
        return f"<TaskUnits {self.task} of {self._limiter!r}>"

    async def acquire(self, units: int, *, first: bool = False) -> None:
        await self._limiter.acquire(units, first=first, task=self.task)

    def release(self, units: int, *, created: bool = True) -> None:
        self._limiter.release(units, created=created, task=self.task)

    def created(self, units: int) -> None:
        self._limiter.created(units, task=self.task)

    def observe(self, error: KlingError) -> None:
        self._limiter.observe(error)

    def adopt(self, units: int) -> None:
        self._limiter.adopt(units, task=self.task)

    def hand_over(self, units: int) -> None:
        self._limiter.hand_over(units, task=self.task)
