"""The data kling_async exchanges with Kling: requests going out, tasks coming back.

Requests are frozen attrs classes checked when built, so an invalid one never
exists, let alone reaches the network. Field names follow Kling's where they are
flat; nested wire shapes get a flat Python spelling (``element_ids`` for
``element_list``, ``watermark`` for ``watermark_info``, ``subject_images`` for
``subject_image_list``) and the converter in ``_wire`` restores them.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, ClassVar, Literal, TypeVar, get_args

import attrs

from ._exceptions import ValidationError
from ._image_input import ImageFile, ImageInput, WireImage, encode_image
from ._urls import is_http_url, redacted_url

__all__ = [
    "AspectRatio",
    "BalanceDeduction",
    "Endpoint",
    "ImageGenerationRequest",
    "ImageModel",
    "ImageReference",
    "ImageResult",
    "MultiImageRequest",
    "Resolution",
    "Task",
    "TaskRequest",
    "TaskStatus",
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
ASPECT_RATIOS: tuple[str, ...] = get_args(AspectRatio)
RESOLUTIONS: tuple[str, ...] = get_args(Resolution)
IMAGE_REFERENCES: tuple[str, ...] = get_args(ImageReference)
#: Kling types element ids as a Java ``long``: a larger id cannot name an element.
MAX_ELEMENT_ID = 2**63 - 1


class Endpoint(str, enum.Enum):
    """The two task families; the value is the path under ``/v1/``."""

    GENERATIONS = "images/generations"
    MULTI_IMAGE = "images/multi-image2image"


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
    raw: Mapping[str, Any] = attrs.field(factory=dict, repr=False, eq=False)

    @property
    def is_terminal(self) -> bool:
        """True once the task has succeeded or failed."""
        return self.status.is_terminal

    def to_dict(self) -> dict[str, Any]:
        """The task as plain, JSON-ready data, e.g. to store it.

        Field names are this class's; ``status`` is Kling's word (``"succeed"``),
        ``created_at``/``updated_at`` ISO 8601 strings in UTC, ``images`` a list
        of ``{"index", "url", "watermark_url"}``. ``raw`` is left out: it is
        already plain data (Kling's own dict).
        """
        from ._wire import converter  # the one converter; _wire builds on this module

        data: dict[str, Any] = converter.unstructure(self)
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


def _multi_image_model(value: ImageModel | None) -> str:
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
    """Fields every Kling image task takes. Use a subclass, not this class."""

    endpoint: ClassVar[Endpoint]

    model_name: str = attrs.field(validator=_model_name)
    n: int = attrs.field(default=1, validator=_image_count)
    aspect_ratio: AspectRatio = attrs.field(default="16:9", validator=_one_of(ASPECT_RATIOS))
    watermark: bool | None = attrs.field(default=None, validator=_optional_bool)
    callback_url: str | None = attrs.field(default=None, validator=_http_url, repr=redacted_url)
    external_task_id: str | None = attrs.field(default=None, validator=_nonempty_string)


@attrs.frozen(kw_only=True)
class ImageGenerationRequest(TaskRequest):
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
class MultiImageRequest(TaskRequest):
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


RequestT = TypeVar("RequestT", bound=TaskRequest)


def build_request(cls: type[RequestT], fields: Mapping[str, Any]) -> RequestT:
    """``cls(**fields)``, leaving out ``None`` values and reporting unknown or
    missing fields as :class:`ValidationError` (not ``TypeError``)."""
    given = {key: value for key, value in fields.items() if value is not None}
    known = {field.name for field in attrs.fields(cls)}
    for key in given:
        if key not in known:
            raise ValidationError(str(key), f"is not a field of {cls.__name__}")
    for field in attrs.fields(cls):
        if field.default is attrs.NOTHING and field.name not in given:
            raise ValidationError(field.name, "is required")
    return cls(**given)


def _whole(value: object) -> object:
    """``value`` as an int if it is a float with no fraction (``2.0``), else as is."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def request_from_mapping(data: Mapping[str, Any]) -> TaskRequest:
    """Build a request from a dict, e.g. a line of a JSONL file.

    A dict with ``subject_images`` (or Kling's ``subject_image_list``) becomes a
    :class:`MultiImageRequest`, anything else an :class:`ImageGenerationRequest`.
    Kling's wire names are accepted beside the SDK's (``element_list``,
    ``watermark_info``, ``subject_image_list``), so a file of raw request bodies
    works. Whole numbers written as floats (``"n": 2.0``) are taken as integers.
    Raises :class:`ValidationError` naming any unknown or invalid field.
    """
    if not isinstance(data, Mapping):
        raise ValidationError("request", f"must be a JSON object, got {type(data).__name__}")
    fields = dict(data)
    wire_lists = {"subject_image_list": "subject_image", "element_list": "element_id"}
    for wire_name, item_key in wire_lists.items():
        if wire_name in fields:
            items = fields.pop(wire_name)
            if not isinstance(items, list):
                raise ValidationError(wire_name, "must be a list")
            sdk_name = "subject_images" if wire_name == "subject_image_list" else "element_ids"
            fields[sdk_name] = [
                item.get(item_key) if isinstance(item, Mapping) else item for item in items
            ]
    if "watermark_info" in fields:
        info = fields.pop("watermark_info")
        fields["watermark"] = info.get("enabled") if isinstance(info, Mapping) else info
    # JSON has one number type: a tool that writes 2.0 for 2 still means 2.
    if "n" in fields:
        fields["n"] = _whole(fields["n"])
    if isinstance(fields.get("element_ids"), list):
        fields["element_ids"] = [_whole(element_id) for element_id in fields["element_ids"]]
    cls: type[TaskRequest] = (
        MultiImageRequest if fields.get("subject_images") is not None else ImageGenerationRequest
    )
    return build_request(cls, fields)


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
