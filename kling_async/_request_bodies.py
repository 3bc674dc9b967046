"""Wire bodies of the request models added by issue 29, registered on ``_wire``'s converter.

:func:`plain_body` writes any request model: the flat Python spelling
(``images``, ``element_ids``, ``watermark``) becomes Kling's nested one
(``image_list``, ``element_list``, ``watermark_info``) and an unset field is
left out, so Kling applies its documented default. Only omni-image has a body
of its own (``n`` or ``series_amount``, by result type). Importing this module
registers them; ``_endpoints`` and ``_resources`` do.

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
    OmniImageRequest,
    TaskRequest,
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
    and ``series_amount`` for a series (each is ignored by Kling in the other):
    the one rule :func:`plain_body` cannot say, hence a hook of its own."""
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


def _nest(wire: str, value: Any) -> Any:
    _field, key = WIRE_NAMES[wire]
    if wire == "watermark_info":
        return {key: value}
    return [{key: str(item) if isinstance(item, WireImage) else item} for item in value]


def plain_body(request: TaskRequest) -> dict[str, Any]:
    """The body of a request model with no hook of its own: its fields, nested
    and renamed as :data:`WIRE_NAMES` says (``watermark`` -> ``watermark_info``),
    unset and empty ones left out so Kling applies its documented defaults. A new
    endpoint whose fields follow Kling's conventions needs no body code."""
    body: dict[str, Any] = {}
    for field in attrs.fields(type(request)):
        value = getattr(request, field.name)
        if value is None or value == ():
            continue
        wire = wire_name(field.name)
        if wire in WIRE_NAMES:
            body[wire] = _nest(wire, value)
        elif isinstance(value, WireImage):
            body[wire] = str(value)
        else:
            body[wire] = converter.unstructure(value)
    return body


def _without_own_hook(cls: type) -> bool:
    return isinstance(cls, type) and issubclass(cls, TaskRequest) and cls is not OmniImageRequest


converter.register_unstructure_hook(OmniImageRequest, omni_image_body)
# Matched by predicate, so the hooks registered for a class (generations and
# multi-image, in ``_wire``) are looked up first.
converter.register_unstructure_hook_func(_without_own_hook, plain_body)
