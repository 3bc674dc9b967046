"""How long tasks take, learned from the tasks this client saw finish.

Kling stamps every task with ``created_at`` and ``updated_at``; the difference
on a terminal task is its true duration, whatever the network did, also for a
task this client only attached to. Durations depend on what was asked for, so
they are kept per *kind* of task: the endpoint, the model, ``n``, the
resolution and the number of reference images. A kind with too few finished
tasks borrows what its endpoint as a whole has learned.

Old evidence decays: each duration's weight halves with every
:data:`HALF_LIFE` newer ones of its kind, and only the latest :data:`WINDOW`
are kept, so the schedule follows Kling when it gets faster or slower.

What was learned outlives the process (:class:`DurationCache`): a small JSON
file in the user's cache directory, per API root and kind, read on first use
and written when the client closes. A batch's first round is then polled on
the learned schedule rather than the cold one. The file is safe to delete; one
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
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from ._models import Endpoint, ImageGenerationRequest, MultiImageRequest, TaskRequest
from ._schedule import Durations

logger = logging.getLogger("kling_async")

Kind = tuple[Hashable, ...]
"""What changes how long a task takes: (endpoint, model, n, resolution, references)."""

#: Durations kept per kind (and per endpoint): the most recent ones.
WINDOW = 64
#: A duration weighs half as much once this many newer ones of its kind came.
HALF_LIFE = 16
#: Finished tasks a kind needs before its own distribution is used rather
#: than its endpoint's.
MIN_KIND_SAMPLES = 3
#: While an endpoint has this few durations, each one reshapes its distribution.
EARLY_SAMPLES = 3


def kind_of(request: TaskRequest) -> Kind:
    """The kind of task ``request`` creates, for learning its duration."""
    if isinstance(request, ImageGenerationRequest):
        references = len(request.element_ids) + (request.image is not None)
        resolution = request.resolution
    elif isinstance(request, MultiImageRequest):
        references = (
            len(request.subject_images)
            + (request.scene_image is not None)
            + (request.style_image is not None)
        )
        resolution = None
    else:  # a request type added later: learn it per endpoint and model
        references, resolution = 0, None
    return (request.endpoint, request.model_name, request.n, resolution, references)


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


class DurationLearner:
    """Durations of finished tasks per kind and per endpoint, with decay;
    seeded from ``cache`` on first use, when there is one."""

    def __init__(self, cache: DurationCache | None = None) -> None:
        self._kinds: dict[Kind, _Evidence] = {}
        self._interned: dict[Kind, Kind] = {}
        self._endpoints: dict[Endpoint, _Evidence] = {}
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
            pooled = self._endpoints.setdefault(kind[0], _Evidence())  # type: ignore[arg-type]
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
        """Learn that a task of ``kind`` (``None``: unknown) took ``seconds``.

        Returns whether this changed much what is known: one of the endpoint's
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
        pooled = self._endpoints.setdefault(endpoint, _Evidence())
        pooled.add(seconds)
        self._everything.add(seconds)
        return telling or len(pooled) <= EARLY_SAMPLES

    def durations(self, endpoint: Endpoint, kind: Kind | None) -> Durations | None:
        """What is known about tasks of ``kind``: its own distribution once it
        has enough finished tasks, else its endpoint's; ``None`` if nothing."""
        if self._unread:
            self._read_cache()
        if kind is not None:
            own = self._kinds.get(kind)
            if own is not None and len(own) >= MIN_KIND_SAMPLES:
                return own.durations()
        pooled = self._endpoints.get(endpoint)
        return pooled.durations() if pooled is not None else None

    @property
    def typical(self) -> float | None:
        """The median duration of all recent tasks, ``None`` before any ended."""
        if self._unread:
            self._read_cache()
        durations = self._everything.durations()
        return durations.median if durations is not None else None


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
        parts = urlsplit(base_url)
        port = f":{parts.port}" if parts.port else ""
        return cls(path, f"{parts.scheme}://{parts.hostname}{port}{parts.path}")

    def _key(self, kind: Kind) -> str:
        endpoint, *rest = kind
        value = endpoint.value if isinstance(endpoint, Endpoint) else endpoint
        return json.dumps([self.scope, value, *rest])

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
        found: dict[Kind, list[float]] = {}
        for key, entry in self._read_file().items():
            parsed = _parse_entry(key, entry)
            if parsed is not None and parsed[0] == self.scope:
                found[parsed[1]] = parsed[2]
        return found

    def save(self, recent: Mapping[Kind, Sequence[float]]) -> None:
        """Record ``recent`` (per kind, oldest first) for this scope; other
        scopes' entries are kept, the least recently written dropped beyond
        :data:`MAX_CACHED_KINDS`. Failures are logged at debug level only."""
        # Entries this version cannot read are dropped, whoever wrote them.
        kinds = {k: v for k, v in self._read_file().items() if _parse_entry(k, v) is not None}
        now = round(time.time(), 3)
        for kind, durations in recent.items():
            if durations:
                kinds[self._key(kind)] = {"seconds": list(durations)[-WINDOW:], "at": now}

        def written(item: tuple[str, object]) -> float:
            at = item[1].get("at") if isinstance(item[1], dict) else None
            return float(at) if isinstance(at, (int, float)) else 0.0

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


def _parse_entry(key: str, entry: object) -> tuple[str, Kind, list[float]] | None:
    """The scope, kind and durations of one entry of the file; ``None`` when it
    is not one this version wrote."""
    try:
        scope, endpoint, *rest = json.loads(key)
        if not isinstance(scope, str) or not isinstance(entry, dict):
            return None
        kind: Kind = (Endpoint(endpoint), *rest)
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
