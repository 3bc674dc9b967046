"""Settings with their defaults and the pure arithmetic of waiting.

Everything tunable about retries and polling is a frozen attrs class here, so a
user passes one object (``Client(retry=RetryPolicy(max_attempts=2))``) and the
defaults are documented in one place.
"""

from __future__ import annotations

import os
import random
from collections.abc import Generator, Mapping
from typing import Any

import aiohttp
import attrs

from ._exceptions import ConfigurationError
from ._urls import is_http_url, redacted_url

__all__ = ["DEFAULT_BASE_URL", "OFFICIAL_BASE_URL", "PollPolicy", "RetryPolicy"]

DEFAULT_BASE_URL = "https://api.powertokens.ai/kling"
OFFICIAL_BASE_URL = "https://api-singapore.klingai.com"
ENV_BASE_URL = "KLING_BASE_URL"

#: No single HTTP exchange may take longer than this unless the user says so.
#: (No sock_read: the total bounds every exchange, and a per-read timeout
#: would reschedule a timer on every chunk.)
DEFAULT_TIMEOUT = aiohttp.ClientTimeout(total=60, connect=10)


def resolve_base_url(
    base_url: str | None,
    environ: Mapping[str, str] = os.environ,
    *,
    official_credentials: bool = False,
) -> str:
    """The API root before ``/v1``: the argument, else ``KLING_BASE_URL``, else a
    default chosen from the credentials.

    The official API's key pair (``official_credentials``: access key and secret
    key, signed into JWTs) is only ever sent to :data:`OFFICIAL_BASE_URL` by
    default: sending it to a third-party gateway would hand that host a secret
    it has no use for. A bearer token keeps :data:`DEFAULT_BASE_URL`.

    Raises :class:`ConfigurationError` for one that is not an http(s) URL with a
    host, naming where it came from: such a root would otherwise fail only at
    the first request, as a lookup of a host made from the path.
    """
    source, chosen = "base_url", base_url
    if chosen is None:
        default = OFFICIAL_BASE_URL if official_credentials else DEFAULT_BASE_URL
        source, chosen = ENV_BASE_URL, environ.get(ENV_BASE_URL, "").strip() or default
    if not isinstance(chosen, str) or not is_http_url(chosen.strip()):
        raise ConfigurationError(
            f"{source} must be an http(s) URL with a host, such as {DEFAULT_BASE_URL}; "
            f"got {redacted_url(chosen)}"
        )
    chosen = chosen.strip().rstrip("/")
    # Accept a root given with the version on it; paths add /v1 themselves.
    return chosen.removesuffix("/v1")


def _positive(_instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


def _equal_jitter(delay: float, rng: random.Random) -> float:
    # Half fixed, half random: spreads clients apart without ever collapsing a
    # wait to ~0 the way full jitter can.
    return delay / 2 + rng.uniform(0, delay / 2)


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """How one request is retried after a retryable failure (1302, 5000-5002,
    502/503/504, connection errors and timeouts).

    Waits grow exponentially from ``initial_delay`` up to ``max_delay`` with
    jitter; a ``Retry-After`` header replaces the computed wait. A request gives
    up after ``max_attempts`` tries or once ``max_elapsed`` seconds have passed.
    """

    max_attempts: int = attrs.field(default=4, validator=attrs.validators.ge(1))
    initial_delay: float = attrs.field(default=0.5, validator=_positive)
    max_delay: float = attrs.field(default=8.0, validator=_positive)
    max_elapsed: float = attrs.field(default=60.0, validator=_positive)
    rng: random.Random = attrs.field(factory=random.Random, repr=False, eq=False)

    def delay(self, failures: int, retry_after: float | None = None) -> float:
        """Seconds to wait after the ``failures``-th failure in a row (1 for the
        first): ``retry_after`` when the server asked for it, else jittered
        exponential backoff."""
        if retry_after is not None:
            return float(retry_after)
        exponent = min(max(failures - 1, 0), 32)
        return _equal_jitter(min(self.max_delay, self.initial_delay * 2**exponent), self.rng)

    def waits(self) -> Generator[float, Any, None]:
        """A ``backoff`` wait generator: primed with ``send(None)``, then sent each
        failure, it yields the seconds to wait before the next try (the way
        ``backoff.runtime`` reads a wait from the exception, falling back on
        jittered exponential backoff)."""
        error = yield  # type: ignore[misc]  # the priming step, as backoff's own generators do
        failures = 0
        while True:
            failures += 1
            error = yield self.delay(failures, getattr(error, "retry_after", None))


@attrs.frozen(kw_only=True)
class PollPolicy:
    """How a task is polled until it ends.

    **Learned schedule** (the default once tasks have finished): the client
    learns how long tasks take from Kling's own ``created_at``/``updated_at``,
    per endpoint and per what changes the duration (model, ``n``, resolution,
    reference images), the most recent tasks weighing most. Each task is then
    polled by what remains of that distribution at its age: not at all while it
    surely still runs, densely through the window where such tasks end, less
    and less often once it is overdue. Each poll is placed where the task will
    have ended with probability ``poll_chance`` (given that it still runs),
    down to ``sweep_chance`` when one list page polls many tasks at once; gaps
    never go below ``min_gap`` times the typical duration (or half the
    window where such tasks end, if that is narrower; never below 0.05 s) nor
    above ``max_delay``. ``learn=False`` turns this off. With the defaults, tasks
    of 5 to 20 s are polled about every 0.6 s in their window, and a list page
    serving many tasks goes out at most that often.

    **Cold schedule** (before any task of that endpoint has finished, or with
    ``learn=False``): the gap between polls grows with the task's age,
    ``(multiplier - 1) * age``, kept between ``initial_delay`` and
    ``max_delay``, each gap jittered by ±``jitter`` (a fraction) so thousands
    of tasks do not poll in lockstep.

    With many tasks in flight one request to the list endpoint refreshes them
    all; it is used whenever it costs fewer requests than single GETs
    (``list_sweeps=False``: single GETs only, e.g. for a gateway without the
    list endpoint).

    While Kling's callbacks are expected for a task, polls are only a safety net
    ``callback_delay`` apart, until the task is overdue: older than
    ``overdue_factor`` times the typical duration of such tasks and than any of
    them took (``callback_delay`` before any has finished); then the normal
    schedule resumes, since its callbacks may have been lost.

    ``timeout`` is the default deadline of ``await handle`` (``None``: for ever).
    """

    initial_delay: float = attrs.field(default=1.0, validator=_positive)
    max_delay: float = attrs.field(default=10.0, validator=_positive)
    multiplier: float = attrs.field(default=1.5, validator=attrs.validators.ge(1.0))
    jitter: float = attrs.field(
        default=0.1, validator=[attrs.validators.ge(0.0), attrs.validators.lt(1.0)]
    )
    timeout: float | None = 1800.0
    callback_delay: float = attrs.field(default=30.0, validator=_positive)
    overdue_factor: float = attrs.field(default=2.0, validator=_positive)
    learn: bool = True
    poll_chance: float = attrs.field(default=0.15, validator=[_positive, attrs.validators.le(1.0)])
    sweep_chance: float = attrs.field(default=0.05, validator=[_positive, attrs.validators.le(1.0)])
    min_gap: float = attrs.field(default=0.06, validator=attrs.validators.ge(0.0))
    list_sweeps: bool = True
    rng: random.Random = attrs.field(factory=random.Random, repr=False, eq=False)

    def base_delay(self, age: float) -> float:
        """The cold schedule's gap, before jitter, for a task first seen ``age`` seconds ago."""
        return min(self.max_delay, max(self.initial_delay, (self.multiplier - 1) * age))

    def delay(self, age: float) -> float:
        """Seconds until the next poll of a task first seen ``age`` seconds ago,
        on the cold schedule."""
        return self.base_delay(age) * (1 + self.rng.uniform(-self.jitter, self.jitter))
