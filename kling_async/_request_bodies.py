"""Wire bodies of the request models added by issue 29, registered on ``_wire``'s converter.

Each is written out by hand: the flat Python spelling (``images``,
``element_ids``, ``watermark``) becomes Kling's nested one (``image_list``,
``element_list``, ``watermark_info``) and an unset field is left out, so Kling
applies its documented default. Importing this module registers them;
``_endpoints`` and ``_resources`` do.

:func:`request_from_body` goes the other way, for any declared request model:
the fake server reads a create's body back into the model, so the model's own
validators judge it and a new endpoint needs no checks written for the fake.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, TypeVar

import attrs

from ._exceptions import ValidationError
from ._image_input import ImageFile, WireImage, encode_image
from ._models import (
    ExpandRequest,
    MultiShotRequest,
    OmniImageRequest,
    TaskRequest,
    VirtualTryOnRequest,
    build_request,
    image_fields,
)
from ._wire import converter

RequestT = TypeVar("RequestT", bound=TaskRequest)


def _common(request: TaskRequest, body: dict[str, Any]) -> dict[str, Any]:
    """``body`` with the fields every task takes, those set only."""
    if request.callback_url is not None:
        body["callback_url"] = request.callback_url
    if request.external_task_id is not None:
        body["external_task_id"] = request.external_task_id
    return body


def _watermark(body: dict[str, Any], enabled: bool | None) -> None:
    if enabled is not None:
        body["watermark_info"] = {"enabled": enabled}


def omni_image_body(request: OmniImageRequest) -> dict[str, Any]:
    """``POST /v1/images/omni-image``'s body. ``n`` goes out for a single result
    and ``series_amount`` for a series (each is ignored by Kling in the other)."""
    body: dict[str, Any] = {"model_name": request.model_name, "prompt": request.prompt}
    if request.images:
        body["image_list"] = [{"image": str(image)} for image in request.images]
    if request.element_ids:
        body["element_list"] = [{"element_id": element} for element in request.element_ids]
    if request.resolution is not None:
        body["resolution"] = request.resolution
    if request.result_type is not None:
        body["result_type"] = request.result_type
    if request.result_type == "series":
        if request.series_amount is not None:
            body["series_amount"] = request.series_amount
    else:
        body["n"] = request.n
    if request.aspect_ratio is not None:
        body["aspect_ratio"] = request.aspect_ratio
    _watermark(body, request.watermark)
    return _common(request, body)


def expand_body(request: ExpandRequest) -> dict[str, Any]:
    """``POST /v1/images/editing/expand``'s body: the four ratios always."""
    body: dict[str, Any] = {
        "image": str(request.image),
        "up_expansion_ratio": request.up_expansion_ratio,
        "down_expansion_ratio": request.down_expansion_ratio,
        "left_expansion_ratio": request.left_expansion_ratio,
        "right_expansion_ratio": request.right_expansion_ratio,
        "n": request.n,
    }
    if request.prompt is not None:
        body["prompt"] = request.prompt
    _watermark(body, request.watermark)
    return _common(request, body)


def multi_shot_body(request: MultiShotRequest) -> dict[str, Any]:
    """``POST /v1/general/ai-multi-shot``'s body."""
    return _common(request, {"element_frontal_image": str(request.element_frontal_image)})


def virtual_try_on_body(request: VirtualTryOnRequest) -> dict[str, Any]:
    """``POST /v1/images/kolors-virtual-try-on``'s body."""
    body = {
        "model_name": request.model_name,
        "human_image": str(request.human_image),
        "cloth_image": str(request.cloth_image),
    }
    return _common(request, body)


def plain_body(request: TaskRequest) -> dict[str, Any]:
    """The body of a request model with no hook of its own: its fields under
    their own names, unset ones left out (as every hand-written body does), so
    a new endpoint whose wire names are its fields' needs no body code."""
    return {
        field.name: str(value) if isinstance(value, WireImage) else converter.unstructure(value)
        for field in attrs.fields(type(request))
        if (value := getattr(request, field.name)) is not None
    }


def _without_own_hook(cls: type) -> bool:
    return (
        isinstance(cls, type)
        and issubclass(cls, TaskRequest)
        and cls not in (ExpandRequest, MultiShotRequest, OmniImageRequest, VirtualTryOnRequest)
    )


converter.register_unstructure_hook(OmniImageRequest, omni_image_body)
converter.register_unstructure_hook(ExpandRequest, expand_body)
converter.register_unstructure_hook(MultiShotRequest, multi_shot_body)
converter.register_unstructure_hook(VirtualTryOnRequest, virtual_try_on_body)
# Registered last and matched by predicate: the hooks registered for a class
# (here and in ``_wire``) are looked up first.
converter.register_unstructure_hook_func(_without_own_hook, plain_body)


#: Kling's nested spellings of flat fields, the same for every endpoint that
#: has them: wire name -> (field name, key of each item). ``None`` as the key:
#: a one-key object rather than a list of them (``watermark_info``).
WIRE_NAMES: Final[Mapping[str, tuple[str, str | None]]] = {
    "image_list": ("images", "image"),
    "element_list": ("element_ids", "element_id"),
    "subject_image_list": ("subject_images", "subject_image"),
    "watermark_info": ("watermark", "enabled"),
}
_FIELD_WIRE_NAMES: Final = {field: wire for wire, (field, _key) in WIRE_NAMES.items()}


def wire_name(field: str) -> str:
    """The name a request model's ``field`` goes by in a body (``images`` ->
    ``image_list``); most fields keep theirs."""
    return _FIELD_WIRE_NAMES.get(field, field)


def _unnest(wire: str, value: Any) -> Any:
    """A nested wire value as the flat field takes it; a shape that is not the
    documented one is a :class:`ValidationError` naming the wire field."""
    _field, key = WIRE_NAMES[wire]
    if wire == "watermark_info":
        if not isinstance(value, dict) or set(value) - {"enabled"}:
            raise ValidationError(wire, 'must be {"enabled": true|false}')
        return value.get("enabled")
    if not isinstance(value, list):
        raise ValidationError(wire, f'must be a list of {{"{key}": ...}}')
    items = []
    for position, item in enumerate(value):
        if not isinstance(item, dict) or set(item) != {key}:
            raise ValidationError(f"{wire}[{position}]", f'must be {{"{key}": ...}}')
        items.append(item[key])
    return items


def _wire_image(field: str, value: Any) -> WireImage:
    """An image as a body carries it: a URL or base64, never a path to read
    (the reader of a body does no I/O, and Kling has no files of ours)."""
    image = encode_image(value, field)
    if isinstance(image, ImageFile):
        raise ValidationError(field, "must be an image URL or base64 of a JPEG or PNG")
    return image


def request_from_body(request_type: type[RequestT], body: Mapping[str, Any]) -> RequestT:
    """The request of ``request_type`` whose wire body is ``body``: the inverse
    of the body hooks above (and of cattrs' plain one), so the model's own
    validators judge a body. Unknown, misshapen or invalid fields raise
    :class:`ValidationError` naming the field as the body spells it."""
    fields: dict[str, Any] = {}
    for wire, value in body.items():
        if wire in WIRE_NAMES and wire_name(WIRE_NAMES[wire][0]) == wire:
            name = WIRE_NAMES[wire][0]
            fields[name] = None if value is None else _unnest(wire, value)
        else:
            fields[wire] = value
    images = set(image_fields(request_type))
    try:
        for name in images & set(fields):
            value = fields[name]
            if isinstance(value, list):
                fields[name] = [
                    _wire_image(f"{name}[{position}]", item) for position, item in enumerate(value)
                ]
            elif value is not None:
                fields[name] = _wire_image(name, value)
        if request_type is OmniImageRequest and fields.get("result_type") == "series":
            # n goes out only for a single result (see omni_image_body).
            fields.pop("n", None)
        return build_request(request_type, fields)
    except ValidationError as error:
        head, dot, rest = error.field.partition("[")
        raise ValidationError(wire_name(head) + dot + rest, error.rule) from None
