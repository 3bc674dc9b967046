"""The account's limits as the fake enforces them: the n-weighted concurrency quota
(1303) and the request rate limit (1302)."""

from __future__ import annotations

import time
from collections.abc import Callable

import attrs

from ._http import Reply, error
from ._options import RateLimit


@attrs.define(eq=False)
class UnitQuota:
    """Units of the concurrency quota held by live tasks: a task holds ``n`` units
    from its create until it ends. ``limit`` ``None`` refuses nothing but still
    counts, for :meth:`utilisation` and the stats.

    ``clock`` is monotonic seconds; the time-integral of the units in use is kept
    as they change, so :meth:`utilisation` costs nothing however many tasks ran.
    """

    limit: int | None
    clock: Callable[[], float] = time.monotonic
    in_use: int = attrs.field(default=0, init=False)
    peak: int = attrs.field(default=0, init=False)
    rejected: int = attrs.field(default=0, init=False)
    _unit_seconds: float = attrs.field(default=0.0, init=False)
    _since: float = attrs.field(default=0.0, init=False)
    _first: float | None = attrs.field(default=None, init=False)
    _idle_since: float | None = attrs.field(default=None, init=False)

    def refusal(self, n: int) -> Reply | None:
        """The 1303 to answer a create of ``n`` units over the limit, else ``None``."""
        limit = self.limit
        if limit is None or self.in_use + n <= limit:
            return None
        self.rejected += 1
        return error(
            1303,
            f"parallel tasks over the resource pack limit: {self.in_use} of {limit} "
            f"units in use, this task needs {n}",
        )

    def change(self, delta: int) -> None:
        """Take (``delta`` > 0) or give back units."""
        now = self.clock()
        if self._first is None:
            self._first = self._since = now
        self._unit_seconds += self.in_use * (now - self._since)
        self._since = now
        self.in_use += delta
        self.peak = max(self.peak, self.in_use)
        if self.in_use == 0:
            self._idle_since = now

    def utilisation(self, limit: int | None = None) -> float:
        """See :meth:`FakeKlingServer.utilisation`."""
        limit = limit if limit is not None else self.limit
        if limit is None:
            raise ValueError("utilisation needs a limit: pass one or set concurrency_limit")
        if self._first is None:
            return 0.0
        if self.in_use > 0 or self._idle_since is None:
            end = self.clock()
            integral = self._unit_seconds + self.in_use * (end - self._since)
        else:
            # Idle: the figure stops at the last task's end instead of decaying.
            end = self._idle_since
            integral = self._unit_seconds
        elapsed = end - self._first
        return integral / (limit * elapsed) if elapsed > 0 else 0.0


@attrs.define(eq=False)
class TokenBucket:
    """The rate limit over every ``/v1`` request: bursts of up to ``limit.requests``,
    refilled at ``limit.requests / limit.per`` tokens a second (``clock`` is
    monotonic seconds). ``refused`` counts the requests it turned away."""

    limit: RateLimit
    clock: Callable[[], float] = time.monotonic
    refused: int = attrs.field(default=0, init=False)
    _tokens: float = attrs.field(
        init=False, default=attrs.Factory(lambda self: float(self.limit.requests), takes_self=True)
    )
    _last: float = attrs.field(
        init=False, default=attrs.Factory(lambda self: self.clock(), takes_self=True)
    )

    def take(self) -> bool:
        """Spend a token if one is left."""
        now = self.clock()
        capacity, refill = float(self.limit.requests), self.limit.requests / self.limit.per
        self._tokens = min(capacity, self._tokens + (now - self._last) * refill)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def refusal(self) -> Reply | None:
        """The 1302 to answer when no token is left, else ``None`` (a token spent)."""
        if self.take():
            return None
        self.refused += 1
        return error(
            1302, "requests are too frequent (rate limit)", retry_after=self.limit.retry_after
        )
