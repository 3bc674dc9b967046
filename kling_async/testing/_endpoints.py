"""The fake's side of the endpoints: which it serves, how it judges a create,
the units a task holds, the shape of its results, and the two synchronous ones.

Everything here follows the SDK's declarations (``kling_async._endpoints``): the
paths served, the model a body is read back into (so the request model's own
validators refuse a bad field, with Kling's 1201 naming it), the units a task
holds, and the result shape its :class:`ResultKind` says. A new declaration is
served with no code here.

Kept per endpoint, on purpose: :data:`WIRE_CHECKS`, a second reading of the
reference pages written against the wire format rather than the request models,
run before the body is read back. A body the SDK builds wrongly (a misspelt
nesting, a rule the model enforces too loosely) would be accepted by a
validator it shares with the SDK; these catch it. They are optional: an
endpoint without one is judged by its model alone.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from typing import Any, Final

import attrs

from kling_async._endpoints import (
    SYNC_ENDPOINTS,
    EndpointDeclaration,
    ResultKind,
    UnitsRule,
    declarations,
)
from kling_async._exceptions import ValidationError
from kling_async._request_bodies import request_from_body

from ._http import Reply, error, ok
from ._protocol import EXPAND, MULTI_SHOT, OMNI_IMAGE, VIRTUAL_TRY_ON
from ._validation import (
    ASPECT_RATIOS,
    MAX_PROMPT,
    MAX_REFERENCES,
    Rejection,
    check_image,
    check_model,
    check_options,
    invalid,
)

OMNI_MODELS: Final = {
    # model: (resolutions, series supported, "auto" ratio without references)
    "kling-image-o1": (frozenset({"1k", "2k"}), False, True),
    "kling-v3-omni": (frozenset({"1k", "2k", "4k"}), True, False),
}
OMNI_RATIOS: Final = frozenset({"1:1", "16:9", "4:3", "3:2", "2:3", "3:4", "9:16", "21:9", "auto"})
TRY_ON_MODELS: Final = frozenset({"kolors-virtual-try-on-v1", "kolors-virtual-try-on-v1-5"})
#: How many images an ``auto`` series makes here (Kling's model decides; 2..9).
AUTO_SERIES_IMAGES: Final = 3
#: AI multi-shot: three sets of three angles per call.
MULTI_SHOT_SETS: Final = 3
MULTI_SHOT_ANGLES: Final = 3
_PLACEHOLDER: Final = re.compile(r"<<<\s*(image|element)_(\d+)\s*>>>")


def _text(body: Mapping[str, Any], field: str, *, required: bool) -> None:
    value = body.get(field)
    if value is None:
        if required:
            raise invalid(field, "is required")
        return
    if not isinstance(value, str) or (required and not value.strip()):
        raise invalid(field, "must be a non-empty string" if required else "must be a string")
    if len(value) > MAX_PROMPT:
        raise invalid(field, f"must be at most {MAX_PROMPT} characters, got {len(value)}")


def _list_of(body: Mapping[str, Any], field: str, key: str) -> list[Any]:
    value = body.get(field)
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid(field, f'must be a list of {{"{key}": ...}}')
    items = []
    for position, item in enumerate(value):
        if not isinstance(item, dict) or key not in item:
            raise invalid(f"{field}[{position}]", f'must be {{"{key}": ...}}')
        items.append(item[key])
    return items


def _check_omni(body: dict[str, Any]) -> None:
    model = body.get("model_name", "kling-image-o1")
    if not isinstance(model, str) or not model.strip():
        raise invalid("model_name", "must be a non-empty string")
    _text(body, "prompt", required=True)
    images = _list_of(body, "image_list", "image")
    for position, image in enumerate(images):
        check_image(f"image_list[{position}].image", image)
    elements = _list_of(body, "element_list", "element_id")
    for position, element in enumerate(elements):
        if isinstance(element, bool) or not isinstance(element, int):
            raise invalid(f"element_list[{position}]", 'must be {"element_id": int}')
    if len(images) + len(elements) > MAX_REFERENCES:
        raise invalid("image_list", f"images plus elements must be at most {MAX_REFERENCES}")
    for match in _PLACEHOLDER.finditer(body["prompt"]):
        count = len(images) if match.group(1) == "image" else len(elements)
        if not 1 <= int(match.group(2)) <= count:
            raise invalid("prompt", f"{match.group(0)} refers to no input")
    result_type = body.get("result_type", "single")
    if result_type not in ("single", "series"):
        raise invalid("result_type", "must be one of series, single")
    amount = body.get("series_amount")
    if amount not in (None, "auto") and (
        isinstance(amount, bool) or not isinstance(amount, int) or not 2 <= amount <= 9
    ):
        raise invalid("series_amount", "must be an integer between 2 and 9 or auto")
    ratio = body.get("aspect_ratio")
    resolution = body.get("resolution")
    capabilities = OMNI_MODELS.get(model)
    if capabilities is None:
        if resolution is not None and resolution not in ("1k", "2k", "4k"):
            raise invalid("resolution", "must be one of 1k, 2k, 4k")
        return
    resolutions, series, auto_text = capabilities
    if resolution is not None and resolution not in resolutions:
        raise invalid("resolution", f"{model} supports {', '.join(sorted(resolutions))}")
    if result_type == "series" and not series:
        raise invalid("result_type", f"series is not supported by {model}")
    if not auto_text and not images and not elements and ratio in (None, "auto"):
        raise invalid("aspect_ratio", f"auto is not supported by {model} text-to-image")


def _check_expand(body: dict[str, Any]) -> None:
    if body.get("image") is None:
        raise invalid("image", "is required")
    check_image("image", body["image"])
    ratios = []
    for side in ("up", "down", "left", "right"):
        field = f"{side}_expansion_ratio"
        value = body.get(field)
        if value is None:
            raise invalid(field, "is required")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 2:
            raise invalid(field, "must be a number between 0 and 2")
        ratios.append(float(value))
    up, down, left, right = ratios
    if (1 + up + down) * (1 + left + right) > 3 + 1e-9:
        raise invalid("expansion_ratio", "the new image must not exceed 3 times the original area")
    _text(body, "prompt", required=False)


def _check_multi_shot(body: dict[str, Any]) -> None:
    if body.get("element_frontal_image") is None:
        raise invalid("element_frontal_image", "is required")
    check_image("element_frontal_image", body["element_frontal_image"])


def _check_try_on(body: dict[str, Any]) -> None:
    model = body.get("model_name", "kolors-virtual-try-on-v1")
    if model not in TRY_ON_MODELS:
        raise Rejection(1203, f"model not found: {model}")
    for field in ("human_image", "cloth_image"):
        if body.get(field) is None:
            raise invalid(field, "is required")
        check_image(field, body[field])


def endpoints() -> tuple[str, ...]:
    """The paths (under ``/v1/``) of every declared task endpoint, read when
    asked, so an endpoint declared after import is served too."""
    return tuple(declaration.endpoint.value for declaration in declarations())


def declaration_at(endpoint: str) -> EndpointDeclaration:
    """The declaration of the endpoint at ``endpoint`` (a path under ``/v1/``)."""
    for declaration in declarations():
        if declaration.endpoint.value == endpoint:
            return declaration
    raise KeyError(endpoint)


def _omni_wire(body: dict[str, Any]) -> None:
    check_options(body, OMNI_RATIOS)
    if body.get("model_name") is not None:
        check_model(body)
    _check_omni(body)


def _options_then(check: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def checked(body: dict[str, Any]) -> None:
        check_options(body, ASPECT_RATIOS)
        check(body)

    return checked


#: The second, wire-format reading of an endpoint's page (see the module's
#: docstring); generations and multi-image keep theirs in ``_validation``.
WIRE_CHECKS: Final[Mapping[str, Callable[[dict[str, Any]], None]]] = {
    OMNI_IMAGE: _omni_wire,
    EXPAND: _options_then(_check_expand),
    MULTI_SHOT: _options_then(_check_multi_shot),
    VIRTUAL_TRY_ON: _options_then(_check_try_on),
}


def _has_field(declaration: EndpointDeclaration, name: str) -> bool:
    return name in attrs.fields_dict(declaration.request_type)


def validate_declared(
    endpoint: str, body: dict[str, Any], models: Collection[str] | None
) -> dict[str, Any]:
    """``body`` if Kling would accept it on ``endpoint``; else :class:`Rejection`:
    the endpoint's wire check if it has one, then the body read back into its
    declared request model (1201 naming the field), then the account's models
    (1203) for an endpoint that takes a model."""
    declaration = declaration_at(endpoint)
    check = WIRE_CHECKS.get(endpoint)
    if check is not None:
        check(body)
    try:
        request = request_from_body(declaration.request_type, body)
    except ValidationError as refused:
        raise invalid(refused.field, refused.rule) from None
    if _has_field(declaration, "model_name") and models is not None:
        # Judged as the body names it: the account's list is Kling's spelling.
        del request
        if body.get("model_name") is not None and body["model_name"] not in models:
            raise Rejection(1203, f"model not found: {body['model_name']}")
    return body


def units_of(endpoint: str, body: Mapping[str, Any]) -> int:
    """The quota units (and images) a task of ``endpoint`` created with ``body``
    holds, by its declaration's rule; a series Kling sizes itself (``auto``)
    makes :data:`AUTO_SERIES_IMAGES` here."""
    declaration = declaration_at(endpoint)
    try:
        request = request_from_body(declaration.request_type, body)
    except ValidationError:  # a body a fault let through: Kling's n, or one
        n = body.get("n")
        return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
    unknown = getattr(request, "expected_images", request.n) is None
    if declaration.units.rule is UnitsRule.PER_IMAGE_PRODUCED and unknown:
        return AUTO_SERIES_IMAGES
    return declaration.units.held(request)


def _series(endpoint: str, body: Mapping[str, Any]) -> bool:
    result = declaration_at(endpoint).result
    return result is ResultKind.IMAGES_OR_SERIES and body.get("result_type") == "series"


def _image_sets(endpoint: str) -> bool:
    return declaration_at(endpoint).result is ResultKind.IMAGE_SETS


def result_images(endpoint: str, images: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The result list of a task, from one entry per file (``_files``' shape):
    an endpoint whose results are image sets groups them ``{index, url_1, url_2, url_3}``."""
    if not _image_sets(endpoint):
        return images
    sets = []
    for number in range(len(images) // MULTI_SHOT_ANGLES):
        angles = images[number * MULTI_SHOT_ANGLES : (number + 1) * MULTI_SHOT_ANGLES]
        entry: dict[str, Any] = {"index": number}
        entry.update({f"url_{k + 1}": angle["url"] for k, angle in enumerate(angles)})
        sets.append(entry)
    return sets


def watermarks(endpoint: str) -> bool:
    """Whether ``endpoint`` makes watermarked copies when asked: whether its
    request model takes ``watermark``."""
    return _has_field(declaration_at(endpoint), "watermark")


def file_count(endpoint: str, units: int) -> int:
    """How many result files a task of ``endpoint`` holding ``units`` makes."""
    if _image_sets(endpoint):
        return MULTI_SHOT_SETS * MULTI_SHOT_ANGLES
    return units


def task_result(endpoint: str, body: Mapping[str, Any], images: list[Any]) -> dict[str, Any]:
    """``task_result`` as the endpoint's result kind shows it."""
    if declaration_at(endpoint).result is ResultKind.IMAGES_OR_SERIES:
        if _series(endpoint, body):
            return {"result_type": "series", "images": [], "series_images": images}
        return {"result_type": "single", "images": images, "series_images": []}
    return {"images": images}


def outputs(endpoint: str, body: Mapping[str, Any], images: list[Any]) -> list[dict[str, Any]]:
    """The new-design ``outputs[]`` of a task's images: sets flattened, series
    images carrying their ``group_id``."""
    series = _series(endpoint, body)
    found: list[dict[str, Any]] = []
    for image in images:
        urls = [image[key] for key in ("url", "url_1", "url_2", "url_3") if key in image]
        for url in urls:
            output: dict[str, Any] = {"type": "image", "url": url}
            if "watermark_url" in image:
                output["watermark_url"] = image["watermark_url"]
            if series:
                output["group_id"] = "series-0"
            found.append(output)
    return found


# --- synchronous endpoints -------------------------------------------------------------

_RECOGNIZE: Final = SYNC_ENDPOINTS["image_recognize"]
_COSTS: Final = SYNC_ENDPOINTS["account_costs"]
RECOGNIZE_PATH: Final = _RECOGNIZE.path.removeprefix("/v1/")
COSTS_PATH: Final = _COSTS.path.removeprefix("/")
#: Kling's account-costs page: "control the request rate (QPS<=1)".
COSTS_MIN_INTERVAL: Final = _COSTS.min_interval
RECOGNIZED_TYPES: Final = ("object_seg", "head_seg", "face_seg", "cloth_seg")


def sync_path(method: str, raw_path: str, prefix: str) -> str | None:
    """The synchronous endpoint a request names, if any."""
    for sync, relative in ((_RECOGNIZE, RECOGNIZE_PATH), (_COSTS, COSTS_PATH)):
        if method == sync.method and raw_path == prefix + sync.path:
            return relative
    return None


@attrs.define
class SyncEndpoints:
    """The answers of image recognition and account costs; account costs refuses
    a request less than :data:`COSTS_MIN_INTERVAL` after the last one with 1302,
    as a rate-limited Kling would."""

    clock: Callable[[], float] = time.monotonic
    _last_costs: float | None = None

    def answer(self, path: str, body: object, query: Mapping[str, str], origin: str) -> Reply:
        """The reply to an authenticated request for ``path``; result files are
        named under ``origin``."""
        try:
            if path == RECOGNIZE_PATH:
                return self._recognize(body, origin)
            return self._costs(query)
        except Rejection as rejection:
            return error(rejection.code, rejection.message)

    def _recognize(self, body: object, origin: str) -> Reply:
        if not isinstance(body, dict) or body.get("image") is None:
            raise invalid("image", "is required")
        check_image("image", body["image"])
        token = uuid.uuid4().hex
        images = [
            {"type": kind, "is_contain": True, "url": f"{origin}/results/{token}/{kind}.png"}
            for kind in RECOGNIZED_TYPES
        ]
        data = {
            "final_unit_deduction": "0.1",
            "final_balance_deduction": {"quota": "0", "list_price": "0"},
            "task_result": {"images": images},
        }
        return ok(json.dumps(data))

    def _costs(self, query: Mapping[str, str]) -> Reply:
        now = self.clock()
        if self._last_costs is not None and now - self._last_costs < COSTS_MIN_INTERVAL:
            return error(1302, "request rate over the limit (account costs: QPS <= 1)")
        self._last_costs = now
        times = []
        for name in ("start_time", "end_time"):
            text = query.get(name)
            if text is None:
                raise invalid(name, "is required")
            if not text.isdigit():
                raise invalid(name, "must be Unix milliseconds")
            times.append(int(text))
        start, end = times
        pack = {
            "resource_pack_name": "Image Generation - simulated",
            "resource_pack_id": "fake-pack-1",
            "resource_pack_type": "decreasing_total",
            "total_quantity": 1000.0,
            "remaining_quantity": 1000.0,
            "purchase_time": start,
            "effective_time": start,
            "invalid_time": end,
            "status": "online",
        }
        wanted = query.get("resource_pack_name")
        packs = [pack] if wanted in (None, pack["resource_pack_name"]) else []
        return ok(json.dumps({"code": 0, "msg": "", "resource_pack_subscribe_infos": packs}))
