"""One HTTP exchange of the fake as plain data: what a handler reads, what it answers.

The handlers never see aiohttp. The adapter (``_adapter``) turns aiohttp's request
into a :class:`Request` of plain mappings and writes the :class:`Reply` back, the
way aiohttp itself keeps what came in (``web_request``) apart from what goes out
(``web_response``): the fake's API can then be read, and driven, without a socket.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

import attrs

from ._protocol import SUCCESS_MESSAGE, envelope, http_status_for

NOT_JSON: Final = object()
"""The parsed body of a request whose body was not JSON."""


def parse_body(raw: bytes | None) -> Any:
    """``raw`` decoded as JSON; ``None`` when there was no body, :data:`NOT_JSON`
    when it does not parse."""
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return NOT_JSON


@attrs.frozen(kw_only=True)
class Request:
    """A request as the handlers see it.

    ``raw_path`` is the path still percent-encoded, as routing needs it (an
    external_task_id may hold an encoded ``/``); ``path`` the decoded one, as
    recorded. ``query`` and ``headers`` are read-only mappings: a case-insensitive
    one for headers, and where a name repeats ``get`` gives its first value.
    ``body`` is the parsed JSON body (see :func:`parse_body`).
    """

    method: str
    raw_path: str
    path: str
    query: Mapping[str, str] = attrs.field(factory=dict)
    headers: Mapping[str, str] = attrs.field(factory=dict)
    body: Any = None


@attrs.frozen
class Reply:
    """An answer to write back. ``code`` is the Kling code of an envelope, ``None``
    when the body is not one (a file, ``/_fake/`` JSON, garbage)."""

    status: int
    body: bytes
    code: int | None
    content_type: str = "application/json"
    headers: Mapping[str, str] | None = None


def format_seconds(seconds: float) -> str:
    """A ``Retry-After`` value."""
    # Fixed-point: "%g" would write 1e-05 or 1.2e+06, which no Retry-After parser reads.
    return f"{max(seconds, 0.0):.3f}".rstrip("0").rstrip(".")


def ok(data_json: str) -> Reply:
    """A success envelope around ``data_json`` (already encoded)."""
    return Reply(200, envelope(0, SUCCESS_MESSAGE, data_json), 0)


def error(
    code: int, message: str, *, http_status: int | None = None, retry_after: float | None = None
) -> Reply:
    """An error envelope, with the HTTP status Kling pairs with ``code`` unless given."""
    headers = None if retry_after is None else {"Retry-After": format_seconds(retry_after)}
    status = http_status if http_status is not None else http_status_for(code)
    return Reply(status, envelope(code, message), code, headers=headers)
