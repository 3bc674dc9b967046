"""Kling's synchronous endpoints: image recognition and account costs.

They answer at once, with no task to follow: the result models, building the
requests and reading the answers (pure), and :class:`Pacer`, which spaces a
client's requests to an endpoint whose documentation asks for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime
from typing import Any

import attrs

from ._endpoints import SYNC_ENDPOINTS
from ._exceptions import APIError, ValidationError
from ._image_input import WireImage
from ._models import BalanceDeduction
from ._wire import (
    Envelope,
    WireRequest,
    _balance_deduction,
    _lenient_text,
    _structure_millis,
)

__all__ = [
    "AccountCosts",
    "ImageRecognition",
    "RecognizedRegion",
    "ResourcePack",
]

RECOGNIZE = SYNC_ENDPOINTS["image_recognize"]
COSTS = SYNC_ENDPOINTS["account_costs"]


@attrs.frozen(kw_only=True)
class RecognizedRegion:
    """One kind of region image recognition looks for: ``type`` is Kling's
    ``object_seg`` (subject), ``head_seg`` (face with hair), ``face_seg`` (face
    without hair) or ``cloth_seg`` (clothing); ``url`` its cut-out, when found."""

    type: str
    is_contain: bool
    url: str | None = None


@attrs.frozen(kw_only=True)
class ImageRecognition:
    """What ``POST /v1/videos/image-recognize`` found in an image."""

    regions: tuple[RecognizedRegion, ...]
    final_unit_deduction: str | None = None
    final_balance_deduction: BalanceDeduction | None = None
    raw: Mapping[str, Any] = attrs.field(factory=dict, repr=False, eq=False)

    def region(self, type: str) -> RecognizedRegion | None:
        """The region of ``type`` (e.g. ``"face_seg"``), if Kling reported it."""
        return next((region for region in self.regions if region.type == type), None)


@attrs.frozen(kw_only=True)
class ResourcePack:
    """One resource pack of the account. ``remaining_quantity`` lags up to 12 h
    on Kling's side; the pack's kind (image, video, try-on) is only in its name."""

    resource_pack_name: str
    resource_pack_id: str | None = None
    resource_pack_type: str | None = None
    total_quantity: float | None = None
    remaining_quantity: float | None = None
    purchase_time: datetime | None = None
    effective_time: datetime | None = None
    invalid_time: datetime | None = None
    status: str | None = None


@attrs.frozen(kw_only=True)
class AccountCosts:
    """``GET /account/costs``: the account's resource packs in the period asked."""

    packs: tuple[ResourcePack, ...]
    raw: Mapping[str, Any] = attrs.field(factory=dict, repr=False, eq=False)


def recognize_request(image: WireImage) -> WireRequest:
    """``POST /v1/videos/image-recognize`` for an image already in wire form."""
    return WireRequest(RECOGNIZE.method, RECOGNIZE.path, body={"image": str(image)})


def _millis(value: object, field: str) -> int:
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValidationError(field, f"must be a datetime or Unix milliseconds; got {value!r}")
    return value


def costs_request(
    start_time: datetime | int, end_time: datetime | int, resource_pack_name: str | None = None
) -> WireRequest:
    """``GET /account/costs?start_time=&end_time=[&resource_pack_name=]``; times in
    Unix milliseconds (a datetime is converted)."""
    start, end = _millis(start_time, "start_time"), _millis(end_time, "end_time")
    if end < start:
        raise ValidationError("end_time", "must not be before start_time")
    params = {"start_time": str(start), "end_time": str(end)}
    if resource_pack_name is not None:
        if not isinstance(resource_pack_name, str) or not resource_pack_name.strip():
            raise ValidationError("resource_pack_name", "must be a non-empty string")
        params["resource_pack_name"] = resource_pack_name
    return WireRequest(COSTS.method, COSTS.path, params=params)


def _not_an_answer(envelope: Envelope, what: str) -> APIError:
    return APIError(
        f"response data is not {what}",
        request_id=envelope.request_id,
        http_status=envelope.http_status,
        body=envelope.data,
    )


def parse_recognition(envelope: Envelope) -> ImageRecognition:
    """The regions of an image-recognize answer; :class:`APIError` if it has none."""
    data = envelope.data
    result = data.get("task_result") if isinstance(data, Mapping) else None
    images = result.get("images") if isinstance(result, Mapping) else None
    if not isinstance(data, Mapping) or not isinstance(images, list):
        raise _not_an_answer(envelope, "an image recognition")
    regions = []
    for image in images:
        if not isinstance(image, Mapping) or not isinstance(image.get("type"), str):
            raise _not_an_answer(envelope, "an image recognition")
        url = image.get("url")
        regions.append(
            RecognizedRegion(
                type=image["type"],
                is_contain=image.get("is_contain") is True,
                url=url if isinstance(url, str) and url else None,
            )
        )
    return ImageRecognition(
        regions=tuple(regions),
        final_unit_deduction=_lenient_text(data.get("final_unit_deduction")),
        final_balance_deduction=_balance_deduction(data.get("final_balance_deduction")),
        raw=dict(data),
    )


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _time(value: object) -> datetime | None:
    try:
        return _structure_millis(value, datetime)
    except (ValueError, TypeError, OverflowError, OSError):
        return None


def parse_costs(envelope: Envelope) -> AccountCosts:
    """The packs of an account-costs answer. Its ``data`` nests a second
    ``{code, msg}``: a non-zero one is Kling refusing, raised as the typed error."""
    data = envelope.data
    if not isinstance(data, Mapping):
        raise _not_an_answer(envelope, "account costs")
    inner_code = data.get("code")
    if isinstance(inner_code, int) and not isinstance(inner_code, bool) and inner_code != 0:
        from ._exceptions import error_class_for

        message = data.get("msg")
        raise error_class_for(inner_code, envelope.http_status)(
            message if isinstance(message, str) and message else "Kling refused the query",
            code=inner_code,
            request_id=envelope.request_id,
            http_status=envelope.http_status,
            body=data,
        )
    infos = data.get("resource_pack_subscribe_infos") or []
    if not isinstance(infos, list):
        raise _not_an_answer(envelope, "account costs")
    packs = []
    for info in infos:
        if not isinstance(info, Mapping):
            raise _not_an_answer(envelope, "account costs")
        packs.append(
            ResourcePack(
                resource_pack_name=_lenient_text(info.get("resource_pack_name")) or "",
                resource_pack_id=_lenient_text(info.get("resource_pack_id")),
                resource_pack_type=_lenient_text(info.get("resource_pack_type")),
                total_quantity=_number(info.get("total_quantity")),
                remaining_quantity=_number(info.get("remaining_quantity")),
                purchase_time=_time(info.get("purchase_time")),
                effective_time=_time(info.get("effective_time")),
                invalid_time=_time(info.get("invalid_time")),
                status=_lenient_text(info.get("status")),
            )
        )
    return AccountCosts(packs=tuple(packs), raw=dict(data))


def wait_before(last_end: float | None, now: float, interval: float) -> float:
    """Seconds to wait so a request starts ``interval`` after the previous one
    ended (at ``last_end``, ``None`` if none): the pacing rule, pure."""
    if last_end is None:
        return 0.0
    return max(0.0, last_end + interval - now)


class Pacer:
    """One request at a time, each sent ``interval`` seconds after the one
    before was answered (Kling's "QPS <= 1" for account costs), whoever calls:
    callers queue instead of drawing 1302s. Counting from the answer, not the
    send, keeps two requests a second apart on Kling's side too, however long
    the first one took to arrive there."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._lock: asyncio.Lock | None = None
        self._last_end: float | None = None

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """This caller's turn: send the request inside the ``async with``."""
        if self._lock is None:  # created on the running loop, not in __init__
            self._lock = asyncio.Lock()
        async with self._lock:
            delay = wait_before(self._last_end, self._clock(), self.interval)
            if delay:
                await asyncio.sleep(delay)
            try:
                yield
            finally:
                self._last_end = self._clock()
