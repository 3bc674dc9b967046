"""Kling's protocol as plain functions over data: no sockets, no event loop.

Building a request (method, path, body), reading a response envelope into data
or a typed error, and decoding tasks all live here, so they can be tested and
fuzzed without a server. The transport layer above only moves bytes.
"""

from __future__ import annotations

import decimal
import email.utils
import json
import math
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

import attrs
import cattrs
from cattrs.gen import make_dict_unstructure_fn, override

from ._exceptions import APIError, KlingError, TaskFailedError, ValidationError, error_class_for
from ._models import (
    BalanceDeduction,
    Endpoint,
    ImageGenerationRequest,
    ImageResult,
    MultiImageRequest,
    Task,
    TaskRequest,
    TaskStatus,
    unread_files,
)

MAX_PAGE_SIZE = 500
MAX_PAGE_NUMBER = 1000
_SNIPPET_LENGTH = 200

converter = cattrs.Converter()
"""The package's one converter: request models to JSON bodies, JSON to tasks."""


def _watermark_info(enabled: bool | None) -> dict[str, bool] | None:
    return None if enabled is None else {"enabled": enabled}


def _register_request_hooks() -> None:
    # None means "not set": such fields are left out of the body so Kling applies
    # its own defaults. model_name, n and aspect_ratio always go out because the
    # SDK's defaults are the documented ones and the limiter relies on n.
    shared: dict[str, Any] = {
        "watermark": override(rename="watermark_info", unstruct_hook=_watermark_info),
        "model_name": override(omit_if_default=False),
        "n": override(omit_if_default=False),
        "aspect_ratio": override(omit_if_default=False),
    }
    converter.register_unstructure_hook(
        ImageGenerationRequest,
        make_dict_unstructure_fn(
            ImageGenerationRequest,
            converter,
            _cattrs_omit_if_default=True,
            element_ids=override(
                rename="element_list",
                unstruct_hook=lambda ids: [{"element_id": i} for i in ids] if ids else None,
            ),
            **shared,
        ),
    )
    converter.register_unstructure_hook(
        MultiImageRequest,
        make_dict_unstructure_fn(
            MultiImageRequest,
            converter,
            _cattrs_omit_if_default=True,
            subject_images=override(
                rename="subject_image_list",
                unstruct_hook=lambda images: [{"subject_image": str(i)} for i in images],
                omit_if_default=False,
            ),
            **shared,
        ),
    )


def _structure_millis(value: Any, _type: Any) -> datetime | None:
    if value is None or value == "":
        return None
    millis = float(value)
    if not math.isfinite(millis):
        raise ValueError(f"not a timestamp: {value!r}")
    return datetime.fromtimestamp(millis / 1000, tz=timezone.utc)


def _optional_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"expected text, got {type(value).__name__}")


def _lenient_text(value: Any) -> str | None:
    """Text, or ``None`` for anything else: for fields a task must never be lost over."""
    try:
        return _optional_text(value)
    except ValueError:
        return None


def _image_at(value: Any, position: int) -> ImageResult:
    """One image of a task's result list; ``position`` is its place in the list.

    Some answers carry no ``index`` (or ``"id": ""`` in its place): then the
    position is the index, so two images never share one.
    """
    if not isinstance(value, Mapping):
        raise ValueError(f"an image must be an object, got {type(value).__name__}")
    index = value.get("index")
    if index is None or index == "":
        index = position
    if isinstance(index, bool) or not isinstance(index, (int, str)):
        raise ValueError(f"image index must be an integer, got {index!r}")
    url = value.get("url")
    if not isinstance(url, str):
        raise ValueError("image url must be a string")
    return ImageResult(
        index=int(index), url=url, watermark_url=_optional_text(value.get("watermark_url"))
    )


#: AI multi-shot's image sets: ``{index, url_1, url_2, url_3}``, three angles a set.
_SET_URLS = ("url_1", "url_2", "url_3")


def _result_images(result: Mapping[str, Any]) -> tuple[tuple[ImageResult, ...], str | None]:
    """Every image of a legacy ``task_result``, and its ``result_type`` if given.

    One list whatever the endpoint: ``images``, or omni-image's
    ``series_images`` for a series (Kling's example fills both arrays; the one
    ``result_type`` names wins, else the non-empty one), and AI multi-shot's
    sets flattened set by set (set ``i``'s ``url_k`` gets index ``3*i + k - 1``),
    so downloads and stores need not know the result kind.
    """
    images = result.get("images") or ()
    series = result.get("series_images") or ()
    if not isinstance(images, (list, tuple)) or not isinstance(series, (list, tuple)):
        raise ValueError("task_result.images and series_images must be lists")
    result_type = result.get("result_type")
    chosen = series if (result_type == "series" and series) or not images else images
    read: list[ImageResult] = []
    for position, image in enumerate(chosen):
        if isinstance(image, Mapping) and "url" not in image and "url_1" in image:
            base = _image_at({**image, "url": ""}, position).index * len(_SET_URLS)
            read.extend(
                _image_at({"index": base + offset, "url": image[key]}, 0)
                for offset, key in enumerate(_SET_URLS)
                if image.get(key) is not None
            )
        else:
            read.append(_image_at(image, position))
    return tuple(read), (result_type if isinstance(result_type, str) and result_type else None)


def _structure_image(value: Any, _type: Any) -> ImageResult:
    # Alone, an image has no position: an index it lacks is 0.
    return _image_at(value, 0)


def _balance_deduction(value: Any) -> BalanceDeduction | None:
    """``final_balance_deduction``: the official ``{"quota", "list_price"}`` object, or
    a bare amount as some gateways send it (taken as the price charged). Anything
    else is dropped: a billing detail must never make a finished task unreadable."""
    if isinstance(value, Mapping):
        quota = _lenient_text(value.get("quota"))
        list_price = _lenient_text(value.get("list_price"))
        if quota is None and list_price is None:
            return None
        return BalanceDeduction(quota=quota, list_price=list_price)
    quota = _lenient_text(value)
    return None if quota is None else BalanceDeduction(quota=quota)


def _structure_task(value: Any, _type: Any) -> Task:
    if not isinstance(value, Mapping):
        raise ValueError(f"a task must be an object, got {type(value).__name__}")
    task_id = _optional_text(value.get("task_id"))
    if not task_id:
        raise ValueError("task has no task_id")
    status = value.get("task_status")
    if not isinstance(status, str) or not status:
        raise ValueError(f"task_status must be a string, got {status!r}")
    info = value.get("task_info") or {}
    result = value.get("task_result") or {}
    if not isinstance(info, Mapping) or not isinstance(result, Mapping):
        raise ValueError("task_info and task_result must be objects")
    images, result_type = _result_images(result)
    known_status = TaskStatus(status)
    if type(value) is dict:
        # The one shared string instead of the response's own copy: thousands
        # of tasks in flight each keep their raw dict.
        value["task_status"] = known_status.value
    return Task(
        task_id=task_id,
        status=known_status,
        status_message=_optional_text(value.get("task_status_msg")) or None,
        # The hooks are called directly: this runs for every task of every poll.
        images=images,
        result_type=result_type,
        external_task_id=_optional_text(info.get("external_task_id")) or None,
        created_at=_structure_millis(value.get("created_at"), datetime),
        updated_at=_structure_millis(value.get("updated_at"), datetime),
        final_unit_deduction=_lenient_text(value.get("final_unit_deduction")),
        final_balance_deduction=_balance_deduction(value.get("final_balance_deduction")),
        # A dict fresh from json.loads is ours to keep; anything else is copied.
        raw=value if type(value) is dict else dict(value),
    )


#: Statuses of the new-design callback format that the task model spells otherwise.
_NEW_DESIGN_STATUSES = {"succeeded": TaskStatus.SUCCEED.value}


def _decimal_sum(amounts: list[Any]) -> str | None:
    try:
        total = sum((decimal.Decimal(str(amount)) for amount in amounts), decimal.Decimal(0))
    except (decimal.InvalidOperation, ValueError):
        return None
    return str(total) if total.is_finite() else None


def _billing(value: Any) -> tuple[str | None, BalanceDeduction | None]:
    """The new design's ``billing`` list as (units, balance): entries with
    ``charge_type`` ``unit`` count resource-pack units, ``cash`` ones balance."""
    if not isinstance(value, (list, tuple)):
        return None, None
    entries = [entry for entry in value if isinstance(entry, Mapping)]
    units = [e.get("amount") for e in entries if e.get("charge_type") == "unit"]
    cash = [e for e in entries if e.get("charge_type") == "cash"]
    balance = None
    if cash:
        list_prices = [e.get("list_price") for e in cash if e.get("list_price") is not None]
        balance = BalanceDeduction(
            quota=_decimal_sum([e.get("amount") for e in cash]),
            list_price=_decimal_sum(list_prices) if list_prices else None,
        )
    return (_decimal_sum(units) if units else None), balance


def _structure_new_design(value: Mapping[str, Any]) -> Task:
    """A task in the callback format of Kling's newer APIs (and of the console's
    "test callback"): ``{id, status, message, outputs, create_time, update_time,
    external_id, billing}``.

    The outputs of type ``image`` become the task's images, in their order and
    indexed by it (they carry no index); other outputs (video, audio, ...) stay
    in ``raw`` only.
    """
    task_id = _optional_text(value.get("id"))
    if not task_id:
        raise ValueError("task has no id")
    status = value.get("status")
    if not isinstance(status, str) or not status:
        raise ValueError(f"status must be a string, got {status!r}")
    outputs = value.get("outputs") or ()
    if not isinstance(outputs, (list, tuple)):
        raise ValueError("outputs must be a list")
    images = [
        output
        for output in outputs
        if not isinstance(output, Mapping) or output.get("type", "image") == "image"
    ]
    units, balance = _billing(value.get("billing"))
    # A series' images carry the group they belong to, as legacy answers say
    # result_type "series": one Task reads both the same way.
    grouped = any(isinstance(image, Mapping) and image.get("group_id") for image in images)
    return Task(
        task_id=task_id,
        status=TaskStatus(_NEW_DESIGN_STATUSES.get(status, status)),
        status_message=_optional_text(value.get("message")) or None,
        images=tuple(_image_at(image, position) for position, image in enumerate(images)),
        external_task_id=_optional_text(value.get("external_id")) or None,
        created_at=_structure_millis(value.get("create_time"), datetime),
        updated_at=_structure_millis(value.get("update_time"), datetime),
        final_unit_deduction=units,
        final_balance_deduction=balance,
        result_type="series" if grouped else None,
        raw=value if type(value) is dict else dict(value),
    )


_register_request_hooks()
# Amounts of money and units (ledger entries, costs) keep every digit as text.
converter.register_structure_hook(decimal.Decimal, lambda value, _type: decimal.Decimal(str(value)))
converter.register_unstructure_hook(decimal.Decimal, str)
converter.register_structure_hook(datetime, _structure_millis)
converter.register_structure_hook(ImageResult, _structure_image)
converter.register_structure_hook(Task, _structure_task)


# --- plain data for users to store (Task.to_dict, BatchResult.to_dict) -------------


def _unstructure_error(error: KlingError) -> dict[str, Any]:
    """An error as JSON-ready data: its type and message, and the fields a
    caller would act on (Kling's code and request_id, the invalid field, the
    failed task's id)."""
    record: dict[str, Any] = {"type": type(error).__name__, "message": str(error)}
    if isinstance(error, APIError):
        record.update(code=error.code, request_id=error.request_id, http_status=error.http_status)
    elif isinstance(error, ValidationError):
        record.update(field=error.field, rule=error.rule)
    elif isinstance(error, TaskFailedError):
        record["task_id"] = error.task.task_id
    return record


# JSON-ready: datetimes as ISO 8601 strings (with their UTC offset), the status as
# Kling's word, images as a list; ``raw`` is left out (it is Kling's own dict).
converter.register_unstructure_hook(datetime, datetime.isoformat)
converter.register_unstructure_hook(TaskStatus, lambda status: status.value)
converter.register_unstructure_hook(
    Task,
    make_dict_unstructure_fn(
        Task,
        converter,
        images=override(unstruct_hook=lambda images: [converter.unstructure(i) for i in images]),
        # Said only by the endpoints that have one (omni-image): left out otherwise.
        result_type=override(omit_if_default=True),
        raw=override(omit=True),
    ),
)
converter.register_unstructure_hook_func(
    lambda cls: isinstance(cls, type) and issubclass(cls, KlingError), _unstructure_error
)


# --- requests -------------------------------------------------------------------


def _body_summary(body: Mapping[str, Any] | None) -> str:
    # A body holds megabytes of base64 images and a callback URL whose path is
    # a token: its repr names the fields only.
    return "None" if body is None else f"<fields: {', '.join(body)}>"


@attrs.frozen
class WireRequest:
    """One HTTP request, as data: ``path`` is relative to the API root (before /v1)."""

    method: str
    path: str
    params: Mapping[str, str] | None = None
    body: Mapping[str, Any] | None = attrs.field(default=None, repr=_body_summary)


def request_body(request: TaskRequest) -> dict[str, Any]:
    """The JSON body Kling expects for ``request``, unset fields left out.

    Images given as files must have been read (the client does it before
    sending): a body never carries a file's path in place of its contents.
    """
    if unread_files(request):
        raise ValueError("the request's image files must be read before it is sent")
    body: dict[str, Any] = converter.unstructure(request)
    return body


def create_request(request: TaskRequest) -> WireRequest:
    """``POST /v1/<endpoint>`` creating the task."""
    return WireRequest("POST", f"/v1/{request.endpoint.value}", body=request_body(request))


def get_request(endpoint: Endpoint, task_id: str) -> WireRequest:
    """``GET /v1/<endpoint>/<id>``; Kling accepts an external_task_id as the id too.

    The id is percent-encoded whole: an external_task_id is the caller's text,
    and ``order#42`` or ``a/b`` must name one task, not a fragment or a path.
    """
    return WireRequest("GET", f"/v1/{endpoint.value}/{quote(task_id, safe='')}")


def list_request(endpoint: Endpoint, page: int, page_size: int) -> WireRequest:
    """``GET /v1/<endpoint>?pageNum=&pageSize=``, newest tasks first."""
    if not 1 <= page <= MAX_PAGE_NUMBER:
        raise ValueError(f"page must be between 1 and {MAX_PAGE_NUMBER}")
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(f"page_size must be between 1 and {MAX_PAGE_SIZE}")
    return WireRequest(
        "GET", f"/v1/{endpoint.value}", params={"pageNum": str(page), "pageSize": str(page_size)}
    )


# --- responses ------------------------------------------------------------------


@attrs.frozen
class Envelope:
    """A successful Kling response: ``code`` was 0."""

    data: Any
    request_id: str | None
    message: str = ""
    http_status: int = 200


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds, fractional accepted, or an
    HTTP date, counted from ``now``); ``None`` when absent or unreadable, or for a
    date when ``now`` is not given (this function reads no clock)."""
    if not value:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if now is None:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - now).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _snippet(body: bytes) -> str:
    text = body[:_SNIPPET_LENGTH].decode("utf-8", errors="replace")
    return text + ("…" if len(body) > _SNIPPET_LENGTH else "")


def _malformed(
    reason: str, status: int, body: bytes, retry_after: float | None, request_id: str | None = None
) -> APIError:
    cls = error_class_for(None, status) if status >= 400 else APIError
    return cls(
        f"{reason} (body: {_snippet(body)!r})",
        http_status=status,
        request_id=request_id,
        retry_after=retry_after,
        body=_snippet(body),
    )


def parse_envelope(
    status: int,
    body: bytes,
    headers: Mapping[str, str] | None = None,
    *,
    now: datetime | None = None,
) -> Envelope:
    """Read Kling's ``{code, message, request_id, data}`` envelope.

    Returns the envelope when ``code`` is 0 and the HTTP status is a success;
    otherwise raises the :class:`APIError` subclass for the code (or for the HTTP
    status when the body is not an envelope), never a bare JSON or key error.
    """
    retry_after = parse_retry_after((headers or {}).get("Retry-After"), now)
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise _malformed("response is not JSON", status, body, retry_after) from None
    if not isinstance(payload, dict):
        raise _malformed("response is not a Kling envelope", status, body, retry_after)
    code = payload.get("code")
    raw_request_id = payload.get("request_id")
    request_id = str(raw_request_id) if raw_request_id not in (None, "") else None
    if isinstance(code, bool) or not isinstance(code, int):
        raise _malformed("response has no integer code", status, body, retry_after, request_id)
    message = payload.get("message")
    message = message if isinstance(message, str) else ""
    if code != 0 or status >= 400:
        cls = error_class_for(code if code != 0 else None, status)
        raise cls(
            message or "Kling returned an error",
            code=code if code != 0 else None,
            request_id=request_id,
            http_status=status,
            retry_after=retry_after,
            body=payload,
        )
    return Envelope(
        data=payload.get("data"), request_id=request_id, message=message, http_status=status
    )


#: What reading a task can raise: datetime's range errors included.
_PARSE_ERRORS = (cattrs.BaseValidationError, ValueError, TypeError, OverflowError, OSError)


def parse_task(envelope: Envelope) -> Task:
    """The task in a create or get response."""
    try:
        return converter.structure(envelope.data, Task)
    except _PARSE_ERRORS as error:
        raise APIError(
            f"response data is not a task: {error}",
            request_id=envelope.request_id,
            http_status=envelope.http_status,
            body=envelope.data,
        ) from None


def parse_created(envelope: Envelope) -> Task:
    """The task a create answered ``code == 0`` made, read leniently.

    Kling created a task whenever such an answer names its ``task_id``, however
    little else it says (no ``task_status``, no ``task_info``, a malformed time):
    the task must then be tracked, not lost to a parse error. So only the
    ``task_id`` is required; a missing or unreadable status is ``submitted`` and
    other unreadable fields are left out. Raises :class:`APIError` only when
    ``data`` holds no usable ``task_id``, a create whose task cannot be known
    from the answer (look it up by its external_task_id).
    """
    data = envelope.data
    task_id = _lenient_text(data.get("task_id")) if isinstance(data, Mapping) else None
    if not isinstance(data, Mapping) or task_id is None or not task_id.strip():
        raise APIError(
            "the create was answered with success but no task_id; look the task up "
            "by its external_task_id",
            request_id=envelope.request_id,
            http_status=envelope.http_status,
            body=data,
        )
    try:
        return converter.structure(data, Task)
    except _PARSE_ERRORS:
        pass  # the lenient reading below
    status = data.get("task_status")
    info = data.get("task_info")
    info = info if isinstance(info, Mapping) else {}
    return Task(
        task_id=task_id,
        status=TaskStatus(status) if isinstance(status, str) and status else TaskStatus.SUBMITTED,
        status_message=_lenient_text(data.get("task_status_msg")) or None,
        external_task_id=_lenient_text(info.get("external_task_id")) or None,
        created_at=_lenient_millis(data.get("created_at")),
        updated_at=_lenient_millis(data.get("updated_at")),
        final_unit_deduction=_lenient_text(data.get("final_unit_deduction")),
        final_balance_deduction=_balance_deduction(data.get("final_balance_deduction")),
        raw=data if type(data) is dict else dict(data),
    )


def _lenient_millis(value: Any) -> datetime | None:
    try:
        return _structure_millis(value, datetime)
    except _PARSE_ERRORS:
        return None


def parse_callback(payload: Any) -> Task:
    """The task in a callback body, in either format Kling documents.

    The legacy format (the endpoints' own, models up to 3.0) is a get's ``data``;
    older copies of it lack ``task_info``, so the external_task_id may be
    missing. The new-design format (newer APIs, the console's "test callback")
    is read by :func:`_structure_new_design`. Raises :class:`ValueError` for a
    body in neither.
    """
    if not isinstance(payload, Mapping):
        raise ValueError(f"not a Kling task: the body is a {type(payload).__name__}")
    try:
        if "task_id" in payload or "task_status" in payload:
            return _structure_task(payload, Task)
        if "id" in payload and "status" in payload:
            return _structure_new_design(payload)
    except _PARSE_ERRORS as error:
        raise ValueError(f"not a Kling task: {error}") from None
    raise ValueError("not a Kling task: neither task_id/task_status nor id/status")


def list_items(envelope: Envelope) -> list[Any]:
    """The raw tasks of a list response, newest first; :class:`APIError` when
    ``data`` is not an array."""
    if not isinstance(envelope.data, list):
        raise APIError(
            "list response data is not an array",
            request_id=envelope.request_id,
            http_status=envelope.http_status,
            body=envelope.data,
        )
    return envelope.data


def parse_task_list(envelope: Envelope) -> list[Task]:
    """The tasks in a list response, newest first as Kling sends them."""
    return [parse_task(attrs.evolve(envelope, data=item)) for item in list_items(envelope)]


def task_id_of(data: Any) -> str | None:
    """The task_id of a raw task (an item of a list page), read without decoding
    the rest: a sweep skips the tasks nobody tracks at this cost."""
    # ``type() is dict`` first: what json.loads made, skipping the ABC check.
    task_id = data.get("task_id") if type(data) is dict or isinstance(data, Mapping) else None
    return task_id if type(task_id) is str or isinstance(task_id, str) else None


def same_version(known: Mapping[str, Any], data: Any) -> bool:
    """Whether ``data`` (a task as Kling sent it) is the version ``known`` (the
    raw task last decoded) already holds: same status, same ``updated_at``.
    Then there is nothing to decode."""
    return (
        (type(data) is dict or isinstance(data, Mapping))
        and known.get("updated_at") == data.get("updated_at")
        and known.get("task_status") == data.get("task_status")
    )


def download_error(status: int, url: str) -> APIError | None:
    """The error for a result file answered with HTTP ``status`` (``None`` for
    200): a URL that is gone is most likely older than Kling's 30 days."""
    if status == 200:
        return None
    expired = status in (403, 404, 410)
    return error_class_for(None, status)(
        f"downloading {url} failed"
        + (": result URLs expire 30 days after generation" if expired else ""),
        http_status=status,
    )
