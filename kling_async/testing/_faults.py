"""Injected misbehaviour: which requests a fault hits, and what they get instead."""

from __future__ import annotations

import random
from typing import Final

import attrs

from ._http import Reply, error, format_seconds
from ._options import Fault
from ._validation import invalid

_DEFAULT_GARBAGE: Final = (
    b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"
)
# Kinds that let the request act (a create really creates) before misbehaving.
_ACTING: Final = frozenset(("error_after", "drop_after", "delay", "garbage_after", "exists"))
_DROPPING: Final = frozenset(("drop", "drop_after"))


@attrs.define(eq=False)
class Faults:
    """The faults injected and not yet used up, tried in injection order.

    ``rng`` decides the faults with a ``probability`` below 1 (seeded by the
    server's ``seed``, so a run can be repeated).
    """

    rng: random.Random
    active: list[Fault] = attrs.field(factory=list)

    def pick(self, route: str, endpoint: str | None) -> Fault | None:
        """The fault that applies to this request, if any, counted as a hit."""
        for fault in self.active:
            if not fault.applies_to(route, endpoint) or fault.exhausted:
                continue
            if fault.probability < 1.0 and self.rng.random() >= fault.probability:
                continue
            fault.hits += 1
            if fault.times is not None and fault.hits >= fault.times:
                self.active.remove(fault)
            return fault
        return None


def acts(fault: Fault) -> bool:
    """Whether a request hit by ``fault`` is served before it misbehaves."""
    return fault.kind in _ACTING


def fault_reply(fault: Fault, served: Reply | None) -> Reply | None:
    """What a request hit by ``fault`` is answered (``served``: its own answer, when
    :func:`acts`); ``None`` to close the connection without answering."""
    if fault.kind in _DROPPING:
        return None
    if fault.kind == "delay":
        return served
    if fault.kind == "garbage":
        return _garbage(fault)
    if fault.kind == "garbage_after":
        assert served is not None
        return _cut_short(fault, served)
    if fault.kind == "exists":
        # The answer a second, racing send of the same create gets: the task is
        # there (this request made it), and the answer says only "exists".
        exists = invalid("external_task_id", "external_task_id already exists")
        return error(exists.code, fault.message or exists.message, http_status=fault.http_status)
    return error(
        fault.code,
        fault.message or f"simulated error {fault.code}",
        http_status=fault.http_status,
        retry_after=fault.retry_after,
    )


def _cut_short(fault: Fault, served: Reply) -> Reply:
    """The served answer unreadable: its first half (a proxy that stopped
    streaming), or ``body``, with ``http_status`` (default 200: it looks fine)."""
    body = fault.body if fault.body is not None else served.body[: len(served.body) // 2]
    status = fault.http_status if fault.http_status is not None else 200
    return Reply(status, body.encode() if isinstance(body, str) else body, None)


def _garbage(fault: Fault) -> Reply:
    if fault.body is None:
        body = _DEFAULT_GARBAGE
    elif isinstance(fault.body, str):
        body = fault.body.encode()
    else:
        body = fault.body
    status = fault.http_status if fault.http_status is not None else 502
    headers = (
        None if fault.retry_after is None else {"Retry-After": format_seconds(fault.retry_after)}
    )
    return Reply(status, body, None, content_type="text/html", headers=headers)
