"""Kling's protocol as plain functions over data: no sockets, no event loop.

Building a request (method, path, body), reading a response envelope into data
or a typed error, and decoding tasks all live here, so they can be tested and
fuzzed without a server. The transport layer above only moves bytes.
"""

from __future__ import annotations

import email.utils
import json
import math
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import attrs
import cattrs
from cattrs.gen import make_dict_unstructure_fn, override

from ._exceptions import APIError, KlingError, TaskFailedError, ValidationError, error_class_for
from ._models import (
    Endpoint,
    ImageGenerationRequest,
    ImageResult,
    MultiImageRequest,
    Task,
    TaskRequest,
    TaskStatus,
)

__all__ = [
    "Envelope",
    "WireRequest",
    "converter",
    "create_request",
    "get_request",
    "list_request",
    "parse_envelope",
    "parse_retry_after",
    "parse_task",
    "parse_task_list",
    "request_body",
]

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


def _structure_image(value: Any, _type: Any) -> ImageResult:
    if not isinstance(value, Mapping):
        raise ValueError(f"an image must be an object, got {type(value).__name__}")
    index = value.get("index", 0)
    if isinstance(index, bool) or not isinstance(index, (int, str)):
        raise ValueError(f"image index must be an integer, got {index!r}")
    url = value.get("url")
    if not isinstance(url, str):
        raise ValueError("image url must be a string")
    return ImageResult(
        index=int(index), url=url, watermark_url=_optional_text(value.get("watermark_url"))
    )


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
    images = result.get("images") or ()
    if not isinstance(images, (list, tuple)):
        raise ValueError("task_result.images must be a list")
    return Task(
        task_id=task_id,
        status=TaskStatus(status),
        status_message=_optional_text(value.get("task_status_msg")) or None,
        # The hooks are called directly: this runs for every task of every poll.
        images=tuple(_structure_image(image, ImageResult) for image in images),
        external_task_id=_optional_text(info.get("external_task_id")) or None,
        created_at=_structure_millis(value.get("created_at"), datetime),
        updated_at=_structure_millis(value.get("updated_at"), datetime),
        final_unit_deduction=_optional_text(value.get("final_unit_deduction")),
        # A dict fresh from json.loads is ours to keep; anything else is copied.
        raw=value if type(value) is dict else dict(value),
    )


_register_request_hooks()
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
        raw=override(omit=True),
    ),
)
converter.register_unstructure_hook_func(
    lambda cls: isinstance(cls, type) and issubclass(cls, KlingError), _unstructure_error
)


# --- requests -------------------------------------------------------------------


@attrs.frozen
class WireRequest:
    """One HTTP request, as data: ``path`` is relative to the API root (before /v1)."""

    method: str
    path: str
    params: Mapping[str, str] | None = None
    body: Mapping[str, Any] | None = None


def request_body(request: TaskRequest) -> dict[str, Any]:
    """The JSON body Kling expects for ``request``, unset fields left out."""
    body: dict[str, Any] = converter.unstructure(request)
    return body


def create_request(request: TaskRequest) -> WireRequest:
    """``POST /v1/<endpoint>`` creating the task."""
    return WireRequest("POST", f"/v1/{request.endpoint.value}", body=request_body(request))


def get_request(endpoint: Endpoint, task_id: str) -> WireRequest:
    """``GET /v1/<endpoint>/<id>``; Kling accepts an external_task_id as the id too."""
    return WireRequest("GET", f"/v1/{endpoint.value}/{task_id}")


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


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds, fractional accepted, or an
    HTTP date); ``None`` when absent or unreadable."""
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
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
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


def parse_envelope(status: int, body: bytes, headers: Mapping[str, str] | None = None) -> Envelope:
    """Read Kling's ``{code, message, request_id, data}`` envelope.

    Returns the envelope when ``code`` is 0 and the HTTP status is a success;
    otherwise raises the :class:`APIError` subclass for the code (or for the HTTP
    status when the body is not an envelope), never a bare JSON or key error.
    """
    retry_after = parse_retry_after((headers or {}).get("Retry-After"))
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


def parse_task(envelope: Envelope) -> Task:
    """The task in a create or get response."""
    try:
        return converter.structure(envelope.data, Task)
    except (cattrs.BaseValidationError, ValueError, TypeError, OverflowError, OSError) as error:
        raise APIError(
            f"response data is not a task: {error}",
            request_id=envelope.request_id,
            http_status=envelope.http_status,
            body=envelope.data,
        ) from None


def parse_task_list(envelope: Envelope) -> list[Task]:
    """The tasks in a list response, newest first as Kling sends them."""
    if not isinstance(envelope.data, list):
        raise APIError(
            "list response data is not an array",
            request_id=envelope.request_id,
            http_status=envelope.http_status,
            body=envelope.data,
        )
    return [parse_task(attrs.evolve(envelope, data=item)) for item in envelope.data]
