"""How long tasks take, learned from the tasks this client saw finish.

Kling stamps every task with ``created_at`` and ``updated_at``; the difference
on a terminal task is its true duration, whatever the network did, also for a
task this client only attached to. Durations depend on what was asked for, so
they are kept per *kind* of task, which the endpoint's declaration defines
(``_endpoints``): its ``duration_key`` and its ``duration_features`` of the
request (model, images asked for, resolution, reference inputs). A kind with
too few finished tasks borrows what its duration key as a whole has learned; a
task attached by id (no request) uses that pool from the start.

Before any task of a duration key has ended, and with no history kept, a
:class:`~kling_async._schedule.Prior` from :data:`PRIORS` shapes the cold
schedule (see there for what its numbers are, and are not).

Old evidence decays: each duration's weight halves with every
:data:`HALF_LIFE` newer ones of its kind, and only the latest :data:`WINDOW`
are kept, so the schedule follows Kling when it gets faster or slower.

What was learned outlives the process (a :class:`DurationStore`): in the
client's journal when it has one (a table of its own, see ``_journal``),
otherwise a small JSON file in the user's cache directory
(:class:`DurationCache`), per API root and kind, read on first use and written
when the client closes. A batch's first round is then polled on the learned
schedule rather than the cold one. Either is bounded and safe to delete; one
that cannot be read is ignored, and one that cannot be written is skipped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
from collections import deque
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from ._endpoints import by_request_type, declaration_for
from ._models import Endpoint, TaskRequest
from ._schedule import Durations, Prior

logger = logging.getLogger("kling_async")

Kind = tuple[Hashable, ...]
"""What changes how long a task takes: its declaration's ``duration_key``, then
the ``duration_features`` of its request (model, n, resolution, references)."""

#: Durations kept per kind (and per duration key): the most recent ones.
WINDOW = 64
#: A duration weighs half as much once this many newer ones of its kind came.
HALF_LIFE = 16
#: Finished tasks a kind needs before its own distribution is used rather
#: than its duration key's.
MIN_KIND_SAMPLES = 3
#: While a duration key has this few durations, each one reshapes its distribution.
EARLY_SAMPLES = 3

#: Where the priors come from: nowhere better, and the docs say so.
_PRIOR_SOURCE = (
    "conservative lower bound: Kling documents no task durations and the SDK has no "
    "measurements of real tasks to cite"
)
#: What is assumed about each duration key (and, where given, model) before a
#: task of it has ended: a task is not expected to end younger than ``earliest``.
#: Kling's reference gives no durations, and the fake server's timings are
#: test settings, not evidence, so each number is a *lower bound* chosen to be
#: safe rather than a typical duration: 2 s, below what any of these endpoints
#: (a diffusion model behind a queue, then an upload) can plausibly take. A
#: lower bound of the fastest model, ``n`` and resolution holds for slower ones
#: too, so the table needs no entry per ``n`` or resolution. At default settings
#: it only skips the cold schedule's first poll (1 s); the first finished task of
#: the key replaces it with what was learned (``docs/performance.md``).
PRIORS: Mapping[tuple[str, str | None], Prior] = {
    (key, None): Prior(earliest=2.0, source=_PRIOR_SOURCE)
    for key in (
        "images/generations",
        "images/multi-image2image",
        "images/omni-image",
        "images/editing/expand",
        "general/ai-multi-shot",
        "images/kolors-virtual-try-on",
    )
}
#: The prior of a duration key the table does not name (an endpoint declared
#: later): the same conservative bound, so a new endpoint needs no entry here.
DEFAULT_PRIOR = Prior(earliest=2.0, source=_PRIOR_SOURCE)


def prior_for(key: str, kind: Kind | None) -> Prior:
    """The prior of tasks of ``kind`` (``None``: of the duration key ``key`` as a whole)."""
    model = kind[1] if kind is not None and len(kind) > 1 else None
    if isinstance(model, str) and (key, model) in PRIORS:
        return PRIORS[key, model]
    return PRIORS.get((key, None), DEFAULT_PRIOR)


def kind_of(request: TaskRequest) -> Kind:
    """The kind of task ``request`` creates, for learning its duration: what its
    endpoint's declaration says the duration depends on."""
    try:
        declaration = by_request_type(request)
    except KeyError:  # an undeclared request type: learn it per endpoint and model
        return (request.endpoint.value, request.model_name, request.n, None, 0)
    return (declaration.duration_key, *declaration.duration_features(request))


def duration_key_of(endpoint: Endpoint) -> str:
    """The duration key of ``endpoint``'s tasks, also of one attached by id."""
    try:
        return declaration_for(endpoint).duration_key
    except KeyError:
        return str(endpoint.value)


class _Evidence:
    """The recent durations of one kind (or endpoint), and their distribution."""

    __slots__ = ("_cached", "_recent")

    def __init__(self) -> None:
        self._recent: deque[float] = deque(maxlen=WINDOW)
        self._cached: Durations | None = None

    def add(self, seconds: float) -> None:
        self._recent.append(seconds)
        self._cached = None

    def __len__(self) -> int:
        return len(self._recent)

    def durations(self) -> Durations | None:
        # Made once per new duration, however many polls ask in between.
        if self._cached is None and self._recent:
            newest = len(self._recent) - 1
            self._cached = Durations.from_samples(
                (seconds, 0.5 ** ((newest - position) / HALF_LIFE))
                for position, seconds in enumerate(self._recent)
            )
        return self._cached


class DurationStore(Protocol):
    """Where learned durations are kept between runs: :class:`DurationCache` (a
    file) or a journal's table. Neither call may raise: a store is an optimisation."""

    def load(self) -> dict[Kind, list[float]]:
        """The durations recorded for this API root, oldest first, per kind."""

    def save(self, recent: Mapping[Kind, Sequence[float]]) -> None:
        """Record ``recent`` (per kind, oldest first), keeping the store bounded."""


class DurationLearner:
    """Durations of finished tasks per kind and per duration key, with decay;
    seeded from ``cache`` on first use, when there is one."""

    def __init__(self, cache: DurationStore | None = None) -> None:
        self._kinds: dict[Kind, _Evidence] = {}
        self._interned: dict[Kind, Kind] = {}
        self._pools: dict[str, _Evidence] = {}  # per duration key
        self._everything = _Evidence()
        self._cache = cache
        self._unread = cache is not None  # read on first use: no I/O in constructors
        self._observed = 0  # durations seen this run, not read from the cache

    def _read_cache(self) -> None:
        self._unread = False
        if self._cache is None:
            return
        for kind, durations in self._cache.load().items():
            kind = self._interned.setdefault(kind, kind)
            own = self._kinds.setdefault(kind, _Evidence())
            pooled = self._pools.setdefault(_pool_of(None, kind), _Evidence())
            for seconds in durations:
                own.add(seconds)
                pooled.add(seconds)
                self._everything.add(seconds)

    def save(self) -> None:
        """Write what is known to the cache, if there is one and this run learned
        anything (never raises: a cache is an optimisation)."""
        if self._cache is None or not self._observed:
            return
        self._cache.save({kind: list(own._recent) for kind, own in self._kinds.items()})

    def kind(self, request: TaskRequest) -> Kind:
        """The kind of ``request``, one shared object per kind (task states hold it)."""
        if self._unread:
            self._read_cache()
        kind = kind_of(request)
        # The first equal tuple, so thousands of states share one object.
        return self._interned.setdefault(kind, kind)

    def observe(self, endpoint: Endpoint, kind: Kind | None, seconds: float) -> bool:
        """Learn that a task of ``endpoint`` and ``kind`` (``None``: unknown,
        e.g. attached by id) took ``seconds``.

        Returns whether this changed much what is known: one of the duration key's
        first few durations, or the one that gives its kind a distribution of
        its own. Polls planned before are then worth planning again.
        """
        if self._unread:
            self._read_cache()
        self._observed += 1
        telling = False
        if kind is not None:
            own = self._kinds.setdefault(kind, _Evidence())
            own.add(seconds)
            telling = len(own) == MIN_KIND_SAMPLES
        pooled = self._pools.setdefault(_pool_of(endpoint, kind), _Evidence())
        pooled.add(seconds)
        self._everything.add(seconds)
        return telling or len(pooled) <= EARLY_SAMPLES

    def durations(self, endpoint: Endpoint, kind: Kind | None) -> Durations | Prior:
        """What is known about tasks of ``endpoint`` and ``kind``: its own
        distribution once it has enough finished tasks, else its duration
        key's; before any of them ended, :func:`prior_for` the key and kind."""
        if self._unread:
            self._read_cache()
        if kind is not None:
            own = self._kinds.get(kind)
            mature = own.durations() if own is not None and len(own) >= MIN_KIND_SAMPLES else None
            if mature is not None:
                return mature
        key = _pool_of(endpoint, kind)
        pooled = self._pools.get(key)
        learned = pooled.durations() if pooled is not None else None
        return learned if learned is not None else prior_for(key, kind)

    @property
    def typical(self) -> float | None:
        """The median duration of all recent tasks, ``None`` before any ended."""
        if self._unread:
            self._read_cache()
        durations = self._everything.durations()
        return durations.median if durations is not None else None


def _pool_of(endpoint: Endpoint | None, kind: Kind | None) -> str:
    """The duration key whose pool a task of ``kind`` (or, unknown, of
    ``endpoint``) learns into and borrows from."""
    if kind is not None:
        return _key_text(kind[0])
    assert endpoint is not None
    return duration_key_of(endpoint)


def _key_text(key: Hashable) -> str:
    # A kind made before duration keys (or by hand) may start with an Endpoint.
    return key.value if isinstance(key, Endpoint) else str(key)


# --- kept between runs ---------------------------------------------------------------

#: Where the durations are kept: a path, or ``off`` (or empty) for nowhere.
ENV_DURATIONS_CACHE = "KLING_DURATIONS_CACHE"
#: The file's format; a file of another is ignored (and replaced on the next save).
CACHE_FORMAT = 1
#: Kinds kept in the file, the most recently used first: it stays a few
#: hundred kB at most whatever runs on the machine.
MAX_CACHED_KINDS = 200
_OFF = frozenset(("", "0", "off", "false", "no", "none"))


def user_cache_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """The user's cache directory: ``$XDG_CACHE_HOME``, else the platform's own."""
    if environ.get("XDG_CACHE_HOME"):
        return Path(environ["XDG_CACHE_HOME"])
    if sys.platform == "win32":
        return Path(environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches"
    return Path.home() / ".cache"


def default_cache_path(environ: Mapping[str, str] = os.environ) -> Path | None:
    """``$KLING_DURATIONS_CACHE`` (``None`` when it says ``off``), else
    ``kling-async/durations.json`` in the user's cache directory."""
    setting = environ.get(ENV_DURATIONS_CACHE)
    if setting is not None:
        return None if setting.strip().lower() in _OFF else Path(setting.strip()).expanduser()
    return user_cache_dir(environ) / "kling-async" / "durations.json"


class DurationCache:
    """The recent durations of each kind of task, kept in a JSON file between runs.

    Entries are per API root (``scope``: its origin and path, never its
    credentials) and kind; each holds at most :data:`WINDOW` durations and the
    time it was last written. Reading forgives everything (a missing, corrupt or
    foreign file is no history); writing replaces the file atomically, so a
    crash or a concurrent writer never leaves half a file.
    """

    def __init__(self, path: Path, scope: str) -> None:
        self.path = path
        self.scope = scope

    @classmethod
    def for_base_url(cls, path: Path, base_url: str) -> DurationCache:
        return cls(path, scope_of(base_url))

    def _key(self, kind: Kind) -> str:
        return entry_key(self.scope, kind)

    def _read_file(self) -> dict[str, object]:
        try:
            recorded = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(recorded, dict) or recorded.get("format") != CACHE_FORMAT:
            return {}
        kinds = recorded.get("kinds")
        return kinds if isinstance(kinds, dict) else {}

    def load(self) -> dict[Kind, list[float]]:
        """The durations recorded for this scope, oldest first, per kind."""
        return read_entries(self.scope, self._read_file().items())

    def save(self, recent: Mapping[Kind, Sequence[float]]) -> None:
        """Record ``recent`` (per kind, oldest first) for this scope; other
        scopes' entries are kept, the least recently written dropped beyond
        :data:`MAX_CACHED_KINDS`. Failures are logged at debug level only."""
        # Entries this version cannot read are dropped, whoever wrote them.
        kinds = {k: v for k, v in self._read_file().items() if _parse_entry(k, v) is not None}
        now = round(time.time(), 3)
        fresh: set[str] = set()
        for kind, durations in recent.items():
            if durations:
                key = self._key(kind)
                kinds[key] = {"seconds": list(durations)[-WINDOW:], "at": now}
                fresh.add(key)

        def written(item: tuple[str, object]) -> tuple[float, bool]:
            at = item[1].get("at") if isinstance(item[1], dict) else None
            # What this save writes goes before what another wrote in the same
            # millisecond: the clock alone cannot order them.
            return (float(at) if isinstance(at, (int, float)) else 0.0, item[0] in fresh)

        kept = dict(sorted(kinds.items(), key=written, reverse=True)[:MAX_CACHED_KINDS])
        text = json.dumps({"format": CACHE_FORMAT, "kinds": kept}, separators=(",", ":"))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            descriptor, temporary = tempfile.mkstemp(
                prefix=".durations-", suffix=".tmp", dir=self.path.parent
            )
            try:
                with os.fdopen(descriptor, "w", encoding="utf-8") as file:
                    file.write(text)
                os.replace(temporary, self.path)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
        except OSError as error:
            logger.debug("could not write the durations cache %s: %s", self.path, error)


def scope_of(base_url: str) -> str:
    """The API root durations are kept under: its origin and path, never its
    credentials (a URL may carry a user and password)."""
    parts = urlsplit(base_url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}{parts.path}"


def entry_key(scope: str, kind: Kind) -> str:
    """The text a kind's durations are stored under, for one API root."""
    # The duration key is the endpoint's path today: files written before
    # kinds were derived from the declarations read the same.
    key, *rest = kind
    return json.dumps([scope, _key_text(key), *rest])


def read_entries(scope: str, entries: Iterable[tuple[str, object]]) -> dict[Kind, list[float]]:
    """The durations of ``scope`` among stored ``(key, entry)`` pairs, each entry
    ``{"seconds": [...]}``; what this version cannot read is skipped."""
    found: dict[Kind, list[float]] = {}
    for key, entry in entries:
        parsed = _parse_entry(key, entry)
        if parsed is not None and parsed[0] == scope:
            found[parsed[1]] = parsed[2]
    return found


def _parse_entry(key: str, entry: object) -> tuple[str, Kind, list[float]] | None:
    """The scope, kind and durations of one entry of the file; ``None`` when it
    is not one this version wrote."""
    try:
        scope, duration_key, *rest = json.loads(key)
        if not all(isinstance(part, str) for part in (scope, duration_key)):
            return None
        if not isinstance(entry, dict):
            return None
        kind: Kind = (duration_key, *rest)
        durations = [
            float(seconds)
            for seconds in entry["seconds"][-WINDOW:]
            if isinstance(seconds, (int, float))
            and math.isfinite(seconds)
            and 0 <= seconds < 86_400
        ]
    except (ValueError, TypeError, KeyError):
        return None
    if not durations or not all(isinstance(part, Hashable) for part in rest):
        return None
    return scope, kind, durations
