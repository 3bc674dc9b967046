"""The account's concurrency quota, kept full without tripping it.

Kling counts concurrency in units: an image task holds ``n`` of them from the
moment it is created until it ends, and a create that would exceed the
account's quota answers 1303. The quota is shared by every key and process of
the account, so the client cannot know how much of it is free; it can only
learn. :class:`ConcurrencyLimiter` holds units for each create until the task
ends, and adapts:

- on 1303 it takes the units this client holds as the limit for now, and pauses
  new creates (at least a second, jittered, doubling while 1303s continue);
- on a run of successes it grows the limit again: doubling while no ceiling is
  known ("slow start"), then one unit per full turnover, never past the
  configured maximum;
- on 1302 (too many requests) it spaces creates apart, and relaxes on success.

These decisions are the pure functions of :mod:`kling_async._quota_rules`, the
same the shared limiter's Lua script mirrors (``contrib.redis``): one set of
quota rules for one process and for many.

Admission is first-fit in arrival order: a small task may pass a large one that
does not fit yet, but only until the large one has waited the fairness window
(by default five typical task lifetimes, learned); from then on nobody passes
it, so an ``n=9`` task cannot be starved by a stream of ``n=1`` tasks.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import attrs

from . import _quota_rules as rules
from ._exceptions import ConcurrencyLimitError, KlingError, RateLimitError

__all__ = ["ConcurrencyLimiter", "Limiter"]

logger = logging.getLogger("kling_async")

#: Where a limiter that knows no ceiling starts: a few tasks, then slow start.
UNKNOWN_CAPACITY_START = 8
MIN_COOLDOWN = 1.0
MAX_COOLDOWN = 30.0
MAX_CREATE_SPACING = 2.0
FIRST_CREATE_SPACING = 0.05
#: The learned fairness window, in typical hold times: long enough that a large
#: task rarely blocks the queue while units trickle back (each block leaves
#: units idle), short enough that it is never starved.
FAIRNESS_HOLDS = 5.0
#: Bounds of the learned fairness window (seconds a large task may be overtaken).
MIN_FAIRNESS_WINDOW = 2.0
MAX_FAIRNESS_WINDOW = 120.0
#: Time constant of the estimate of how fast units come back.
TURNOVER_WINDOW = 30.0


@runtime_checkable
class Limiter(Protocol):
    """What the create owner needs of a limiter of the account's quota.

    :class:`ConcurrencyLimiter` keeps it in one process;
    ``kling_async.contrib.redis.RedisLimiter`` shares it between processes and
    hosts. Either can be passed as ``Client(max_concurrency=...)``. ``acquire``
    is the only wait; the rest never block (a shared limiter queues them and
    applies them in order), so they can be called from callbacks.
    """

    #: The most units to hold at once, or ``None`` when unknown (learned from 1303).
    capacity: int | None

    async def acquire(self, units: int, *, first: bool = False) -> None:
        """Wait until ``units`` may be held, then hold them (``first``: at the
        head of the queue, for a create Kling refused with 1303)."""

    def release(self, units: int, *, created: bool = True) -> None:
        """Give back units: the task ended, or (``created=False``) its create failed."""

    def created(self, units: int) -> None:
        """A create of ``units`` succeeded."""

    def observe(self, error: KlingError) -> None:
        """Learn from a failed create (1303, 1302)."""

    def adopt(self, units: int) -> None:
        """Count the units of a task already running on Kling that is taken over."""


@attrs.define(eq=False)
class _QueuedAcquire:
    """A create waiting in the queue for its units: resolved when admitted."""

    units: int
    future: asyncio.Future[None]
    since: float


def refuse_what_never_fits(capacity: int | None, units: int) -> None:
    """A task of more units than a known quota could never start: waiting for
    it would hang (every limiter checks this before queueing)."""
    if capacity is not None and units > capacity:
        raise ValueError(f"a task of {units} units can never fit a quota of {capacity} units")


class ConcurrencyLimiter:
    """Units of the account's concurrency quota held by a client's tasks.

    ``capacity`` is the most units to hold at once (``Client(max_concurrency=...)``);
    ``None`` means unknown: start small and learn it from 1303 answers. Pass one
    instance as ``max_concurrency`` to several clients to share one quota.
    ``fairness_window`` is how long a task may be overtaken by smaller ones:
    by default five times as long as this client's tasks hold their units
    (learned from how fast units come back; at least 2 s, at most 2 minutes),
    since a large task that blocks the queue sooner leaves units idle until
    enough of them are free; a number fixes it. ``min_cooldown`` is the first pause after
    a 1303 (Kling advises at least 1 s).
    """

    def __init__(
        self,
        capacity: int | None,
        *,
        fairness_window: float | None = None,
        min_cooldown: float = MIN_COOLDOWN,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.capacity = capacity
        #: Units held: by running tasks and by creates still waiting for an answer.
        self.in_use = 0
        #: Units held by tasks Kling confirmed it created.
        self.running = 0
        self.fairness_window = fairness_window
        self.min_cooldown = min_cooldown
        self._params = rules.QuotaParams(
            capacity=capacity,
            unknown_start=UNKNOWN_CAPACITY_START,
            min_cooldown_ms=round(min_cooldown * 1000),
            max_cooldown_ms=round(MAX_COOLDOWN * 1000),
            first_spacing_ms=round(FIRST_CREATE_SPACING * 1000),
            max_spacing_ms=round(MAX_CREATE_SPACING * 1000),
        )
        #: The quota's learning state: limit, pause, spacing (times in ms of ``clock``).
        self._state = rules.initial(self._params)
        self._rng = rng or random.Random()
        self._clock = clock
        self._queue: deque[_QueuedAcquire] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        # Units given back by ended tasks, decaying over TURNOVER_WINDOW: with
        # the units running, how long a task typically holds them (Little's law).
        self._turnover = 0.0
        self._turnover_at = 0.0
        self._turnover_since: float | None = None  # the first task's end

    def __repr__(self) -> str:
        return (
            f"<ConcurrencyLimiter {self.in_use}/{self.limit} units"
            f" (max {self.capacity}), {len(self._queue)} waiting>"
        )

    @property
    def waiting(self) -> int:
        """Creates queued for units."""
        return len(self._queue)

    @property
    def limit(self) -> int:
        """The limit in force now; it shrinks on 1303 and grows back on success."""
        return self._state.limit

    @property
    def creates(self) -> int:
        """Successful creates (for reports and benchmarks)."""
        return self._state.creates

    @property
    def rejected_creates(self) -> int:
        """Creates Kling refused with 1303 (for reports and benchmarks)."""
        return self._state.rejected

    @property
    def _resume_at(self) -> float:
        """No admissions before this (the clock's seconds), after a 1303."""
        return self._state.resume_at / 1000

    @property
    def _spacing(self) -> float:
        """Least seconds between two creates, after 1302s."""
        return self._state.spacing / 1000

    def _now_ms(self) -> float:
        return self._clock() * 1000

    async def acquire(self, units: int, *, first: bool = False) -> None:
        """Wait until ``units`` may be held, then hold them.

        ``first`` puts the caller at the head of the queue: a create that Kling
        refused with 1303 keeps its place.
        """
        refuse_what_never_fits(self.capacity, units)
        loop = asyncio.get_running_loop()
        waiter = _QueuedAcquire(units, loop.create_future(), self._clock())
        if first:
            self._queue.appendleft(waiter)
        else:
            self._queue.append(waiter)
        self._admit()
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                # Admitted just as the caller gave up: nothing was created.
                self.release(units, created=False)
            else:
                self._queue.remove(waiter)
                self._admit()
            raise

    def adopt(self, units: int) -> None:
        """Count the units of a task already running on Kling that this client
        takes over (resumed after a restart, or adopted from a dead process)."""
        self.in_use += units
        self.running += units

    def release(self, units: int, *, created: bool = True) -> None:
        """Give back units: the task ended, or (``created=False``) its create failed."""
        self.in_use -= units
        if created:
            self.running -= units
            now = self._clock()
            if self._turnover_since is None:
                self._turnover_since = now
            decay = math.exp(-(now - self._turnover_at) / TURNOVER_WINDOW)
            self._turnover = self._turnover * decay + units
            self._turnover_at = now
        self._admit()

    @property
    def overtaking_window(self) -> float:
        """How long, now, a waiting task may be overtaken by smaller ones: the
        ``fairness_window`` given, else the typical time units are held."""
        if self.fairness_window is not None:
            return self.fairness_window
        since = self._turnover_since
        if since is None or self.running <= 0:
            return MIN_FAIRNESS_WINDOW
        now = self._clock()
        # Units given back per second lately: the decayed count over what a
        # steady rate would have added up to since the first end (so a short
        # history does not make ends look rare).
        elapsed = max(1.0, now - since)
        weight = TURNOVER_WINDOW * -math.expm1(-elapsed / TURNOVER_WINDOW)
        rate = self._turnover * math.exp(-(now - self._turnover_at) / TURNOVER_WINDOW) / weight
        if rate <= 0:
            return MIN_FAIRNESS_WINDOW
        held = self.running / rate
        return min(MAX_FAIRNESS_WINDOW, max(MIN_FAIRNESS_WINDOW, FAIRNESS_HOLDS * held))

    # --- what Kling said --------------------------------------------------------

    def created(self, units: int) -> None:
        """A create of ``units`` succeeded: the limit may grow, the spacing relax."""
        self.running += units
        self._state = rules.created(self._state, self._params)
        self._admit()

    def observe(self, error: KlingError) -> None:
        """Learn from a failed create: 1303 shrinks the limit, 1302 slows creates."""
        if isinstance(error, ConcurrencyLimitError):
            # The quota is full with what our running tasks hold (plus whatever
            # other processes of the account hold): that is all we may count on.
            self._state = rules.rejected(
                self._state,
                self._params,
                now=self._now_ms(),
                running_units=self.running,
                jitter=round(self._rng.uniform(1.0, 1.5) * 1000),
            )
            logger.info("concurrency quota full (1303): limit now %d units", self.limit)
        elif isinstance(error, RateLimitError):
            self._state = rules.rate_limited(self._state, self._params)

    # --- admission --------------------------------------------------------------

    def _admit(self) -> None:
        now = self._clock()
        now_ms = now * 1000
        if rules.paused(self._state, now_ms):
            self._wake_at(self._resume_at)
            return
        for waiter in tuple(self._queue):
            if waiter.future.done():  # cancelled; acquire() removes it
                continue
            if rules.fits(self._state, in_use=self.in_use, units=waiter.units):
                if rules.spaced(self._state, now_ms):
                    self._wake_at(self._state.next_create / 1000)
                    return
                self._queue.remove(waiter)
                self.in_use += waiter.units
                self._state = rules.admit(self._state, now_ms)
                waiter.future.set_result(None)
                continue
            if now - waiter.since >= self.overtaking_window:
                return  # it has waited long enough: nobody passes it now

    def _wake_at(self, when: float) -> None:
        loop = asyncio.get_running_loop()
        if self._timer is not None:
            if self._timer_loop is loop:
                return
            # Set on a loop that has ended (a second asyncio.run()): it never fires.
            self._timer.cancel()

        def wake() -> None:
            self._timer = None
            self._admit()

        # A microsecond late: ``when`` comes from milliseconds (the quota rules'
        # unit), and a wake a hair early would find the pause not over yet.
        self._timer = loop.call_later(max(0.0, when - self._clock()) + 1e-6, wake)
        self._timer_loop = loop
