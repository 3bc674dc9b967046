"""When to poll a task next: a pure function of its age, what the client has
learned about how long such tasks take, and the :class:`PollPolicy`.

No clock, no I/O, no randomness of its own (the caller passes the jitter draw),
so every decision is table-tested without a server.

The learned distribution is a piecewise-linear CDF of task durations
(:class:`Durations`). From it the schedule asks, at a task's age ``a``: by
which age ``t`` would the task have ended with probability ``chance``, given
that it is still running at ``a``? That is ``t = Q(F(a) + chance * (1 - F(a)))``.
The consequences are the three phases the schedule is after:

- while the task surely runs (``F(a) = 0``) the next poll is the
  ``chance``-quantile itself: no request before the first tasks of its kind
  have been seen to end;
- through the window where such tasks end, polls come where the probability
  mass is (dense where many end, sparser in the thin tails), never closer than
  a floor relative to the typical duration;
- past everything seen so far the task is overdue: gaps grow with how overdue
  it is, as the cold schedule's gaps grow with age.

A poll that refreshes many tasks at once (one list page) is cheap per task, so
it may be more frequent: ``chance`` shrinks with the number of tasks a request
serves, down to ``PollPolicy.sweep_chance``.

With nothing learned yet the schedule is the one the SDK always had
(``PollPolicy.initial_delay`` growing to ``max_delay``), shaped by a
:class:`Prior` when there is one: no poll before the earliest end the prior
allows for such tasks. A prior only ever lengthens the cold schedule's gaps, so
a cold start never polls more than before; the first finished task replaces it.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from ._config import PollPolicy


#: Gaps of the learned schedule never go below this many seconds, however
#: short the tasks: below it a poll costs more than the lag it saves.
MIN_LEARNED_GAP = 0.05
#: The learned window reaches this fraction of a duration beyond the shortest
#: and longest seen, so a task a little outside them is still polled densely.
MIN_PAD = 0.03
#: With few samples the extremes are poorly known: the padding is at least
#: this fraction divided by the sample count (half a duration with one sample).
FEW_SAMPLES_PAD = 0.5
#: Durations below this are treated as this (Kling stamps milliseconds).
SHORTEST = 0.001
#: Durations closer than this (seconds) are one duration to the learned distribution.
RESOLUTION = 0.01
#: However wide the floor between polls, a window where tasks end is crossed
#: in at least this many polls: a narrow one (tasks that all take about as
#: long) is then polled closely, and the end is caught soon after it comes.
WINDOW_POLLS = 2
#: A prior defers a task's first poll to at most this many times
#: ``PollPolicy.initial_delay``: a policy with a short one says its tasks may
#: end sooner than Kling's (a fake server in tests, a caching gateway).
PRIOR_STRETCH = 2.0


def _pad(value: float, samples: int, spread: float) -> float:
    return value * max(MIN_PAD, FEW_SAMPLES_PAD / samples) + spread / (samples + 1)


@attrs.frozen
class Durations:
    """A learned distribution of task durations in seconds.

    ``ages`` rise strictly and ``done`` (the fraction of tasks ended by each
    age) rises strictly from 0.0 to 1.0; between points the CDF is linear.
    ``samples`` is how many finished tasks it was made from.
    """

    ages: tuple[float, ...]
    done: tuple[float, ...]
    samples: int
    #: The typical duration; computed once, as every poll of a task asks.
    median: float = attrs.field(init=False, eq=False)

    @median.default
    def _median(self) -> float:
        return self.quantile(0.5)

    @classmethod
    def from_samples(cls, samples: Iterable[tuple[float, float]]) -> Durations | None:
        """The distribution of ``(seconds, weight)`` samples; ``None`` if there are none.

        Each distinct duration sits at the midpoint of its weight's step (a
        linear interpolation of the empirical CDF), and the support reaches a
        little beyond the shortest and longest seen: further with few samples
        or a wide spread, where unseen extremes are likelier.
        """
        weights: dict[float, float] = {}
        count = 0
        for seconds, weight in samples:
            if weight > 0 and math.isfinite(seconds) and seconds >= 0:
                # To RESOLUTION: two durations a float's last digit apart leave
                # no room between them for the CDF's interpolation to invert.
                key = max(round(seconds / RESOLUTION) * RESOLUTION, SHORTEST)
                weights[key] = weights.get(key, 0.0) + weight
                count += 1
        if not weights:
            return None
        values = sorted(weights)
        total = sum(weights.values())
        spread = values[-1] - values[0]
        ages = [max(0.0, values[0] - _pad(values[0], count, spread))]
        done = [0.0]
        seen = 0.0
        for value in values:
            share = weights[value] / total
            ages.append(value)
            done.append(seen + share / 2)
            seen += share
        ages.append(values[-1] + _pad(values[-1], count, spread))
        done.append(1.0)
        return cls(tuple(ages), tuple(done), count)

    @property
    def start(self) -> float:
        """No task of this kind is expected to end before this age."""
        return self.ages[0]

    @property
    def end(self) -> float:
        """A task still running at this age is overdue."""
        return self.ages[-1]

    def fraction_done(self, age: float) -> float:
        """The share of tasks that have ended by ``age`` (the CDF)."""
        ages = self.ages
        if age <= ages[0]:
            return 0.0
        if age >= ages[-1]:
            return 1.0
        index = bisect.bisect_right(ages, age)
        low, high = ages[index - 1], ages[index]
        below, above = self.done[index - 1], self.done[index]
        return below + (above - below) * (age - low) / (high - low)

    def quantile(self, fraction: float) -> float:
        """The age by which ``fraction`` of tasks have ended (the inverse CDF)."""
        done = self.done
        if fraction <= 0.0:
            return self.ages[0]
        if fraction >= 1.0:
            return self.ages[-1]
        index = bisect.bisect_left(done, fraction)
        low, high = done[index - 1], done[index]
        before, after = self.ages[index - 1], self.ages[index]
        return before + (after - before) * (fraction - low) / (high - low)


@attrs.frozen(kw_only=True)
class Prior:
    """What is assumed about tasks of a kind before any has been seen to end.

    ``earliest`` is an age (seconds) before which such a task is not expected
    to have ended: a lower bound, not a typical duration. ``source`` says where
    the number comes from (shown in the docs, and in logs at debug level).
    """

    earliest: float = attrs.field(validator=attrs.validators.ge(0.0))
    source: str


def next_delay(
    age: float,
    durations: Durations | Prior | None,
    policy: PollPolicy,
    *,
    sharing: float = 1.0,
    noise: float = 0.0,
) -> float:
    """Seconds from now until the next poll of a task ``age`` seconds old.

    ``durations`` is what was learned about tasks like it (``None`` or a
    :class:`Prior`: nothing yet, the cold schedule applies; with a prior, no
    poll before its ``earliest`` end (jittered), deferred by at most
    :data:`PRIOR_STRETCH` times ``initial_delay``); ``sharing`` how many tasks the request
    that polls it serves (1 for a GET, more for a list page); ``noise`` a draw
    in [-1, 1] that jitters gaps which would otherwise fall in lockstep.
    """
    jitter = 1.0 + policy.jitter * max(-1.0, min(1.0, noise))
    if durations is None or isinstance(durations, Prior):
        cold = policy.base_delay(age) * jitter
        if durations is None:
            return cold
        # Gaps only ever lengthen (a poll the cold schedule would make is
        # skipped while the task cannot have ended), so polls never get more.
        # Jittered as the cold gaps are: a batch created at once would
        # otherwise poll in lockstep, all just before a task ending at the bound.
        earliest = min(durations.earliest, PRIOR_STRETCH * policy.initial_delay)
        return max(cold, (earliest - age) * jitter)
    floor = max(
        MIN_LEARNED_GAP,
        min(policy.min_gap * durations.median, (durations.end - durations.start) / WINDOW_POLLS),
    )
    if age < durations.end:
        chance = max(policy.sweep_chance, policy.poll_chance / max(1.0, sharing))
        done = durations.fraction_done(age)
        gap = durations.quantile(done + chance * (1.0 - done)) - age
    else:
        # Overdue: it may be one of the rare long ones, or stuck. Back off as
        # the cold schedule does with age, here with how overdue it is. Jitter
        # spreads stragglers that went overdue together.
        gap = (floor + (policy.multiplier - 1.0) * (age - durations.end)) * jitter
    return min(policy.max_delay, max(floor, gap))


def overdue_age(durations: Durations | Prior | None, policy: PollPolicy) -> float:
    """The age from which a task whose callbacks are expected counts as overdue:
    ``overdue_factor`` times the typical duration and past every duration seen
    (``callback_delay`` while nothing is learned, a prior included)."""
    if durations is None or isinstance(durations, Prior):
        return policy.callback_delay
    return max(policy.overdue_factor * durations.median, durations.end)


def poll_delay(
    age: float,
    durations: Durations | Prior | None,
    policy: PollPolicy,
    *,
    callbacks: bool = False,
    sharing: float = 1.0,
    noise: float = 0.0,
) -> float:
    """:func:`next_delay`, and while Kling's callbacks are expected (``callbacks``)
    and the task is not overdue, no sooner than the safety net: polls come
    ``callback_delay`` apart until :func:`overdue_age`, then as without callbacks."""
    delay = next_delay(age, durations, policy, sharing=sharing, noise=noise)
    if callbacks:
        overdue_at = overdue_age(durations, policy)
        if age < overdue_at:
            delay = max(delay, min(policy.callback_delay, overdue_at - age))
    return delay
