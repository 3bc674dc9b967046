"""The data kling_async exchanges with Kling: requests going out, tasks coming back.

Requests are frozen attrs classes checked when built, so an invalid one never
exists, let alone reaches the network. Field names follow Kling's where they are
flat; nested wire shapes get a flat Python spelling (``element_ids`` for
``element_list``, ``watermark`` for ``watermark_info``, ``subject_images`` for
``subject_image_list``) and the converter in ``_wire`` restores them.
"""

from __future__ import annotations

import difflib
import enum
import json
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar, Literal, TypeVar, get_args

import attrs

from ._exceptions import ValidationError
from ._image_input import ImageFile, ImageInput, WireImage, encode_image
from ._urls import is_http_url, redacted_url

__all__ = [
    "AspectRatio",
    "BalanceDeduction",
    "Cost",
    "Endpoint",
    "ExpandRequest",
    "ImageGenerationRequest",
    "ImageTaskRequest",
    "MultiShotRequest",
    "OmniAspectRatio",
    "OmniImageRequest",
    "OmniModel",
    "OmniResolution",
    "VirtualTryOnRequest",
    "ImageModel",
    "MultiImageModel",
    "ImageReference",
    "ImageResult",
    "MultiImageRequest",
    "Resolution",
    "ResultType",
    "SeriesAmount",
    "Task",
    "TaskRequest",
    "TaskStatus",
    "TryOnModel",
    "request_from_mapping",
]

#: An image field's value once built: in wire form, or a file still to read.
Image = WireImage | ImageFile
#: attrs metadata marking the fields that hold images (the client reads the
#: files among them before sending).
IMAGE_FIELD = {"image": True}

MAX_PROMPT_LENGTH = 2500
MAX_REFERENCES = 10
MAX_SUBJECT_IMAGES = 4
N_RANGE = range(1, 10)
AspectRatio = Literal["1:1", "16:9", "4:3", "3:2", "2:3", "3:4", "9:16", "21:9"]
"""The aspect ratios Kling generates (type checkers and editors know them)."""
Resolution = Literal["1k", "2k"]
ImageReference = Literal["subject", "face"]
ImageModel = (
    Literal["kling-v3", "kling-v2-1", "kling-v2-new", "kling-v2", "kling-v1-5", "kling-v1"] | str
)
"""A model name: the documented ones complete in an editor, and any other
string is still accepted (Kling adds models; an unknown one is Kling's to refuse)."""
MultiImageModel = Literal["kling-v2", "kling-v2-1"] | str
"""The models Kling lists for multi-image-to-image (any other string is still sent)."""
ASPECT_RATIOS: tuple[str, ...] = get_args(AspectRatio)
RESOLUTIONS: tuple[str, ...] = get_args(Resolution)
IMAGE_REFERENCES: tuple[str, ...] = get_args(ImageReference)
#: Kling types element ids as a Java ``long``: a larger id cannot name an element.
MAX_ELEMENT_ID = 2**63 - 1


class Endpoint(str, enum.Enum):
    """Kling's task endpoints; the value is the path under ``/v1/``.

    What each one takes and gives is declared once, in ``kling_async._endpoints``.
    """

    GENERATIONS = "images/generations"
    MULTI_IMAGE = "images/multi-image2image"
    OMNI_IMAGE = "images/omni-image"
    EXPAND = "images/editing/expand"
    MULTI_SHOT = "general/ai-multi-shot"
    VIRTUAL_TRY_ON = "images/kolors-virtual-try-on"


class TaskStatus(str, enum.Enum):
    """A task's lifecycle: ``submitted`` → ``processing`` → ``succeed`` | ``failed``.

    A status Kling adds later parses to a member carrying its value (compare with
    ``==``), and counts as not finished.
    """

    SUBMITTED = "submitted"
    PROCESSING = "processing"
    SUCCEED = "succeed"
    FAILED = "failed"

    @property
    def is_terminal(self) -> bool:
        """True for ``succeed`` and ``failed``: the task will not change again."""
        return self in (TaskStatus.SUCCEED, TaskStatus.FAILED)

    # Kling's word, as in messages and tables: "succeed", not "TaskStatus.SUCCEED"
    # (the str mixin alone gives the latter from str() and, on 3.12+, format()).
    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def _missing_(cls, value: object) -> TaskStatus | None:
        if not isinstance(value, str):
            return None
        member = str.__new__(cls, value)
        member._name_ = value.upper()
        member._value_ = value
        return member


@attrs.frozen(kw_only=True)
class ImageResult:
    """One generated image. ``url`` expires after 30 days on Kling's side."""

    index: int
    url: str
    watermark_url: str | None = None


@attrs.frozen(kw_only=True)
class BalanceDeduction:
    """What a task cost in account balance (Kling's ``final_balance_deduction``),
    as Kling writes the amounts: decimal strings.

    ``quota`` is the price charged (after discounts), ``list_price`` the list price.
    A task paid from a resource pack reports units instead
    (:attr:`Task.final_unit_deduction`).
    """

    quota: str | None = None
    list_price: str | None = None


def _amount(value: object) -> Decimal | None:
    """A deduction Kling wrote as text (``"8"``, ``"0.028"``) as a Decimal;
    ``None`` for anything that is not a finite number (an unreadable billing
    detail must never make a task unreadable)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        amount = Decimal(str(value).strip())
    except (InvalidOperation, ValueError):
        return None
    return amount if amount.is_finite() else None


@attrs.frozen(kw_only=True)
class Cost:
    """What Kling deducted for a task, typed: ``units`` of the resource pack
    (``final_unit_deduction``, or the new design's ``billing[]`` entries of
    ``charge_type`` ``unit``), and from the account balance the price charged
    (``quota``) and its ``list_price``. Each is ``None`` when Kling did not say.
    """

    units: Decimal | None = None
    quota: Decimal | None = None
    list_price: Decimal | None = None

    @classmethod
    def of(cls, units: str | None, balance: BalanceDeduction | None) -> Cost | None:
        """The cost of a task's deduction fields as Kling wrote them; ``None``
        when none of them holds a number."""
        cost = cls(
            units=_amount(units),
            quota=_amount(balance.quota) if balance is not None else None,
            list_price=_amount(balance.list_price) if balance is not None else None,
        )
        return None if cost == _NO_COST else cost


_NO_COST = Cost()


@attrs.frozen(kw_only=True)
class Task:
    """A task as Kling last reported it.

    ``raw`` keeps the whole ``data`` object (or callback body), unknown fields
    included, for anything this class does not model yet. ``final_unit_deduction``
    is what the task cost in resource-pack units, ``final_balance_deduction`` what
    it cost in account balance; either is ``None`` when Kling did not say.
    """

    task_id: str
    status: TaskStatus
    status_message: str | None = None
    images: tuple[ImageResult, ...] = ()
    external_task_id: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    final_unit_deduction: str | None = None
    final_balance_deduction: BalanceDeduction | None = None
    result_type: str | None = None
    raw: Mapping[str, Any] = attrs.field(factory=dict, repr=False, eq=False)

    @property
    def is_terminal(self) -> bool:
        """True once the task has succeeded or failed."""
        return self.status.is_terminal

    @property
    def cost(self) -> Cost | None:
        """What Kling deducted for the task, typed (:class:`Cost`), from either
        result shape; ``None`` when Kling reported no deduction (a running task,
        or an answer without billing fields)."""
        return Cost.of(self.final_unit_deduction, self.final_balance_deduction)

    @property
    def series_images(self) -> tuple[ImageResult, ...]:
        """The images of a series (omni-image ``result_type="series"``), else ``()``.

        They are in :attr:`images` too, which always holds every image a task
        produced, so downloads and stores need not know the result kind.
        """
        return self.images if self.result_type == "series" else ()

    def to_dict(self) -> dict[str, Any]:
        """The task as plain, JSON-ready data, e.g. to store it.

        Field names are this class's; ``status`` is Kling's word (``"succeed"``),
        ``created_at``/``updated_at`` ISO 8601 strings in UTC, ``images`` a list
        of ``{"index", "url", "watermark_url"}``; ``result_type`` only when Kling
        said (omni-image). ``raw`` is left out: it is already plain data (Kling's
        own dict).
        """
        from ._records import records  # _records builds on this module

        data: dict[str, Any] = records.unstructure(self)
        return data

    def to_json(self, *, indent: int | None = None) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)


# --- validators -------------------------------------------------------------------
# Small and explicit rather than attrs' generic ones, so every message names the
# field as the user spelled it and states Kling's rule.


def _encodable(name: str, value: str) -> None:
    """Text must be Unicode that UTF-8 can carry: a lone surrogate ("\\ud800", from
    a mis-decoded file or name) is a legal Python str that neither Kling's JSON
    nor the journal can store."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValidationError(
            name,
            f"holds {value[error.start : error.end]!r} at position {error.start}, which is "
            "not valid Unicode text (a lone surrogate)",
        ) from None


def _text(*, required: bool) -> Any:
    def check(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value is None:
            if required:
                raise ValidationError(attribute.name, "is required")
            return
        if not isinstance(value, str):
            raise ValidationError(attribute.name, f"must be a string, got {type(value).__name__}")
        if required and not value.strip():
            raise ValidationError(attribute.name, "must not be empty")
        if len(value) > MAX_PROMPT_LENGTH:
            raise ValidationError(
                attribute.name,
                f"is {len(value)} characters; Kling accepts at most {MAX_PROMPT_LENGTH}",
            )
        _encodable(attribute.name, value)

    return check


def _one_of(options: Sequence[str]) -> Any:
    def check(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value is not None and value not in options:
            raise ValidationError(
                attribute.name, f"must be one of {', '.join(options)}; got {value!r}"
            )

    return check


def _fraction(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(attribute.name, f"must be a number, got {type(value).__name__}")
    if not 0 <= value <= 1:
        raise ValidationError(attribute.name, f"must be between 0 and 1; got {value!r}")


def _image_count(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(attribute.name, f"must be an integer, got {type(value).__name__}")
    if value not in N_RANGE:
        raise ValidationError(attribute.name, f"must be between 1 and 9; got {value}")


def _nonempty_string(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(attribute.name, "must be a non-empty string")
    _encodable(attribute.name, value)


def _model_name(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    # Never None: Kling refuses "model_name": null (the converters below turn an
    # explicit None into the default before this runs).
    if value is None:
        raise ValidationError(attribute.name, "is required")
    _nonempty_string(_instance, attribute, value)


def _http_url(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not is_http_url(value):
        raise ValidationError(attribute.name, f"must be an http(s) URL; got {redacted_url(value)}")
    if isinstance(value, str):
        _encodable(attribute.name, value)


def _optional_bool(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not isinstance(value, bool):
        raise ValidationError(attribute.name, f"must be true or false; got {value!r}")


# model_name is optional on Kling's side, so None means "the default" here as
# everywhere else in the SDK; the default is sent, never a null.
def _generation_model(value: ImageModel | None) -> str:
    return "kling-v3" if value is None else value


def _multi_image_model(value: MultiImageModel | None) -> str:
    return "kling-v2" if value is None else value


# attrs converters cannot be told which field they convert, hence one per field.
def _image(value: ImageInput | None) -> Image | None:
    return None if value is None else encode_image(value, "image")


def _scene_image(value: ImageInput | None) -> Image | None:
    return None if value is None else encode_image(value, "scene_image")


def _style_image(value: ImageInput | None) -> Image | None:
    return None if value is None else encode_image(value, "style_image")


def _element_ids(value: Iterable[int]) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValidationError("element_ids", "must be a list of integer element ids")
    ids = tuple(value)
    for position, element_id in enumerate(ids):
        if isinstance(element_id, bool) or not isinstance(element_id, int) or element_id < 0:
            raise ValidationError(
                f"element_ids[{position}]", f"must be a non-negative integer; got {element_id!r}"
            )
        if element_id > MAX_ELEMENT_ID:
            raise ValidationError(
                f"element_ids[{position}]",
                f"must be at most {MAX_ELEMENT_ID} (Kling's 64-bit element ids); got {element_id}",
            )
    return ids


def _subject_images(value: Sequence[ImageInput]) -> tuple[Image, ...]:
    if isinstance(value, (str, bytes, bytearray)) or not isinstance(value, Sequence):
        raise ValidationError("subject_images", "must be a list of 1 to 4 images")
    if not 1 <= len(value) <= MAX_SUBJECT_IMAGES:
        raise ValidationError(
            "subject_images", f"must hold 1 to {MAX_SUBJECT_IMAGES} images; got {len(value)}"
        )
    return tuple(
        encode_image(image, f"subject_images[{position}]") for position, image in enumerate(value)
    )


# --- requests ---------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class TaskRequest:
    """Fields every Kling task takes. Use a subclass, not this class.

    ``model_name``, ``n`` and ``watermark`` are read by code that handles any
    request (durations, the limiter, the CLI): an endpoint without such a field
    answers them here (no model, one image's worth, no watermark); the ones that
    have it declare it as a field, which takes precedence.
    """

    endpoint: ClassVar[Endpoint]

    callback_url: str | None = attrs.field(default=None, validator=_http_url, repr=redacted_url)
    external_task_id: str | None = attrs.field(default=None, validator=_nonempty_string)

    @property
    def model_name(self) -> str:
        """The model; ``""`` for an endpoint that names none (Kling picks it)."""
        return ""

    @property
    def n(self) -> int:
        """How many images were asked for; 1 where the endpoint takes no ``n``."""
        return 1

    @property
    def watermark(self) -> bool | None:
        """Whether a watermarked copy was asked for; ``None`` where it cannot be."""
        return None


@attrs.frozen(kw_only=True)
class ImageTaskRequest(TaskRequest):
    """The fields of the first two image endpoints (generations, multi-image)."""

    model_name: str = attrs.field(validator=_model_name)
    n: int = attrs.field(default=1, validator=_image_count)
    aspect_ratio: AspectRatio = attrs.field(default="16:9", validator=_one_of(ASPECT_RATIOS))
    watermark: bool | None = attrs.field(default=None, validator=_optional_bool)
    callback_url: str | None = attrs.field(default=None, validator=_http_url, repr=redacted_url)
    external_task_id: str | None = attrs.field(default=None, validator=_nonempty_string)


@attrs.frozen(kw_only=True)
class ImageGenerationRequest(ImageTaskRequest):
    """A text-to-image (optionally image-referenced) task: ``POST /v1/images/generations``.

    ``image`` takes a path, bytes, an http(s) URL or base64; ``element_ids`` are
    element-library ids (sent as ``element_list``); ``watermark`` asks for a
    watermarked copy too (sent as ``watermark_info``).
    """

    endpoint: ClassVar[Endpoint] = Endpoint.GENERATIONS

    prompt: str = attrs.field(validator=_text(required=True))
    model_name: str = attrs.field(
        default="kling-v3", converter=_generation_model, validator=_model_name
    )
    negative_prompt: str | None = attrs.field(default=None, validator=_text(required=False))
    image: Image | None = attrs.field(default=None, converter=_image, metadata=IMAGE_FIELD)
    image_reference: ImageReference | None = attrs.field(
        default=None, validator=_one_of(IMAGE_REFERENCES)
    )
    image_fidelity: float | None = attrs.field(default=None, validator=_fraction)
    human_fidelity: float | None = attrs.field(default=None, validator=_fraction)
    element_ids: tuple[int, ...] = attrs.field(default=(), converter=_element_ids)
    resolution: Resolution | None = attrs.field(default=None, validator=_one_of(RESOLUTIONS))

    def __attrs_post_init__(self) -> None:
        if self.negative_prompt is not None and self.image is not None:
            raise ValidationError(
                "negative_prompt", "is not supported together with image (image-to-image mode)"
            )
        if self.image_reference is not None and self.image is None:
            raise ValidationError("image", "is required when image_reference is set")
        references = len(self.element_ids) + (self.image is not None)
        if references > MAX_REFERENCES:
            raise ValidationError(
                "element_ids",
                f"elements plus reference images must be at most {MAX_REFERENCES}; "
                f"got {references}",
            )


@attrs.frozen(kw_only=True)
class MultiImageRequest(ImageTaskRequest):
    """A multi-image-to-image task: ``POST /v1/images/multi-image2image``.

    ``subject_images`` holds 1 to 4 images (sent as ``subject_image_list``);
    ``scene_image`` and ``style_image`` are optional references.
    """

    endpoint: ClassVar[Endpoint] = Endpoint.MULTI_IMAGE

    subject_images: tuple[Image, ...] = attrs.field(converter=_subject_images, metadata=IMAGE_FIELD)
    prompt: str | None = attrs.field(default=None, validator=_text(required=False))
    model_name: str = attrs.field(
        default="kling-v2", converter=_multi_image_model, validator=_model_name
    )
    scene_image: Image | None = attrs.field(
        default=None, converter=_scene_image, metadata=IMAGE_FIELD
    )
    style_image: Image | None = attrs.field(
        default=None, converter=_style_image, metadata=IMAGE_FIELD
    )


# --- the endpoints added by issue 29 -----------------------------------------------
# Facts from Kling's reference pages (omni-image, outpainting, AI multi-shot) and
# its image capability map (updated 2026-05-19); virtual try-on from Kling's
# older reference only (see kling_async/_endpoints.py for what is unverified).

OmniModel = Literal["kling-image-o1", "kling-v3-omni"] | str
"""An omni-image model: Kling Image O1 or Kling Image 3.0 Omni (others pass through)."""
OmniResolution = Literal["1k", "2k", "4k"]
OmniAspectRatio = Literal["1:1", "16:9", "4:3", "3:2", "2:3", "3:4", "9:16", "21:9", "auto"]
ResultType = Literal["single", "series"]
SeriesAmount = int | Literal["auto"]
"""2 to 9 images, or ``"auto"``: the model decides how many."""
TryOnModel = Literal["kolors-virtual-try-on-v1", "kolors-virtual-try-on-v1-5"] | str
OMNI_RESOLUTIONS: tuple[str, ...] = get_args(OmniResolution)
OMNI_ASPECT_RATIOS: tuple[str, ...] = get_args(OmniAspectRatio)
RESULT_TYPES: tuple[str, ...] = get_args(ResultType)
SERIES_RANGE = range(2, 10)
#: A series of ``series_amount="auto"`` holds at most this many images (the
#: largest amount Kling lets a caller choose).
MAX_SERIES_IMAGES = 9
DEFAULT_SERIES_AMOUNT = 4
MAX_EXPANSION_RATIO = 2.0
MAX_EXPANDED_AREA = 3.0
#: Prompt references to inputs: ``<<<image_2>>>`` is the second of ``images``.
_PLACEHOLDER = re.compile(r"<<<\s*(image|element)_(\d+)\s*>>>")


@attrs.frozen(kw_only=True)
class OmniCapabilities:
    """What one omni-image model supports, per Kling's capability map."""

    resolutions: tuple[str, ...]
    series: bool
    #: Whether ``aspect_ratio="auto"`` works without reference images or elements.
    auto_ratio_text_to_image: bool


OMNI_CAPABILITIES: Mapping[str, OmniCapabilities] = {
    "kling-image-o1": OmniCapabilities(
        resolutions=("1k", "2k"), series=False, auto_ratio_text_to_image=True
    ),
    "kling-v3-omni": OmniCapabilities(
        resolutions=("1k", "2k", "4k"), series=True, auto_ratio_text_to_image=False
    ),
}
"""Capabilities of the documented omni models; another model name is sent as
given and judged by Kling."""


def _omni_model(value: OmniModel | None) -> str:
    return "kling-image-o1" if value is None else value


def _try_on_model(value: TryOnModel | None) -> str:
    return "kolors-virtual-try-on-v1" if value is None else value


def _omni_images(value: Sequence[ImageInput] | None) -> tuple[Image, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes, bytearray)) or not isinstance(value, Sequence):
        raise ValidationError("images", "must be a list of images")
    return tuple(encode_image(image, f"images[{position}]") for position, image in enumerate(value))


def _required_image(value: ImageInput | None, field: str) -> Image:
    if value is None:
        raise ValidationError(field, "is required")
    return encode_image(value, field)


# attrs converters cannot be told which field they convert, hence one per field.
def _expand_image(value: ImageInput) -> Image:
    return _required_image(value, "image")


def _frontal_image(value: ImageInput) -> Image:
    return _required_image(value, "element_frontal_image")


def _human_image(value: ImageInput) -> Image:
    return _required_image(value, "human_image")


def _cloth_image(value: ImageInput) -> Image:
    return _required_image(value, "cloth_image")


def _series_amount(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None or value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, int) or value not in SERIES_RANGE:
        raise ValidationError(
            attribute.name, f"must be an integer between 2 and 9 or 'auto'; got {value!r}"
        )


def _expansion_ratio(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(attribute.name, f"must be a number, got {type(value).__name__}")
    if not 0 <= value <= MAX_EXPANSION_RATIO:
        raise ValidationError(
            attribute.name, f"must be between 0 and {MAX_EXPANSION_RATIO:g}; got {value!r}"
        )


def _check_placeholders(prompt: str, images: int, elements: int) -> None:
    """Every ``<<<image_N>>>``/``<<<element_N>>>`` of ``prompt`` names an input given."""
    counts = {"image": (images, "images"), "element": (elements, "element_ids")}
    for match in _PLACEHOLDER.finditer(prompt):
        kind, number = match.group(1), int(match.group(2))
        count, field = counts[kind]
        if not 1 <= number <= count:
            given = f"{count} {field}" if count else f"no {field}"
            raise ValidationError(
                "prompt",
                f"refers to {match.group(0)} but the request has {given} "
                f"({kind}_1 is the first of {field})",
            )


@attrs.frozen(kw_only=True)
class OmniImageRequest(TaskRequest):
    """An omni-image task (Kling Image O1, Image 3.0 Omni): ``POST /v1/images/omni-image``.

    ``images`` are reference images (sent as ``image_list``), referred to in the
    prompt as ``<<<image_1>>>``, ``<<<image_2>>>``...; ``element_ids`` are
    element-library ids (``element_list``), at most 10 references in all.
    ``result_type="series"`` (Image 3.0 Omni only) makes ``series_amount`` images
    (2 to 9, default 4, or ``"auto"``) instead of ``n``. ``resolution`` ``4k``
    and series need ``kling-v3-omni``; so does an ``aspect_ratio`` left to Kling
    (``auto``, its default) only when references are given.
    """

    endpoint: ClassVar[Endpoint] = Endpoint.OMNI_IMAGE

    prompt: str = attrs.field(validator=_text(required=True))
    model_name: str = attrs.field(
        default="kling-image-o1", converter=_omni_model, validator=_model_name
    )
    images: tuple[Image, ...] = attrs.field(
        default=(), converter=_omni_images, metadata=IMAGE_FIELD
    )
    element_ids: tuple[int, ...] = attrs.field(default=(), converter=_element_ids)
    resolution: OmniResolution | None = attrs.field(
        default=None, validator=_one_of(OMNI_RESOLUTIONS)
    )
    result_type: ResultType | None = attrs.field(default=None, validator=_one_of(RESULT_TYPES))
    n: int = attrs.field(default=1, validator=_image_count)
    series_amount: SeriesAmount | None = attrs.field(default=None, validator=_series_amount)
    aspect_ratio: OmniAspectRatio | None = attrs.field(
        default=None, validator=_one_of(OMNI_ASPECT_RATIOS)
    )
    watermark: bool | None = attrs.field(default=None, validator=_optional_bool)

    def __attrs_post_init__(self) -> None:
        references = len(self.images) + len(self.element_ids)
        if references > MAX_REFERENCES:
            raise ValidationError(
                "images",
                f"images plus elements must be at most {MAX_REFERENCES}; got {references}",
            )
        _check_placeholders(self.prompt, len(self.images), len(self.element_ids))
        series = self.result_type == "series"
        if series and self.n != 1:
            raise ValidationError(
                "n", "applies to result_type 'single' only; a series counts series_amount"
            )
        if not series and self.series_amount is not None:
            raise ValidationError("series_amount", "applies to result_type 'series' only")
        capabilities = OMNI_CAPABILITIES.get(self.model_name)
        if capabilities is None:
            return
        if self.resolution is not None and self.resolution not in capabilities.resolutions:
            raise ValidationError(
                "resolution",
                f"{self.model_name} supports {', '.join(capabilities.resolutions)}; "
                f"got {self.resolution!r}",
            )
        if series and not capabilities.series:
            supporting = [name for name, c in OMNI_CAPABILITIES.items() if c.series]
            raise ValidationError(
                "result_type",
                f"'series' is not supported by {self.model_name}; use {', '.join(supporting)}",
            )
        if (
            references == 0
            and not capabilities.auto_ratio_text_to_image
            and self.aspect_ratio in (None, "auto")
        ):
            raise ValidationError(
                "aspect_ratio",
                f"{self.model_name} without reference images or elements does not support "
                f"'auto' (Kling's default); choose one of {', '.join(ASPECT_RATIOS)}",
            )

    @property
    def expected_images(self) -> int | None:
        """How many images the task makes; ``None`` when the model decides (``auto``)."""
        if self.result_type != "series":
            return self.n
        if self.series_amount == "auto":
            return None
        return DEFAULT_SERIES_AMOUNT if self.series_amount is None else int(self.series_amount)


@attrs.frozen(kw_only=True)
class ExpandRequest(TaskRequest):
    """An outpainting task: ``POST /v1/images/editing/expand``.

    Each ratio is how far to extend one side, as a multiple of the original's
    height (up, down) or width (left, right), 0 to 2; the new image may be at
    most 3 times the original's area: ``(1 + up + down) * (1 + left + right) <= 3``.
    Kling takes no model name here.
    """

    endpoint: ClassVar[Endpoint] = Endpoint.EXPAND

    image: Image = attrs.field(converter=_expand_image, metadata=IMAGE_FIELD)
    up_expansion_ratio: float = attrs.field(validator=_expansion_ratio)
    down_expansion_ratio: float = attrs.field(validator=_expansion_ratio)
    left_expansion_ratio: float = attrs.field(validator=_expansion_ratio)
    right_expansion_ratio: float = attrs.field(validator=_expansion_ratio)
    prompt: str | None = attrs.field(default=None, validator=_text(required=False))
    n: int = attrs.field(default=1, validator=_image_count)
    watermark: bool | None = attrs.field(default=None, validator=_optional_bool)

    def __attrs_post_init__(self) -> None:
        area = (1 + self.up_expansion_ratio + self.down_expansion_ratio) * (
            1 + self.left_expansion_ratio + self.right_expansion_ratio
        )
        # A hair of tolerance: Kling's own helper rounds ratios to 4 decimals.
        if area > MAX_EXPANDED_AREA + 1e-9:
            raise ValidationError(
                "expansion ratios",
                f"the new image would be {area:.4g} times the original's area; Kling allows "
                f"at most {MAX_EXPANDED_AREA:g}: (1 + up + down) * (1 + left + right) <= 3",
            )


@attrs.frozen(kw_only=True)
class MultiShotRequest(TaskRequest):
    """An AI multi-shot task: ``POST /v1/general/ai-multi-shot``.

    From the front view of a subject, Kling infers other angles: three sets of
    three images per call (``task.images`` lists them set by set). No model, no
    ``n``, no prompt.
    """

    endpoint: ClassVar[Endpoint] = Endpoint.MULTI_SHOT

    element_frontal_image: Image = attrs.field(converter=_frontal_image, metadata=IMAGE_FIELD)


@attrs.frozen(kw_only=True)
class VirtualTryOnRequest(TaskRequest):
    """A Kolors virtual try-on task: ``POST /v1/images/kolors-virtual-try-on``.

    ``human_image`` shows the person, ``cloth_image`` one garment (upper, lower
    or dress); ``kolors-virtual-try-on-v1-5`` also takes an upper + lower
    combination on a white background. Kling checks the garment, not the SDK.
    """

    endpoint: ClassVar[Endpoint] = Endpoint.VIRTUAL_TRY_ON

    human_image: Image = attrs.field(converter=_human_image, metadata=IMAGE_FIELD)
    cloth_image: Image = attrs.field(converter=_cloth_image, metadata=IMAGE_FIELD)
    model_name: str = attrs.field(
        default="kolors-virtual-try-on-v1", converter=_try_on_model, validator=_model_name
    )


RequestT = TypeVar("RequestT", bound=TaskRequest)


def build_request(cls: type[RequestT], fields: Mapping[str, Any]) -> RequestT:
    """``cls(**fields)``, leaving out ``None`` values and reporting unknown or
    missing fields as :class:`ValidationError` (not ``TypeError``)."""
    given = {key: value for key, value in fields.items() if value is not None}
    known, required = _field_names(cls)
    for key in given:
        if key not in known:
            rule = f"is not a field of {cls.__name__}{_did_you_mean(str(key), cls)}"
            raise ValidationError(str(key), rule)
    for name in required:
        if name not in given:
            raise ValidationError(name, "is required")
    return cls(**given)


_field_names_of: dict[type[Any], tuple[frozenset[str], tuple[str, ...]]] = {}


def _field_names(cls: type[Any]) -> tuple[frozenset[str], tuple[str, ...]]:
    """``cls``'s field names, and those of its required fields (in order)."""
    names = _field_names_of.get(cls)
    if names is None:
        fields = attrs.fields(cls)
        required = tuple(field.name for field in fields if field.default is attrs.NOTHING)
        names = _field_names_of[cls] = (frozenset(field.name for field in fields), required)
    return names


def _did_you_mean(name: str, cls: type[TaskRequest]) -> str:
    """``" (did you mean X?)"`` for a misspelt field (``aspectratio``), or one of
    another request's (``subject_image`` for a multi-image request's
    ``subject_images``), naming that request by its command; else ``""``."""
    from ._endpoints import declarations  # they build on this module

    def spelling(field: str) -> str:
        return field.replace("_", "").lower()

    def closest(fields: Collection[str]) -> str | None:
        spelt = {spelling(field): field for field in fields}
        matches = difflib.get_close_matches(spelling(name), spelt, n=1, cutoff=0.8)
        return spelt[matches[0]] if matches else None

    own = closest([field.name for field in attrs.fields(cls)])
    if own is not None:
        return f" (did you mean {own}?)"
    for declaration in declarations():
        other = declaration.request_type
        if other is cls:
            continue
        found = closest([field.name for field in attrs.fields(other)])
        if found is not None:
            return f" (did you mean {found}, of a {declaration.cli_name} request?)"
    return ""


def _whole(value: object) -> object:
    """``value`` as an int if it is a float with no fraction (``2.0``), else as is."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


#: Kling's wire spellings of list fields: (the SDK's name, the key of each item).
_WIRE_LISTS: Mapping[str, tuple[str, str]] = {
    "subject_image_list": ("subject_images", "subject_image"),
    "image_list": ("images", "image"),
    "element_list": ("element_ids", "element_id"),
}


def _request_type(fields: Collection[str], endpoint: object) -> type[TaskRequest]:
    """The request model ``fields`` are for: the named ``endpoint`` (a path under
    ``/v1/``, e.g. ``images/omni-image``, or a CLI name, e.g. ``omni-image``),
    else the one model that has a field no other model has, else text-to-image."""
    from ._endpoints import by_cli_name, by_path, declarations  # they build on this module

    if endpoint is not None:
        if not isinstance(endpoint, str):
            raise ValidationError("endpoint", "must be an endpoint path such as images/omni-image")
        for lookup in (by_path, by_cli_name):
            try:
                return lookup(endpoint).request_type
            except KeyError:
                pass
        known = ", ".join(d.endpoint.value for d in declarations())
        raise ValidationError("endpoint", f"must be one of {known}; got {endpoint!r}")
    owners: dict[str, list[type[TaskRequest]]] = {}
    for declaration in declarations():
        for field in attrs.fields(declaration.request_type):
            owners.setdefault(field.name, []).append(declaration.request_type)
    found = {owners[name][0] for name in fields if len(owners.get(name, ())) == 1}
    if len(found) > 1:
        # Text-to-image is the fallback anyway: its own fields beside another
        # model's are that model's unknown fields, named as such when built.
        found.discard(ImageGenerationRequest)
    if len(found) > 1:
        names = sorted(cls.__name__ for cls in found)
        raise ValidationError(
            "endpoint", f"the fields belong to different requests ({', '.join(names)}); name one"
        )
    return found.pop() if found else ImageGenerationRequest


def request_from_mapping(
    data: Mapping[str, Any], *, endpoint: Endpoint | str | None = None
) -> TaskRequest:
    """Build a request from a dict, e.g. a line of a JSONL file or a stored body.

    The request model is the ``endpoint`` given (argument, or an ``"endpoint"``
    key: ``"images/omni-image"`` or the CLI's ``"omni-image"``); without one,
    the model whose own fields the dict uses (``subject_images`` makes a
    :class:`MultiImageRequest`, ``up_expansion_ratio`` an :class:`ExpandRequest`,
    ...), else an :class:`ImageGenerationRequest`. Kling's wire names are
    accepted beside the SDK's (``element_list``, ``image_list``,
    ``watermark_info``, ``subject_image_list``), so a file of raw request bodies
    works. Whole numbers written as floats (``"n": 2.0``) are taken as integers.
    Raises :class:`ValidationError` naming any unknown or invalid field.
    """
    if not isinstance(data, Mapping):
        raise ValidationError("request", f"must be a JSON object, got {type(data).__name__}")
    fields = dict(data)
    named = fields.pop("endpoint", None)
    if endpoint is None:
        endpoint = named
    for wire_name, (sdk_name, item_key) in _WIRE_LISTS.items():
        if wire_name in fields:
            items = fields.pop(wire_name)
            if not isinstance(items, list):
                raise ValidationError(wire_name, "must be a list")
            fields[sdk_name] = [
                item.get(item_key) if isinstance(item, Mapping) else item for item in items
            ]
    if "watermark_info" in fields:
        info = fields.pop("watermark_info")
        fields["watermark"] = info.get("enabled") if isinstance(info, Mapping) else info
    # JSON has one number type: a tool that writes 2.0 for 2 still means 2.
    for name in ("n", "series_amount"):
        if name in fields:
            fields[name] = _whole(fields[name])
    if isinstance(fields.get("element_ids"), list):
        fields["element_ids"] = [_whole(element_id) for element_id in fields["element_ids"]]
    present = {name for name, value in fields.items() if value is not None}
    return build_request(_request_type(present, endpoint), fields)


_image_field_names: dict[type[TaskRequest], tuple[str, ...]] = {}


def image_fields(cls: type[TaskRequest]) -> tuple[str, ...]:
    """The names of ``cls``'s fields that hold images."""
    names = _image_field_names.get(cls)
    if names is None:
        names = tuple(field.name for field in attrs.fields(cls) if field.metadata.get("image"))
        _image_field_names[cls] = names
    return names


def unread_files(request: TaskRequest) -> bool:
    """Whether ``request`` has an image given as a file not read yet."""
    for name in image_fields(type(request)):
        value = getattr(request, name)
        values = value if isinstance(value, tuple) else (value,)
        if any(isinstance(item, ImageFile) for item in values):
            return True
    return False
