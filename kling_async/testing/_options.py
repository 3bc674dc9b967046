"""Configuration and record types of the fake server: limits, faults, traffic logs."""

from __future__ import annotations

import base64
import binascii
import os
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any, Literal

import attrs

from kling_async._pricing import DEFAULT_PRICES, PriceTable

from ._tasks import FakeTask, default_outcome

__all__ = [
    "CallbackFaults",
    "CallbackFormat",
    "CallbackRecord",
    "CreateAnswer",
    "Fault",
    "FaultKind",
    "FaultRoute",
    "ImageIndexing",
    "RateLimit",
    "RecordedRequest",
    "Route",
    "WireShapes",
]

Route = Literal["create", "get", "list", "download", "callback", "other"]
"""What a request was, as :attr:`RecordedRequest.route` reports it."""

FaultRoute = Literal["create", "get", "list", "download", "any"]
"""Which requests a :class:`Fault` applies to."""

FaultKind = Literal[
    "error", "error_after", "drop", "drop_after", "delay", "garbage", "garbage_after", "exists"
]
"""How a :class:`Fault` misbehaves; see :meth:`FakeKlingServer.inject`."""

CallbackFormat = Literal["legacy", "legacy_without_task_info", "new_design"]
"""The body of callbacks: see :class:`WireShapes`."""

ImageIndexing = Literal["index", "id", "none"]
"""How result images say their place: see :class:`WireShapes`."""

CreateAnswer = Literal["full", "task_id_only"]
"""What a successful create answers: see :class:`WireShapes`."""

FAULT_KINDS: frozenset[str] = frozenset(
    ("error", "error_after", "drop", "drop_after", "delay", "garbage", "garbage_after", "exists")
)
FAULT_ROUTES: frozenset[str] = frozenset(("create", "get", "list", "download", "any"))


def _probability(_instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be a probability between 0 and 1, got {value!r}")


def _non_negative(_instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must not be negative, got {value!r}")


def _positive(_instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


@attrs.frozen
class RateLimit:
    """A token bucket over every ``/v1`` request: bursts of up to ``requests``,
    refilled at ``requests / per`` per second. Over it the server answers 1302
    (HTTP 429) with a ``Retry-After`` of ``retry_after`` seconds (no header when
    ``None``)."""

    requests: int = attrs.field(validator=_positive)
    per: float = attrs.field(validator=_positive)
    retry_after: float | None = 1.0


def _one_of(*options: str) -> Any:
    def check(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value not in options:
            raise ValueError(f"{attribute.name} must be one of {options}, got {value!r}")

    return check


def _error_http_status(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not (isinstance(value, int) and 100 <= value <= 599):
        raise ValueError(f"{attribute.name} must be None or an HTTP status, got {value!r}")


@attrs.frozen(kw_only=True)
class WireShapes:
    """How the fake's answers and callbacks bend the documented shapes, as real
    Kling answers do; the defaults follow the documentation.

    ``callback_format``: ``"legacy"`` posts a get's ``data``;
    ``"legacy_without_task_info"`` the same without ``task_info`` (older copies
    of the schema), so a receiver must match by task_id; ``"new_design"`` the
    format of newer APIs and the console's test callback, ``{"id", "status",
    "message", "outputs", "create_time", "update_time", "external_id",
    "billing"}`` with ``succeed`` spelled ``succeeded``.

    ``image_index``: result images carry ``"index"``, or ``"id": ""`` in its
    place (``"id"``, as recorded from the live API), or neither (``"none"``).

    ``create_answer``: ``"task_id_only"`` answers a successful create with
    ``data = {"task_id": ...}`` and nothing else.

    ``request_id``: ``False`` leaves ``request_id`` out of every answer.
    ``error_data``: ``False`` leaves ``data`` out of error answers.
    ``error_http_status``: answer every error (code != 0) with this HTTP status
    instead of Kling's table, e.g. ``200``: the body's code alone tells.
    """

    callback_format: CallbackFormat = attrs.field(
        default="legacy", validator=_one_of("legacy", "legacy_without_task_info", "new_design")
    )
    image_index: ImageIndexing = attrs.field(
        default="index", validator=_one_of("index", "id", "none")
    )
    create_answer: CreateAnswer = attrs.field(
        default="full", validator=_one_of("full", "task_id_only")
    )
    request_id: bool = True
    error_data: bool = True
    error_http_status: int | None = attrs.field(default=None, validator=_error_http_status)

    @property
    def bends_envelopes(self) -> bool:
        """Whether answers differ from the documented envelope at all."""
        return not (self.request_id and self.error_data and self.error_http_status is None)


@attrs.frozen(kw_only=True)
class CallbackFaults:
    """How callback deliveries misbehave, each an independent probability per update.

    ``drop``: never sent (recorded as undelivered). ``duplicate``: sent twice.
    ``reorder``: held back and sent after the task's next update (a task's final
    update is never held, there being nothing to send after it). ``delay``: the
    maximum extra wait in seconds, drawn uniformly for each update; a task's
    updates still leave in order unless ``reorder`` says otherwise.
    """

    drop: float = attrs.field(default=0.0, validator=_probability)
    duplicate: float = attrs.field(default=0.0, validator=_probability)
    reorder: float = attrs.field(default=0.0, validator=_probability)
    delay: float = attrs.field(default=0.0, validator=_non_negative)


@attrs.define(kw_only=True, eq=False)
class Fault:
    """One injected misbehaviour, made by :meth:`FakeKlingServer.inject`.

    ``hits`` counts the requests it has applied to; once it reaches ``times``
    (unless ``times`` is ``None``) the fault stops applying.
    """

    kind: FaultKind
    route: FaultRoute = "any"
    endpoint: str | None = None
    times: int | None = 1
    probability: float = attrs.field(default=1.0, validator=_probability)
    code: int = 5000
    http_status: int | None = None
    message: str | None = None
    retry_after: float | None = None
    delay: float = attrs.field(default=0.0, validator=_non_negative)
    body: str | bytes | None = None
    hits: int = 0

    def __attrs_post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {sorted(FAULT_KINDS)}")
        if self.route not in FAULT_ROUTES:
            raise ValueError(f"unknown fault route {self.route!r}; one of {sorted(FAULT_ROUTES)}")
        if self.times is not None and self.times < 0:
            raise ValueError("times must be None or a non-negative count")

    @property
    def exhausted(self) -> bool:
        """True once the fault has applied ``times`` times."""
        return self.times is not None and self.hits >= self.times

    def applies_to(self, route: str, endpoint: str | None) -> bool:
        """Whether a request of ``route`` on ``endpoint`` is one this fault targets."""
        if self.route != "any" and self.route != route:
            return False
        return self.endpoint is None or self.endpoint == endpoint


@attrs.define(kw_only=True, eq=False)
class RecordedRequest:
    """One request as the server saw it, and how it answered.

    ``json`` is the parsed body (``None`` when absent or not JSON); ``http_status``
    and ``code`` are ``None`` when no answer was sent (a dropped connection) and
    ``code`` also when the answer was not a Kling envelope. ``fault`` names the
    injected fault kind that applied, if any. ``arrived_at`` is monotonic seconds
    (:func:`time.monotonic`, the event loop's clock).
    """

    method: str
    path: str
    query: dict[str, str]
    route: Route
    endpoint: str | None
    json: Any = attrs.field(repr=False)
    authorization: str | None = attrs.field(repr=False)
    arrived_at: float
    http_status: int | None = None
    code: int | None = None
    fault: FaultKind | None = None

    @property
    def body(self) -> Any:
        """Alias of :attr:`json`."""
        return self.json

    @property
    def external_task_id(self) -> str | None:
        """The body's ``external_task_id``, if it has one (creates)."""
        if isinstance(self.json, dict):
            value = self.json.get("external_task_id")
            return value if isinstance(value, str) else None
        return None


@attrs.frozen(kw_only=True)
class CallbackRecord:
    """One callback delivery attempt.

    ``delivered`` is true when the receiver answered 2xx. Otherwise ``error``
    says why: the simulated drop, a refused non-loopback host, a connection
    failure, or a non-2xx answer (``http_status`` set). ``attempted_at`` is
    monotonic seconds; ``updated_at`` the delivered task's ``updated_at``, which
    tells a reordered or duplicated update from a fresh one.
    """

    task_id: str
    status: str
    url: str
    delivered: bool
    http_status: int | None
    attempted_at: float
    error: str | None = None
    updated_at: int = 0


def _must(holds: Callable[[Any], bool], message: str) -> Any:
    """A validator raising ``ValueError(message)`` where ``holds(value)`` is false."""

    def check(_instance: object, _attribute: attrs.Attribute[Any], value: object) -> None:
        if not holds(value):
            raise ValueError(message)

    return check


def _paired(instance: ServerOptions, _attribute: attrs.Attribute[Any], value: object) -> None:
    if (instance.access_key is None) != (value is None):
        raise ValueError("access_key and secret_key must be given together")


def _secret_tuple(given: str | Sequence[str] | None) -> tuple[str, ...]:
    return (given,) if isinstance(given, str) else tuple(given or ())


def _whsec(_instance: object, _attribute: attrs.Attribute[Any], value: str) -> None:
    try:
        key = base64.b64decode(value.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if not key:
        # Never the secret itself in the message.
        raise ValueError("a webhook_secret must be 'whsec_' followed by non-empty base64")


# Converters of the options whose default a caller may also ask for with None
# (named functions: mypy's attrs plugin reads their argument types).
def _frozen_models(models: Collection[str] | None) -> frozenset[str] | None:
    return None if models is None else frozenset(models)


def _outcome(
    outcome: Callable[[FakeTask], str | None] | None,
) -> Callable[[FakeTask], str | None]:
    return default_outcome if outcome is None else outcome


def _callback_faults(faults: CallbackFaults | None) -> CallbackFaults:
    return CallbackFaults() if faults is None else faults


def _shapes(shapes: WireShapes | None) -> WireShapes:
    return WireShapes() if shapes is None else shapes


@attrs.frozen(kw_only=True)
class ServerOptions:
    """The options of a :class:`FakeKlingServer`, checked when built.

    Not exported: ``FakeKlingServer(...)`` takes them as keywords, and its
    docstring says what each means. ``None`` for ``outcome``, ``callback_faults``
    and ``shapes`` stands for the default; ``webhook_secrets`` is the
    ``webhook_secret`` keyword, always as a tuple.
    """

    api_key: str | None = None
    access_key: str | None = None
    secret_key: str | None = attrs.field(default=None, validator=_paired)
    clock: Callable[[], float] = time.time
    models: frozenset[str] | None = attrs.field(default=None, converter=_frozen_models)
    processing_delay: float = attrs.field(
        default=0.05,
        validator=_must(lambda delay: delay >= 0, "processing_delay must not be negative"),
    )
    task_duration: float | Callable[[FakeTask], float] | None = 0.2
    outcome: Callable[[FakeTask], str | None] = attrs.field(default=None, converter=_outcome)
    concurrency_limit: int | None = attrs.field(
        default=None,
        validator=_must(
            lambda limit: limit is None or limit >= 1, "concurrency_limit must be at least 1"
        ),
    )
    rate_limit: RateLimit | None = None
    quota_error: int | None = None
    callback_faults: CallbackFaults = attrs.field(default=None, converter=_callback_faults)
    seed: int | None = None
    port: int = 0
    path_prefix: str = attrs.field(
        default="",
        validator=_must(
            lambda prefix: not prefix or (prefix.startswith("/") and not prefix.endswith("/")),
            "path_prefix must start with '/' and not end with one, e.g. '/kling'",
        ),
    )
    record_requests: bool = True
    shapes: WireShapes = attrs.field(default=None, converter=_shapes)
    webhook_secrets: tuple[str, ...] = attrs.field(
        default=(), converter=_secret_tuple, validator=attrs.validators.deep_iterable(_whsec)
    )
    state_file: str | os.PathLike[str] | None = None
    prices: PriceTable = DEFAULT_PRICES
