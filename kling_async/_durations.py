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
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable

from ._models import Endpoint, ImageGenerationRequest, MultiImageRequest, TaskRequest
from ._schedule import Durations

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
    """Durations of finished tasks per kind and per endpoint, with decay."""

    def __init__(self) -> None:
        self._kinds: dict[Kind, _Evidence] = {}
        self._interned: dict[Kind, Kind] = {}
        self._endpoints: dict[Endpoint, _Evidence] = {}
        self._everything = _Evidence()

    def kind(self, request: TaskRequest) -> Kind:
        """The kind of ``request``, one shared object per kind (task states hold it)."""
        kind = kind_of(request)
        # The first equal tuple, so thousands of states share one object.
        return self._interned.setdefault(kind, kind)

    def observe(self, endpoint: Endpoint, kind: Kind | None, seconds: float) -> bool:
        """Learn that a task of ``kind`` (``None``: unknown) took ``seconds``.

        Returns whether this changed much what is known: one of the endpoint's
        first few durations, or the one that gives its kind a distribution of
        its own. Polls planned before are then worth planning again.
        """
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
        if kind is not None:
            own = self._kinds.get(kind)
            if own is not None and len(own) >= MIN_KIND_SAMPLES:
                return own.durations()
        pooled = self._endpoints.get(endpoint)
        return pooled.durations() if pooled is not None else None

    @property
    def typical(self) -> float | None:
        """The median duration of all recent tasks, ``None`` before any ended."""
        durations = self._everything.durations()
        return durations.median if durations is not None else None
