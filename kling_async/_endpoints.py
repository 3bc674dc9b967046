"""Every Kling endpoint the SDK speaks, each declared once.

A declaration says what an endpoint is: its path, the request model that
builds (and validates) its body, what kind of result its tasks carry, how many
units of the account's concurrency quota a task holds and from which resource
pack, which features its duration depends on, and the names it goes by in the
client (``client.images.<method>``), the CLI and the MCP server. The rest of
the SDK looks endpoints up here (by path, by request type, by CLI or MCP name)
rather than listing them again, so adding an endpoint is one request model, one
declaration and their tests.

Readings of Kling's documentation the declarations rely on (reference pages
fetched 2026-09-20 into aself101/kling-api, docs/api/):

* Concurrency (get-started/concurrency-rules): an image task holds ``n`` units,
  a virtual try-on (and a video) task one; units are counted per model version
  and resource-pack type. An omni-image series holds one unit per image it
  produces; with ``series_amount="auto"`` that count is known only when the
  task ends, so the SDK holds the documented maximum (9) while it runs and the
  surplus comes back when it ends. It can under-use the quota, never overrun it.
* Outpainting takes ``n`` like the other image endpoints; the page does not say
  its units follow ``n``: inferred. AI multi-shot takes no ``n`` and is billed
  per call: one unit per task is inferred, not documented.
* Virtual try-on has no page in the snapshot: path, models and the two image
  fields agree across a mirror of Kling's older reference and third-party SDKs;
  its result fields (beyond ``images[].url``) and price are unverified.
* Image recognition and account costs are synchronous (no task): see
  :data:`SYNC_ENDPOINTS`. Account costs asks callers to stay at one request a
  second; image recognition documents no limit.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterator, Mapping
from typing import Final

import attrs

from . import _request_bodies  # noqa: F401  (registers the new requests' wire bodies)
from ._models import (
    MAX_SERIES_IMAGES,
    Endpoint,
    ExpandRequest,
    ImageGenerationRequest,
    MultiImageRequest,
    MultiShotRequest,
    OmniImageRequest,
    Task,
    TaskRequest,
    VirtualTryOnRequest,
)
from ._records import records

__all__ = [
    "EndpointDeclaration",
    "QuotaUnits",
    "ResultKind",
    "SyncEndpoint",
    "UnitsRule",
    "declaration_for",
    "declarations",
]


class ResultKind(str, enum.Enum):
    """What a finished task carries (every kind reads into :class:`~kling_async.Task`)."""

    IMAGES = "images"
    """``task_result.images[]``: ``{index, url, watermark_url}``."""
    IMAGES_OR_SERIES = "images_or_series"
    """``images[]`` or, for a series, ``series_images[]`` beside ``result_type``."""
    IMAGE_SETS = "image_sets"
    """``images[]`` of sets ``{index, url_1, url_2, url_3}`` (AI multi-shot)."""


class UnitsRule(str, enum.Enum):
    """How many concurrency-quota units a running task holds."""

    N_WEIGHTED = "n"
    """The request's ``n``: one unit per image asked for."""
    PER_TASK = "task"
    """One unit, whatever the task makes."""
    PER_IMAGE_PRODUCED = "images"
    """One unit per image produced; when that is unknown until the end (an
    ``auto`` series), the documented maximum is held while the task runs."""


@attrs.frozen(kw_only=True)
class QuotaUnits:
    """A declaration's quota rule: ``rule``, the ``maximum`` an unknown count
    holds, and the resource-pack type whose quota it draws on."""

    rule: UnitsRule
    pack: str = "image"
    maximum: int = MAX_SERIES_IMAGES

    def held(self, request: TaskRequest) -> int:
        """The units a task of ``request`` holds from create until it ends."""
        if self.rule is UnitsRule.PER_TASK:
            return 1
        if self.rule is UnitsRule.N_WEIGHTED:
            return request.n
        expected = getattr(request, "expected_images", request.n)
        return self.maximum if expected is None else min(int(expected), self.maximum)

    def used(self, request: TaskRequest, task: Task) -> int:
        """The units ``task`` turned out to need, once finished: what a ledger
        records, and the surplus over :meth:`held` is what an ``auto`` series
        gives back. A failed task needed what it held."""
        held = self.held(request)
        if self.rule is not UnitsRule.PER_IMAGE_PRODUCED or not task.images:
            return held
        return min(len(task.images), held)


#: What changes a task's duration besides its endpoint: (model, images asked
#: for, resolution, reference inputs). ``None`` where the endpoint has no such thing.
DurationFeatures = tuple[str, int, str | None, int]


def _generation_features(request: TaskRequest) -> DurationFeatures:
    assert isinstance(request, ImageGenerationRequest)
    references = len(request.element_ids) + (request.image is not None)
    return (request.model_name, request.n, request.resolution, references)


def _multi_image_features(request: TaskRequest) -> DurationFeatures:
    assert isinstance(request, MultiImageRequest)
    references = (
        len(request.subject_images)
        + (request.scene_image is not None)
        + (request.style_image is not None)
    )
    return (request.model_name, request.n, None, references)


def _omni_features(request: TaskRequest) -> DurationFeatures:
    assert isinstance(request, OmniImageRequest)
    images = request.expected_images
    references = len(request.images) + len(request.element_ids)
    return (
        request.model_name,
        MAX_SERIES_IMAGES if images is None else images,
        request.resolution,
        references,
    )


def _fixed_features(request: TaskRequest) -> DurationFeatures:
    return (request.model_name, request.n, None, 0)


@attrs.frozen(kw_only=True)
class EndpointDeclaration:
    """One Kling task endpoint: everything the SDK derives from it.

    ``endpoint`` is the path under ``/v1/``; ``request_type`` the model that
    validates and builds the create body (its wire form is registered in
    ``_request_bodies``); ``method`` the name of ``client.images.<method>``;
    ``cli_name`` and ``mcp_name`` the CLI command and MCP tool; ``duration_key``
    the name durations are learned under and ``duration_features`` what else
    changes how long a task takes.
    """

    endpoint: Endpoint
    request_type: type[TaskRequest]
    result: ResultKind
    units: QuotaUnits
    method: str
    cli_name: str
    mcp_name: str
    title: str
    duration_key: str
    duration_features: Callable[[TaskRequest], DurationFeatures] = _fixed_features

    @property
    def path(self) -> str:
        """The create (POST) and list (GET) path; a task is at ``path + "/" + id``."""
        return f"/v1/{self.endpoint.value}"


DECLARATIONS: Final[tuple[EndpointDeclaration, ...]] = (
    EndpointDeclaration(
        endpoint=Endpoint.GENERATIONS,
        request_type=ImageGenerationRequest,
        result=ResultKind.IMAGES,
        units=QuotaUnits(rule=UnitsRule.N_WEIGHTED),
        method="generate",
        cli_name="generate",
        mcp_name="generate_image",
        title="Generate images from a prompt (optionally image-referenced)",
        duration_key="images/generations",
        duration_features=_generation_features,
    ),
    EndpointDeclaration(
        endpoint=Endpoint.MULTI_IMAGE,
        request_type=MultiImageRequest,
        result=ResultKind.IMAGES,
        units=QuotaUnits(rule=UnitsRule.N_WEIGHTED),
        method="multi_image",
        cli_name="multi-image",
        mcp_name="multi_image",
        title="Compose images from 1-4 subject images",
        duration_key="images/multi-image2image",
        duration_features=_multi_image_features,
    ),
    EndpointDeclaration(
        endpoint=Endpoint.OMNI_IMAGE,
        request_type=OmniImageRequest,
        result=ResultKind.IMAGES_OR_SERIES,
        units=QuotaUnits(rule=UnitsRule.PER_IMAGE_PRODUCED),
        method="omni_image",
        cli_name="omni-image",
        mcp_name="omni_image",
        title="Generate images or a series with Kling Image O1 / 3.0 Omni",
        duration_key="images/omni-image",
        duration_features=_omni_features,
    ),
    EndpointDeclaration(
        endpoint=Endpoint.EXPAND,
        request_type=ExpandRequest,
        result=ResultKind.IMAGES,
        units=QuotaUnits(rule=UnitsRule.N_WEIGHTED),
        method="expand",
        cli_name="expand",
        mcp_name="expand_image",
        title="Outpaint: extend an image beyond its edges",
        duration_key="images/editing/expand",
    ),
    EndpointDeclaration(
        endpoint=Endpoint.MULTI_SHOT,
        request_type=MultiShotRequest,
        result=ResultKind.IMAGE_SETS,
        units=QuotaUnits(rule=UnitsRule.PER_TASK),
        method="multi_shot",
        cli_name="multi-shot",
        mcp_name="multi_shot",
        title="Infer other angles of a subject from its front view",
        duration_key="general/ai-multi-shot",
    ),
    EndpointDeclaration(
        endpoint=Endpoint.VIRTUAL_TRY_ON,
        request_type=VirtualTryOnRequest,
        result=ResultKind.IMAGES,
        units=QuotaUnits(rule=UnitsRule.PER_TASK, pack="try-on"),
        method="virtual_try_on",
        cli_name="try-on",
        mcp_name="virtual_try_on",
        title="Dress a person in a garment (Kolors virtual try-on)",
        duration_key="images/kolors-virtual-try-on",
    ),
)
"""Every task endpoint, the first two first (as before issue 29)."""


@attrs.frozen(kw_only=True)
class SyncEndpoint:
    """An endpoint answered at once, with no task: ``min_interval`` is the
    spacing in seconds between requests its documentation asks for."""

    name: str
    method: str
    path: str
    cli_name: str
    mcp_name: str
    title: str
    min_interval: float = 0.0


SYNC_ENDPOINTS: Final[Mapping[str, SyncEndpoint]] = {
    "image_recognize": SyncEndpoint(
        name="image_recognize",
        method="POST",
        path="/v1/videos/image-recognize",
        cli_name="recognize",
        mcp_name="recognize_image",
        title="Find subjects, heads, faces and clothing in an image",
    ),
    "account_costs": SyncEndpoint(
        name="account_costs",
        method="GET",
        path="/account/costs",
        cli_name="costs",
        mcp_name="account_costs",
        title="The account's resource packs and what remains of them",
        # "Please note to control the request rate (QPS<=1)".
        min_interval=1.0,
    ),
}


#: The declarations in force: :data:`DECLARATIONS`, plus any a test registers
#: through :func:`_registered`. Every lookup reads this list (a handful of
#: entries, so no index is kept that could go stale).
_REGISTRY: Final[list[EndpointDeclaration]] = list(DECLARATIONS)


@contextlib.contextmanager
def _registered(declaration: EndpointDeclaration) -> Iterator[EndpointDeclaration]:
    """Declare ``declaration`` for the duration of the block (a test hook: it
    shows an endpoint needs nothing beyond its request model and declaration)."""

    def names(d: EndpointDeclaration) -> tuple[object, ...]:
        return (d.endpoint.value, d.request_type, d.method, d.cli_name, d.mcp_name)

    for other in _REGISTRY:
        clash = set(names(other)) & set(names(declaration))
        if clash:
            raise ValueError(f"{sorted(map(str, clash))} declared already")
    _REGISTRY.append(declaration)
    try:
        yield declaration
    finally:
        _REGISTRY.remove(declaration)


def declarations() -> Iterator[EndpointDeclaration]:
    """Every task endpoint's declaration, in :data:`DECLARATIONS` order."""
    return iter(tuple(_REGISTRY))


def declaration_for(endpoint: Endpoint | str) -> EndpointDeclaration:
    """The declaration of ``endpoint`` (a member, or its path under ``/v1/``)."""
    value = endpoint.value if isinstance(endpoint, enum.Enum) else str(endpoint)
    for declaration in _REGISTRY:
        if declaration.endpoint.value == value:
            return declaration
    raise KeyError(f"no Kling endpoint {endpoint!r}")


def endpoint_named(endpoint: Endpoint | str) -> Endpoint:
    """The declared endpoint ``endpoint`` names (a member or its path), as the
    member the rest of the SDK passes around; ``ValueError`` if none is declared."""
    try:
        return declaration_for(endpoint).endpoint
    except KeyError:
        known = ", ".join(d.endpoint.value for d in _REGISTRY)
        raise ValueError(f"{endpoint!r} is not a Kling endpoint; one of {known}") from None


def by_path(path: str) -> EndpointDeclaration:
    """The declaration whose endpoint ``path`` names: ``/v1/images/omni-image``,
    ``images/omni-image`` or a task's path under it (``.../omni-image/<id>``)."""
    relative = path.removeprefix("/").removeprefix("v1/").rstrip("/")
    # Longest first: no path is a prefix of another today, but nothing forbids it.
    for declaration in sorted(_REGISTRY, key=lambda d: -len(d.endpoint.value)):
        value = declaration.endpoint.value
        if relative == value or relative.startswith(value + "/"):
            return declaration
    raise KeyError(f"no Kling endpoint at {path!r}")


def by_request_type(request: TaskRequest | type[TaskRequest]) -> EndpointDeclaration:
    """The declaration of a request model (or of a request's type); a subclass
    of a declared model finds its base's declaration."""
    cls = request if isinstance(request, type) else type(request)
    for klass in cls.__mro__:
        for declaration in _REGISTRY:
            if declaration.request_type is klass:
                return declaration
    raise KeyError(f"{cls.__name__} is not the request model of a declared endpoint")


def by_cli_name(name: str) -> EndpointDeclaration:
    """The declaration whose CLI command is ``name`` (e.g. ``"omni-image"``)."""
    for declaration in _REGISTRY:
        if declaration.cli_name == name:
            return declaration
    raise KeyError(f"no endpoint has the CLI command {name!r}")


def by_mcp_name(name: str) -> EndpointDeclaration:
    """The declaration whose MCP tool is ``name`` (e.g. ``"omni_image"``)."""
    for declaration in _REGISTRY:
        if declaration.mcp_name == name:
            return declaration
    raise KeyError(f"no endpoint has the MCP tool {name!r}")


# A stored endpoint (a journal row, a Redis ledger entry) is read back through
# the declarations, so an entry of any declared endpoint is, not only a member's.
records.register_structure_hook(Endpoint, lambda value, _type: endpoint_named(value))
