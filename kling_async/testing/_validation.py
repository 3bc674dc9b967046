"""Checks the fake applies to a create request's JSON, as Kling documents them.

Written against the wire format rather than the SDK's request models, so the
fake catches a body the SDK builds wrongly instead of agreeing with it. Only the
image header parser and the image limits are shared with the SDK: they are
facts about file formats, not about our reading of the API.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Collection, Mapping
from typing import Any
from urllib.parse import urlsplit

from kling_async._image_input import MAX_ASPECT_RATIO, MAX_IMAGE_BYTES, MIN_IMAGE_SIDE, sniff_image

from ._protocol import GENERATIONS, MULTI_IMAGE

MAX_PROMPT = 2500
MAX_REFERENCES = 10
MAX_SUBJECT_IMAGES = 4
ASPECT_RATIOS = frozenset({"1:1", "16:9", "4:3", "3:2", "2:3", "3:4", "9:16", "21:9"})
RESOLUTIONS = frozenset({"1k", "2k"})
IMAGE_REFERENCES = frozenset({"subject", "face"})
# Longest base64 text that can decode to MAX_IMAGE_BYTES: anything longer is
# refused without decoding megabytes just to measure them.
_MAX_BASE64_LENGTH = 4 * math.ceil(MAX_IMAGE_BYTES / 3)


class Rejection(Exception):
    """A request Kling would answer with an error ``code`` and ``message``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(field: str, rule: str) -> Rejection:
    """A 1201 naming ``field``."""
    return Rejection(1201, f"invalid parameter {field}: {rule}")


def _given(body: Mapping[str, Any], field: str) -> Any:
    # JSON null is treated as "not given", as optional fields are on Kling.
    return body.get(field)


def _check_text(body: Mapping[str, Any], field: str, *, required: bool) -> None:
    value = _given(body, field)
    if value is None:
        if required:
            raise invalid(field, "is required")
        return
    if not isinstance(value, str):
        raise invalid(field, "must be a string")
    if required and not value.strip():
        raise invalid(field, "must not be empty")
    if len(value) > MAX_PROMPT:
        raise invalid(field, f"must be at most {MAX_PROMPT} characters, got {len(value)}")


def _check_choice(body: Mapping[str, Any], field: str, options: frozenset[str]) -> None:
    value = _given(body, field)
    if value is not None and (not isinstance(value, str) or value not in options):
        raise invalid(field, f"must be one of {', '.join(sorted(options))}, got {value!r}")


def _check_fraction(body: Mapping[str, Any], field: str) -> None:
    value = _given(body, field)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise invalid(field, f"must be a number between 0 and 1, got {value!r}")


def check_image(field: str, value: object) -> None:
    """An http(s) URL, or bare base64 of a JPEG/PNG within Kling's size rules."""
    if not isinstance(value, str) or not value:
        raise invalid(field, "must be an http(s) URL or base64 image data")
    if value.startswith(("http://", "https://")):
        try:
            netloc = urlsplit(value).netloc
        except ValueError:
            netloc = ""
        if not netloc:
            raise invalid(field, "is not a valid http(s) URL")
        return
    if value.startswith("data:"):
        raise invalid(field, "must be bare base64 without a data: prefix")
    if len(value) > _MAX_BASE64_LENGTH:
        raise invalid(field, f"image must be at most {MAX_IMAGE_BYTES} bytes (10 MB)")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(field, "is neither an http(s) URL nor valid base64") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise invalid(field, f"image must be at most {MAX_IMAGE_BYTES} bytes (10 MB)")
    info = sniff_image(data)
    if info is None:
        raise invalid(field, "image must be a JPEG or PNG")
    if min(info.width, info.height) < MIN_IMAGE_SIDE:
        raise invalid(
            field,
            f"image is {info.width}x{info.height}; each side must be at least {MIN_IMAGE_SIDE} px",
        )
    if max(info.width, info.height) / min(info.width, info.height) > MAX_ASPECT_RATIO:
        raise invalid(
            field,
            f"image is {info.width}x{info.height}; aspect ratio must be within 1:2.5..2.5:1",
        )


def check_model(body: Mapping[str, Any]) -> None:
    """``model_name`` is given and a non-empty string."""
    model = _given(body, "model_name")
    if model is None:
        raise invalid("model_name", "is required")
    if not isinstance(model, str) or not model.strip():
        raise invalid("model_name", "must be a non-empty string")


def _check_common(body: Mapping[str, Any], models: Collection[str] | None) -> None:
    check_model(body)
    check_options(body)


def check_options(body: Mapping[str, Any], ratios: frozenset[str] = ASPECT_RATIOS) -> None:
    """The fields most endpoints share: ``n``, ``aspect_ratio`` (one of
    ``ratios``), ``watermark_info``, ``callback_url``, ``external_task_id``."""
    n = _given(body, "n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 9):
        raise invalid("n", f"must be an integer between 1 and 9, got {n!r}")
    _check_choice(body, "aspect_ratio", ratios)
    watermark = _given(body, "watermark_info")
    if watermark is not None and not (
        isinstance(watermark, dict)
        and set(watermark) == {"enabled"}
        and isinstance(watermark["enabled"], bool)
    ):
        raise invalid("watermark_info", 'must be {"enabled": true|false}')
    callback = _given(body, "callback_url")
    if callback is not None:
        try:
            parts = urlsplit(callback) if isinstance(callback, str) else None
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise invalid("callback_url", "must be an http(s) URL")
    external = _given(body, "external_task_id")
    if external is not None and (not isinstance(external, str) or not external.strip()):
        raise invalid("external_task_id", "must be a non-empty string")


def _check_generation(body: Mapping[str, Any]) -> None:
    _check_text(body, "prompt", required=True)
    _check_text(body, "negative_prompt", required=False)
    image = _given(body, "image")
    if image is not None:
        check_image("image", image)
        if _given(body, "negative_prompt") is not None:
            raise invalid("negative_prompt", "is not supported together with image")
    _check_choice(body, "image_reference", IMAGE_REFERENCES)
    if _given(body, "image_reference") is not None and image is None:
        raise invalid("image", "is required when image_reference is set")
    _check_fraction(body, "image_fidelity")
    _check_fraction(body, "human_fidelity")
    elements = _given(body, "element_list")
    if elements is not None:
        if not isinstance(elements, list):
            raise invalid("element_list", 'must be a list of {"element_id": int}')
        for position, element in enumerate(elements):
            element_id = element.get("element_id") if isinstance(element, dict) else None
            if isinstance(element_id, bool) or not isinstance(element_id, int):
                raise invalid(f"element_list[{position}]", 'must be {"element_id": int}')
        references = len(elements) + (image is not None)
        if references > MAX_REFERENCES:
            raise invalid(
                "element_list",
                f"elements plus images must be at most {MAX_REFERENCES}, got {references}",
            )
    _check_choice(body, "resolution", RESOLUTIONS)


def _check_multi_image(body: Mapping[str, Any]) -> None:
    subjects = _given(body, "subject_image_list")
    if subjects is None:
        raise invalid("subject_image_list", "is required")
    if not isinstance(subjects, list) or not 1 <= len(subjects) <= MAX_SUBJECT_IMAGES:
        raise invalid(
            "subject_image_list", f"must be a list of 1 to {MAX_SUBJECT_IMAGES} subject images"
        )
    for position, entry in enumerate(subjects):
        if not isinstance(entry, dict) or "subject_image" not in entry:
            raise invalid(f"subject_image_list[{position}]", 'must be {"subject_image": image}')
        check_image(f"subject_image_list[{position}].subject_image", entry["subject_image"])
    _check_text(body, "prompt", required=False)
    for field in ("scene_image", "style_image"):
        value = _given(body, field)
        if value is not None:
            check_image(field, value)


def validate_create(endpoint: str, body: object, models: Collection[str] | None) -> dict[str, Any]:
    """Return ``body`` as a dict if Kling would accept it on ``endpoint``; else raise
    :class:`Rejection` (1201 for a bad field, 1203 for a model outside ``models``)."""
    if not isinstance(body, dict):
        raise Rejection(1201, "invalid parameter: the request body must be a JSON object")
    if endpoint in (GENERATIONS, MULTI_IMAGE):
        # A second reading of these two pages, against the wire format (see the
        # module's docstring); then the declared model judges the body as for
        # any endpoint.
        _check_common(body, models)
        if endpoint == GENERATIONS:
            _check_generation(body)
        else:
            _check_multi_image(body)
    from ._endpoints import validate_declared  # it builds on this module

    return validate_declared(endpoint, body, models)
