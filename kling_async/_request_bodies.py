"""Wire bodies of the request models added by issue 29, registered on ``_wire``'s converter.

Each is written out by hand: the flat Python spelling (``images``,
``element_ids``, ``watermark``) becomes Kling's nested one (``image_list``,
``element_list``, ``watermark_info``) and an unset field is left out, so Kling
applies its documented default. Importing this module registers them;
``_endpoints`` and ``_resources`` do.
"""

from __future__ import annotations

from typing import Any

from ._models import (
    ExpandRequest,
    MultiShotRequest,
    OmniImageRequest,
    TaskRequest,
    VirtualTryOnRequest,
)
from ._wire import converter


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


converter.register_unstructure_hook(OmniImageRequest, omni_image_body)
converter.register_unstructure_hook(ExpandRequest, expand_body)
converter.register_unstructure_hook(MultiShotRequest, multi_shot_body)
converter.register_unstructure_hook(VirtualTryOnRequest, virtual_try_on_body)
