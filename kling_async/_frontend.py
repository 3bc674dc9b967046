"""What the two front ends, ``kling-async`` (the CLI) and ``kling-async mcp``,
share: the client they open (Kling's, or the offline simulation's), exit codes,
the follow loop, task, error and estimate records, and each request field as
both derive their commands, options, tools and schemas from it.

Neither front end imports the other: both import this module, which needs
nothing beyond the core (no click, no rich, no mcp).
"""

from __future__ import annotations

import asyncio
import contextlib
import types as pytypes
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, Literal, get_args, get_origin, get_type_hints

import attrs

from ._auth import ENV_ACCESS_KEY, ENV_API_KEY, ENV_SECRET_KEY
from ._client import Client
from ._durations import user_cache_dir
from ._endpoints import EndpointDeclaration
from ._exceptions import BudgetExceededError, KlingError, TaskTimeoutError, UnknownPriceError
from ._handle import TaskHandle
from ._image_input import MAX_ASPECT_RATIO, MAX_IMAGE_BYTES, MIN_IMAGE_SIDE, ImageFile
from ._models import (
    MAX_ELEMENT_ID,
    MAX_EXPANSION_RATIO,
    MAX_PROMPT_LENGTH,
    MAX_REFERENCES,
    MAX_SUBJECT_IMAGES,
    N_RANGE,
    SERIES_RANGE,
    Cost,
    Endpoint,
    Task,
    TaskRequest,
    TaskStatus,
)
from ._pricing import Estimate, PriceTable

__all__: list[str] = []

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
#: A budget (``--max-units``) refused a create: nothing was sent for it. Apart
#: from 1, so a script can tell "raise the budget" from "something failed".
EXIT_BUDGET: Final = 3
EXIT_INTERRUPTED: Final = 130
EXIT_TERMINATED: Final = 143  # 128 + SIGTERM, as a shell reports a process it terminated

#: ``kling-async mcp``'s default ``--confirm-above``: a create estimated at more
#: units asks the user first. A few images' worth (one 1k kling-v3 image is 8
#: units), so routine calls go through and a large one (n=9, a 4k series) is the
#: user's decision.
DEFAULT_CONFIRM_ABOVE: Final = Decimal(50)

OFFLINE_NOTICE: Final = (
    "OFFLINE SIMULATION: no Kling API key is set (or --mock was given), so requests go to a "
    "fake Kling server on this machine. Tasks and URLs are simulated and the images are "
    f"placeholder PNGs, not generations. Set {ENV_API_KEY} (or {ENV_ACCESS_KEY} and "
    f"{ENV_SECRET_KEY}) to use Kling."
)


def offline_state_file() -> Path:
    """Where the offline simulation keeps its tasks: the user's cache directory
    (``$XDG_CACHE_HOME``, else the platform's own), ``kling-async/offline-tasks.json``."""
    return user_cache_dir() / "kling-async" / "offline-tasks.json"


@attrs.frozen(kw_only=True)
class Connection:
    """Where a front end's client goes: Kling (a key, a base URL), or the
    offline simulation when ``mock`` or when no credentials are set at all.
    ``task_seconds`` is how long a simulated task runs."""

    api_key: str | None = attrs.field(repr=False)
    base_url: str | None = None
    mock: bool = False
    task_seconds: float = 1.5
    #: Whether KLING_ACCESS_KEY or KLING_SECRET_KEY is set: one of the pair
    #: alone is a mistake to report, not a reason to simulate.
    has_key_pair: bool = False

    @property
    def offline(self) -> bool:
        """Whether the client talks to the embedded fake server."""
        return self.mock or not (self.api_key or self.has_key_pair)

    @contextlib.asynccontextmanager
    async def client(
        self,
        *,
        max_concurrency: int | None = None,
        journal: Path | None = None,
        budget: Decimal | None = None,
        announce: Callable[[str], None],
        warn: Callable[[str], None],
    ) -> AsyncIterator[Client]:
        """A client for Kling, or for an embedded fake server when offline;
        ``budget`` caps what it may spend, in units (``Client(budget=)``);
        ``announce`` receives :data:`OFFLINE_NOTICE` before the simulation
        starts, ``warn`` a failure to keep its tasks for later commands."""
        options: dict[str, Any] = {
            "max_concurrency": max_concurrency,
            "journal": journal,
            "budget": budget,
        }
        if not self.offline:
            async with Client(self.api_key, base_url=self.base_url, **options) as client:
                yield client
            return
        from .testing import FakeKlingServer

        announce(OFFLINE_NOTICE)
        state = offline_state_file()
        server = FakeKlingServer(
            task_duration=self.task_seconds,
            processing_delay=self.task_seconds / 4,
            state_file=state,
        )
        await server.start()
        try:
            async with Client("offline-simulation", base_url=server.url, **options) as client:
                yield client
        finally:
            try:
                await server.close()
            except OSError as error:
                warn(
                    f"the offline simulation could not save its tasks in {state} "
                    f"({error.strerror or error}); later commands will not know them"
                )


# --- following a task -----------------------------------------------------------------


Tick = Callable[[TaskStatus, float], Awaitable[None]]
"""Told the latest status and the seconds waited, while a task runs."""


async def follow(handle: TaskHandle, timeout: float | None, tick: Tick, interval: float) -> Task:
    """Wait up to ``timeout`` seconds for the task to end, calling ``tick`` every
    ``interval`` seconds meanwhile. Returns the terminal task; raises
    :class:`TaskFailedError` or :class:`TaskTimeoutError` as the wait does.
    Cancelled, it stops waiting: the task runs on."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    waiter = asyncio.ensure_future(handle.wait(timeout=timeout))
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=interval)
            if done:
                return waiter.result()
            await tick(handle.status or TaskStatus.SUBMITTED, loop.time() - started)
    finally:
        if not waiter.done():
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)


async def save_images(client: Client, task: Task, out: Path, *, watermarked: bool) -> list[Path]:
    """Save the task's images in ``out``, and their watermarked copies too when
    ``watermarked``; the paths, images first. Files already complete are kept."""
    paths = await client.download(task, out)
    if watermarked:
        paths += await client.download(task, out, watermarked=True)
    return paths


# --- records ---------------------------------------------------------------------------


def _amount(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def cost_record(cost: Cost | None) -> dict[str, Any] | None:
    """What Kling deducted for a task, as JSON-ready data: ``units``, ``quota``
    and ``list_price`` as decimal strings (each ``None`` when Kling did not say);
    ``None`` when it reported no deduction at all (a running task)."""
    if cost is None:
        return None
    return {
        "units": _amount(cost.units),
        "quota": _amount(cost.quota),
        "list_price": _amount(cost.list_price),
    }


def task_record(
    task: Task,
    paths: Sequence[Path] = (),
    *,
    kind: str | None = None,
    estimate: Decimal | None = None,
) -> dict[str, Any]:
    """A task as a result line or a tool result: :meth:`Task.to_dict`, after its
    ``kind`` when given, with its ``cost`` (:func:`cost_record`), its
    ``estimate`` in units when known, and the ``paths`` its images were saved
    at, if any."""
    record: dict[str, Any] = {"kind": kind} if kind is not None else {}
    record.update(task.to_dict())
    record["cost"] = cost_record(task.cost)
    if estimate is not None:
        record["estimate"] = str(estimate)
    if paths:
        record["paths"] = [str(path) for path in paths]
    return record


def cost_line(cost: Cost | None, estimate: Decimal | None) -> str:
    """A task's cost in words, beside its estimate when known."""
    if cost is None or cost.units is None:
        said = "Kling reported no unit deduction"
        if cost is not None and cost.quota is not None:
            said = f"{cost.quota} charged from the balance (list price {cost.list_price})"
    else:
        said = f"{cost.units} units deducted"
    return f"cost: {said}" + (f" (estimated {estimate})" if estimate is not None else "")


def budget_next_step(error: BudgetExceededError, *, raise_with: str) -> str:
    """What to do about a create a budget refused: nothing was sent."""
    left = max(error.budget - error.spent - error.reserved, Decimal(0))
    return (
        f"nothing was sent: the request is estimated at {error.estimate} units and "
        f"{left} of the {error.budget} are left. Raise the budget ({raise_with}) to at "
        f"least {error.spent + error.reserved + error.estimate}, or ask for fewer images"
    )


def describe(error: BaseException) -> str:
    """``error`` in one line, for errors neither front end words itself."""
    if isinstance(error, OSError):
        reason = error.strerror or str(error) or type(error).__name__
        return f"{error.filename}: {reason}" if error.filename else reason
    return str(error) or type(error).__name__


def error_record(error: BaseException, message: str) -> dict[str, Any]:
    """``error`` as data (:meth:`KlingError.to_dict`, or its type), with
    ``message``, the front end's wording, as its message. A wait that ran out
    names the task that runs on and its latest status."""
    record = error.to_dict() if isinstance(error, KlingError) else {"type": type(error).__name__}
    record["message"] = message
    if isinstance(error, BudgetExceededError):
        record.update(
            budget=str(error.budget),
            spent=str(error.spent),
            reserved=str(error.reserved),
            estimate=str(error.estimate),
            budget_name=error.name,
        )
    if isinstance(error, TaskTimeoutError):
        record["task_id"] = error.handle.task_id
        record["status"] = str(error.handle.status or TaskStatus.SUBMITTED)
    return record


def estimate_record(estimate: Estimate) -> dict[str, Any]:
    """An estimate as JSON-ready data; amounts as decimal strings, as Kling writes them."""
    return {
        "units": str(estimate.units),
        "money": str(estimate.money),
        "currency": estimate.currency,
        "images": estimate.images,
    }


@attrs.frozen(kw_only=True)
class Estimates:
    """What a list of requests will cost: each one's :class:`Estimate`, or the
    :class:`UnknownPriceError` saying why the table cannot price it."""

    each: tuple[Estimate | UnknownPriceError, ...]
    table: PriceTable

    @classmethod
    def of(cls, requests: Iterable[TaskRequest], table: PriceTable) -> Estimates:
        """Price every request of ``requests`` with ``table``; sends nothing."""
        each: list[Estimate | UnknownPriceError] = []
        for request in requests:
            try:
                each.append(table.estimate(request))
            except UnknownPriceError as error:
                each.append(error)
        return cls(each=tuple(each), table=table)

    @property
    def unknown(self) -> int:
        """How many requests the table has no price for."""
        return sum(isinstance(item, UnknownPriceError) for item in self.each)

    @property
    def total(self) -> Estimate:
        """The estimates added up (those the table could make)."""
        total = Estimate(units=Decimal(0), money=Decimal(0), currency=self.table.currency, images=0)
        for item in self.each:
            if isinstance(item, Estimate):
                total += item
        return total

    def total_record(self) -> dict[str, Any]:
        """The total as data: ``complete`` is false when a request has no price,
        and then the total counts only the others (it is a lower bound)."""
        return {
            **estimate_record(self.total),
            "requests": len(self.each),
            "unpriced": self.unknown,
            "complete": not self.unknown,
            "prices": f"{self.table.source} ({self.table.as_of.isoformat()})",
        }

    def total_line(self) -> str:
        """The total in words."""
        total = self.total
        line = (
            f"total: {total.units} units (about {total.money} {total.currency}) for "
            f"{total.images} images in {len(self.each)} requests"
        )
        if self.unknown:
            line += f"; {self.unknown} requests have no price, so the total is only a lower bound"
        return f"{line}; prices of {self.table.as_of.isoformat()} ({self.table.source})"


def estimate_line(item: Estimate | UnknownPriceError) -> str:
    """One request's estimate in words, or why there is none."""
    if isinstance(item, UnknownPriceError):
        return f"no estimate: {item}"
    return f"{item.units} units (about {item.money} {item.currency}) for {item.images} images"


# --- request fields, as both front ends offer them --------------------------------------

IMAGE_RULES: Final = (
    f"JPEG or PNG, at most {MAX_IMAGE_BYTES // (1024 * 1024)} MB, each side at least "
    f"{MIN_IMAGE_SIDE} px, aspect ratio between 1:{MAX_ASPECT_RATIO:g} and {MAX_ASPECT_RATIO:g}:1"
)

#: What each request field means, for help texts and tool descriptions. A
#: ``{name}`` is another field, as the front end spells it; ``{forms}`` the forms
#: of an image it takes, ``{rules}`` Kling's rules for images, ``{lookups}`` the
#: commands that find a task by id. A field missing here gets a plain wording.
DESCRIPTIONS: Final[Mapping[str, str]] = {
    "prompt": f"What the images should show (the positive prompt); at most "
    f"{MAX_PROMPT_LENGTH} characters.",
    "negative_prompt": f"What to keep out of the images; at most {MAX_PROMPT_LENGTH} "
    "characters. Not allowed together with {image} (image-to-image mode).",
    "image": "A reference image: {forms}. {rules}. Required when {image_reference} is set.",
    "image_reference": "What to take from {image}: 'subject' (the character's features) or "
    "'face' (the facial appearance; the image must show exactly one face).",
    "image_fidelity": "How strongly the images follow the reference image, 0 to 1 "
    "[default: Kling's].",
    "human_fidelity": "How closely the face follows the reference image's, 0 to 1; matters "
    "with {image_reference} 'subject' [default: Kling's].",
    "element_ids": f"Ids of elements of the account's Kling element library. Elements plus "
    f"reference images: at most {MAX_REFERENCES}.",
    "resolution": "Resolution of the images [default: Kling's, 1k].",
    "n": "How many images to make. Each holds one unit of the account's concurrency quota "
    "while the task runs.",
    "aspect_ratio": "Width:height of the images.",
    "watermark": "Also make watermarked copies (saved beside the images, as "
    "<task_id>_<index>_watermarked.png, or their URLs are each image's watermark_url).",
    "callback_url": "An http(s) URL Kling POSTs each status change of the task to.",
    "external_task_id": "Your own id for the task, unique in the account; {lookups} "
    "accept it in place of the task id.",
    "subject_images": f"1 to {MAX_SUBJECT_IMAGES} subject images, each {{forms}}. {{rules}}. "
    "Kling does not crop them: give them cropped to the subject.",
    "scene_image": "A scene reference image: {forms}. {rules}.",
    "style_image": "A style reference image: {forms}. {rules}.",
    "images": f"Reference images, each {{forms}}; the prompt names them <<<image_1>>>, "
    f"<<<image_2>>>... Images plus elements: at most {MAX_REFERENCES}. {{rules}}.",
    "result_type": "'single' (n images) or 'series' (a set of related images, kling-v3-omni only).",
    "series_amount": "How many images a series makes, 2 to 9, or 'auto' (the model decides; "
    "the quota holds 9 until it ends) [default: 4].",
    "up_expansion_ratio": f"How far to extend the top, as a multiple of the height, 0 to "
    f"{MAX_EXPANSION_RATIO:g}; the new image may be at most 3 times the original's area.",
    "down_expansion_ratio": f"How far to extend the bottom, as a multiple of the height, 0 to "
    f"{MAX_EXPANSION_RATIO:g}.",
    "left_expansion_ratio": f"How far to extend the left side, as a multiple of the width, 0 "
    f"to {MAX_EXPANSION_RATIO:g}.",
    "right_expansion_ratio": f"How far to extend the right side, as a multiple of the width, 0 "
    f"to {MAX_EXPANSION_RATIO:g}.",
    "element_frontal_image": "The subject seen from the front: {forms}. {rules}.",
    "human_image": "The person to dress: {forms}. {rules}.",
    "cloth_image": "The garment (upper, lower or dress): {forms}. {rules}.",
}

#: Per endpoint, the prompt's meaning where it differs from text-to-image's.
PROMPT_DESCRIPTIONS: Final[Mapping[Endpoint, str]] = {
    Endpoint.MULTI_IMAGE: f"What the combined images should show; at most "
    f"{MAX_PROMPT_LENGTH} characters.",
    Endpoint.EXPAND: f"What the extended parts should show; at most {MAX_PROMPT_LENGTH} "
    "characters.",
    Endpoint.OMNI_IMAGE: f"What the images should show, naming reference images as "
    f"<<<image_1>>>... and elements as <<<element_1>>>...; at most {MAX_PROMPT_LENGTH} "
    "characters.",
}


def known_models(request_type: type[TaskRequest]) -> tuple[str, ...]:
    """The model names Kling lists for an endpoint: the ``Literal`` its request
    model's ``model_name`` converter takes (``OmniModel``...), in its order;
    ``()`` for a model without one. The one list is the type editors complete."""
    field = attrs.fields_dict(request_type).get("model_name")
    if field is None or field.converter is None:
        return ()
    hint = get_type_hints(field.converter).get("value")
    names: list[str] = []
    pending = [hint]
    while pending:
        current = pending.pop(0)
        if get_origin(current) is Literal:
            names.extend(str(arg) for arg in get_args(current) if str(arg) not in names)
        else:
            pending.extend(get_args(current))
    return tuple(names)


#: Kling's limits on each field, as the request models check them (JSON schema words).
LIMITS: Final[Mapping[str, Mapping[str, Any]]] = {
    "prompt": {"maxLength": MAX_PROMPT_LENGTH},
    "negative_prompt": {"maxLength": MAX_PROMPT_LENGTH},
    "n": {"minimum": N_RANGE.start, "maximum": N_RANGE.stop - 1},
    "image_fidelity": {"minimum": 0, "maximum": 1},
    "human_fidelity": {"minimum": 0, "maximum": 1},
    "element_ids": {"maxItems": MAX_REFERENCES},
    "images": {"maxItems": MAX_REFERENCES},
    "subject_images": {"minItems": 1, "maxItems": MAX_SUBJECT_IMAGES},
    "series_amount": {"minimum": SERIES_RANGE.start, "maximum": SERIES_RANGE.stop - 1},
    "up_expansion_ratio": {"minimum": 0, "maximum": MAX_EXPANSION_RATIO},
    "down_expansion_ratio": {"minimum": 0, "maximum": MAX_EXPANSION_RATIO},
    "left_expansion_ratio": {"minimum": 0, "maximum": MAX_EXPANSION_RATIO},
    "right_expansion_ratio": {"minimum": 0, "maximum": MAX_EXPANSION_RATIO},
    "model_name": {"minLength": 1},
    "external_task_id": {"minLength": 1},
}
ITEM_LIMITS: Final[Mapping[str, Mapping[str, Any]]] = {
    "element_ids": {"minimum": 0, "maximum": MAX_ELEMENT_ID},
}

#: The order fields are offered in: what a user fills in first, first; a field
#: not listed comes after these, in the model's order.
ORDER: Final = (
    "prompt",
    "subject_images",
    "scene_image",
    "style_image",
    "image",
    "images",
    "element_frontal_image",
    "human_image",
    "cloth_image",
    "up_expansion_ratio",
    "down_expansion_ratio",
    "left_expansion_ratio",
    "right_expansion_ratio",
    "negative_prompt",
    "image_reference",
    "image_fidelity",
    "human_fidelity",
    "element_ids",
    "result_type",
    "n",
    "series_amount",
    "aspect_ratio",
    "resolution",
    "model_name",
    "watermark",
    "callback_url",
    "external_task_id",
)

Scalar = Literal["string", "integer", "number", "boolean"]


@attrs.frozen(kw_only=True)
class RequestField:
    """One field of a request model, as a front end offers it.

    ``scalar`` is the JSON type of the field (of each item when ``many``);
    ``choices`` the values a ``Literal`` allows; ``auto`` whether the string
    ``"auto"`` is accepted beside the integers; ``image`` whether it takes
    images (a path, a URL or base64, as strings); ``default`` the model's
    default when it is a plain value (``None``: none, or Kling's).
    """

    name: str
    scalar: Scalar
    many: bool = False
    required: bool = False
    choices: tuple[str, ...] | None = None
    auto: bool = False
    image: bool = False
    default: str | int | float | None = None
    limits: Mapping[str, Any] = attrs.field(factory=dict)
    item_limits: Mapping[str, Any] = attrs.field(factory=dict)

    def minimum(self) -> float | None:
        """The smallest value allowed, if Kling has a rule."""
        value = self.limits.get("minimum")
        return None if value is None else float(value)

    def maximum(self) -> float | None:
        """The largest value allowed, if Kling has a rule."""
        value = self.limits.get("maximum")
        return None if value is None else float(value)

    def describe(
        self,
        declaration: EndpointDeclaration,
        *,
        spell: Callable[[str], str],
        forms: str,
        lookups: str,
    ) -> str:
        """What the field means, in a front end's words: ``spell`` names other
        fields as it spells them, ``forms`` says how it takes images."""
        if self.name == "model_name":
            known = known_models(declaration.request_type)
            listed = f"; Kling lists {' and '.join(known)}" if known else ""
            return (
                f"The Kling model [default: {self.default}{listed}; any model name the "
                "account has is accepted]."
            )
        template = DESCRIPTIONS.get(self.name)
        if self.name == "prompt":
            template = PROMPT_DESCRIPTIONS.get(declaration.endpoint, template)
        if template is None:
            what = "images" if self.image and self.many else "an image" if self.image else ""
            template = f"{self.name.replace('_', ' ').capitalize()}{': ' if what else '.'}"
            template += f"{what}, {{forms}}." if what else ""
        names = {name: spell(name) for name in ORDER}
        return template.format_map(
            {**names, "forms": forms, "rules": IMAGE_RULES, "lookups": lookups}
        )


def _scalar(annotation: Any) -> tuple[Scalar, tuple[str, ...] | None, bool, bool]:
    """The JSON type, the choices, whether ``"auto"`` is allowed beside integers,
    and whether it is an image, of a field's type (``None`` dropped: an omitted
    field takes its default)."""
    arguments = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, pytypes.UnionType):
        if ImageFile in arguments:  # an image is a string either way: path, URL or base64
            return "string", None, False, True
        literals = [a for a in arguments if typing.get_origin(a) is typing.Literal]
        if int in arguments and literals == arguments[1:] and len(arguments) == 2:
            return "integer", None, typing.get_args(literals[0]) == ("auto",), False
        if len(arguments) == 1:
            return _scalar(arguments[0])
    if origin is typing.Literal and all(isinstance(value, str) for value in arguments):
        return "string", tuple(arguments), False, False
    if isinstance(annotation, type):
        # bool before int: a bool is an int to issubclass.
        for python, json_type in ((bool, "boolean"), (str, "string"), (int, "integer")):
            if issubclass(annotation, python):
                return typing.cast(Scalar, json_type), None, False, False
        if annotation is float:
            return "number", None, False, False
    raise TypeError(f"no front-end type for {annotation!r}")


_fields_cache: dict[type[TaskRequest], tuple[RequestField, ...]] = {}


def request_fields(cls: type[TaskRequest]) -> tuple[RequestField, ...]:
    """The fields of a request model, in :data:`ORDER`, with their types,
    choices, defaults and Kling's limits: what a CLI command's options and an
    MCP tool's schema are made of."""
    cached = _fields_cache.get(cls)
    if cached is not None:
        return cached
    hints = typing.get_type_hints(cls)
    found: list[RequestField] = []
    for field in attrs.fields(cls):
        annotation = hints[field.name]
        many = typing.get_origin(annotation) is tuple
        if many:
            annotation = typing.get_args(annotation)[0]
        scalar, choices, auto, image = _scalar(annotation)
        default = field.default if isinstance(field.default, (str, int, float)) else None
        found.append(
            RequestField(
                name=field.name,
                scalar=scalar,
                many=many,
                required=field.default is attrs.NOTHING,
                choices=choices,
                auto=auto,
                image=image or bool(field.metadata.get("image")),
                default=default,
                limits=LIMITS.get(field.name, {}),
                item_limits=ITEM_LIMITS.get(field.name, {}),
            )
        )
    position = {name: index for index, name in enumerate(ORDER)}
    fields = tuple(sorted(found, key=lambda f: position.get(f.name, len(ORDER))))
    _fields_cache[cls] = fields
    return fields
