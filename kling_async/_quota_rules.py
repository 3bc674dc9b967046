"""The account's quota rules, as pure functions over a frozen state.

What a success, a 1303 (concurrency quota full) and a 1302 (rate limited) do
to the adaptive limit, its pause and the spacing of creates. Both limiters
decide by them: :class:`~kling_async.ConcurrencyLimiter` calls them in one
process; the Lua script ``contrib.redis._scripts.LIMITER`` applies the same
rules inside Redis (it must: the decision is atomic there), and
``tests/scaleout/test_quota_rules.py`` feeds the same event sequences through
all three and asserts they agree, so they cannot drift apart. Times are
milliseconds (Redis's clock in the script, the limiter's clock in a process).
"""

from __future__ import annotations

import math

import attrs


@attrs.frozen(kw_only=True)
class QuotaParams:
    """The limiter's settings, the same in every member."""

    capacity: int | None
    """The account's quota in units, or ``None`` to learn it from 1303."""
    unknown_start: int
    min_cooldown_ms: int
    max_cooldown_ms: int
    first_spacing_ms: int
    max_spacing_ms: int


@attrs.frozen(kw_only=True)
class QuotaState:
    """The account's learning state (the ``limiter`` hash in Redis)."""

    limit: int
    ceiling_known: bool = False
    successes: int = 0
    rejections: int = 0
    #: No admissions before this (ms): the pause after a 1303.
    resume_at: float = 0
    #: The least time between two creates (ms), after 1302s.
    spacing: float = 0
    #: No create before this (ms): the last one admitted plus the spacing.
    next_create: float = 0
    creates: int = 0
    rejected: int = 0


def initial(params: QuotaParams, stored: QuotaState | None = None) -> QuotaState:
    """The state a call starts from: what Redis stored (if anything), with a
    known capacity as the ceiling."""
    state = stored or QuotaState(limit=params.capacity or params.unknown_start)
    if params.capacity is not None:
        return attrs.evolve(state, ceiling_known=True, limit=min(state.limit, params.capacity))
    return state


def grow(state: QuotaState, params: QuotaParams) -> QuotaState:
    """Successes while the limit was in use: double it while no ceiling is
    known, then one unit at a time, never above the capacity."""
    ceiling = params.capacity if params.capacity is not None else math.inf
    if state.limit >= ceiling:
        return state
    grown = state.limit + 1 if state.ceiling_known else state.limit * 2
    return attrs.evolve(state, limit=int(min(ceiling, grown)))


def created(state: QuotaState, params: QuotaParams) -> QuotaState:
    """A create succeeded: rejections reset; a turnover of the limit grows it;
    the spacing of creates relaxes (halves, then goes)."""
    successes = state.successes + 1
    state = attrs.evolve(state, creates=state.creates + 1, rejections=0, successes=successes)
    if successes >= max(1, state.limit):
        state = grow(attrs.evolve(state, successes=0), params)
    if state.spacing > 0:
        spacing = 0 if state.spacing <= params.first_spacing_ms else state.spacing / 2
        state = attrs.evolve(state, spacing=spacing)
    return state


def rejected(
    state: QuotaState, params: QuotaParams, *, now: float, running_units: int, jitter: int
) -> QuotaState:
    """A 1303: the quota is full with what running tasks hold (orphans
    included), so that is the limit now; creates pause. Creates already in
    flight when the first 1303 came are one wave: only a 1303 to a create sent
    after the pause lengthens the next one. ``jitter`` is per mille (1000-1500)."""
    state = attrs.evolve(
        state,
        rejected=state.rejected + 1,
        successes=0,
        ceiling_known=True,
        limit=max(1, running_units),
    )
    if now >= state.resume_at:
        rejections = state.rejections + 1
        cooldown = min(
            params.max_cooldown_ms, params.min_cooldown_ms * 2 ** min(rejections - 1, 16)
        )
        resume_at = max(state.resume_at, now + math.floor(cooldown * jitter / 1000))
        state = attrs.evolve(state, rejections=rejections, resume_at=resume_at)
    return state


def rate_limited(state: QuotaState, params: QuotaParams) -> QuotaState:
    """A 1302: creates are spaced apart, twice as far each time, within bounds."""
    spacing = min(params.max_spacing_ms, max(params.first_spacing_ms, state.spacing * 2))
    return attrs.evolve(state, spacing=spacing)


# --- admission ---------------------------------------------------------------------------


def paused(state: QuotaState, now: float) -> bool:
    """Whether creates pause now (after a 1303): nobody is admitted."""
    return now < state.resume_at


def fits(state: QuotaState, *, in_use: int, units: int) -> bool:
    """Whether a create of ``units`` may start with ``in_use`` units held: it
    fits the limit, or it is larger than the whole limit and goes alone (or it
    would never go)."""
    return in_use + units <= state.limit or (in_use == 0 and units > state.limit)


def spaced(state: QuotaState, now: float) -> bool:
    """Whether a create that fits must wait: too soon after the one before (1302s)."""
    return now < state.next_create


def admit(state: QuotaState, now: float) -> QuotaState:
    """A create was admitted now: the next one waits the spacing."""
    return attrs.evolve(state, next_create=now + state.spacing)
