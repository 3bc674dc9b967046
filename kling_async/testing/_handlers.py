"""The fake's HTTP API over plain data: a :class:`Request` in, a :class:`Reply` out.

Routing, recording, the order of the checks (faults, then authentication, then
the rate limit, then the endpoint's own rules) and the endpoints themselves live
here; sockets, slow answers and dropped connections are the adapter's.
"""

from __future__ import annotations

import functools
import json
import random
import time
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import unquote

import attrs

from ._auth import Authenticator
from ._callbacks import CallbackDispatcher, callback_body, webhook_signer
from ._endpoints import SyncEndpoints, endpoints, sync_path, units_of
from ._faults import Faults, acts, fault_reply
from ._files import RESULTS_PATH, serve_result
from ._http import NOT_JSON, Reply, Request, error, ok
from ._lifecycle import TaskBook
from ._options import Fault, RecordedRequest, Route, ServerOptions
from ._quota import TokenBucket, UnitQuota
from ._validation import Rejection, invalid, validate_create

MAX_PAGE_NUMBER: Final = 1000
MAX_PAGE_SIZE: Final = 500
DEFAULT_PAGE_SIZE: Final = 30
ROUTES: Final[tuple[Route, ...]] = ("create", "get", "list", "download", "callback", "other")

# Internal operations; several map to one public Route.
_OP_ROUTES: Final[Mapping[str, Route]] = {
    "create": "create",
    "get": "get",
    "list": "list",
    "download": "download",
    "callback": "callback",
    # The synchronous endpoints: a recognition is a POST that costs units, a
    # costs query a read; faults of those routes hit them too.
    "sync_post": "create",
    "sync_get": "get",
    "stats": "other",
    "task_list": "other",
    "other": "other",
}
# The operations faults may hit: the API and its files, never /_fake/.
_FAULTABLE: Final = frozenset(("create", "get", "list", "download", "sync_post", "sync_get"))


@attrs.frozen
class Routing:
    """What a request is: ``operation``, the API ``endpoint`` it names, and the
    ``rest`` of its path (a task's id, a result file's path)."""

    operation: str
    endpoint: str | None = None
    rest: str = ""

    @property
    def route(self) -> Route:
        """The :data:`Route` recorded for it."""
        return _OP_ROUTES[self.operation]


def routing_of(method: str, raw_path: str, prefix: str) -> Routing:
    """The :class:`Routing` of a request, the API being served under ``prefix``.

    Split before percent-decoding, so an external_task_id holding an encoded
    ``/`` still names one task.
    """
    v1 = prefix + "/v1/"
    sync = sync_path(method, raw_path, prefix)
    if sync is not None:
        return Routing("sync_post" if method == "POST" else "sync_get", sync)
    if raw_path.startswith(v1):
        rest = raw_path[len(v1) :]
        for endpoint in endpoints():
            if rest == endpoint:
                if method == "POST":
                    return Routing("create", endpoint)
                if method == "GET":
                    return Routing("list", endpoint)
                return Routing("other", endpoint)
            if rest.startswith(endpoint + "/"):
                ident = rest[len(endpoint) + 1 :]
                if method == "GET" and ident and "/" not in ident:
                    return Routing("get", endpoint, unquote(ident))
                return Routing("other", endpoint)
        return Routing("other")
    if raw_path.startswith(RESULTS_PATH) and method in ("GET", "HEAD"):
        return Routing("download", None, unquote(raw_path[len(RESULTS_PATH) :]))
    if raw_path == "/_fake/stats" and method == "GET":
        return Routing("stats")
    if raw_path == "/_fake/tasks" and method == "GET":
        return Routing("task_list")
    if raw_path.startswith("/_fake/callbacks") and method == "POST":
        return Routing("callback")
    return Routing("other")


@attrs.define(eq=False)
class Call:
    """A request received: how it was routed, its record (if requests are
    recorded) and the fault that hit it, if any."""

    request: Request
    routing: Routing
    record: RecordedRequest | None
    fault: Fault | None


@attrs.define(eq=False)
class FakeApi:
    """Kling's image API as the fake answers it, plus ``/_fake/``.

    A request goes through :meth:`route` (as it arrives), :meth:`receive` (with
    its body) and :meth:`answer`; the adapter waits out a fault's ``delay``
    between the last two.
    """

    options: ServerOptions
    book: TaskBook
    quota: UnitQuota
    faults: Faults
    auth: Authenticator
    bucket: TokenBucket | None
    requests: list[RecordedRequest] = attrs.field(factory=list, init=False)
    sync: SyncEndpoints = attrs.field(factory=SyncEndpoints, init=False)
    counts: dict[Route, int] = attrs.field(factory=lambda: dict.fromkeys(ROUTES, 0), init=False)

    @classmethod
    def build(cls, options: ServerOptions) -> FakeApi:
        """The API and its parts, made from ``options``. No socket is opened; tasks
        can be created once :meth:`TaskBook.open` has run on an event loop."""
        seed = options.seed
        callbacks = CallbackDispatcher(
            options.callback_faults,
            # A stream of its own, so that callback faults do not change which
            # requests a seeded fault hits.
            random.Random(None if seed is None else f"callbacks:{seed}"),
            [],
            encode=functools.partial(callback_body, style=options.shapes.callback_format),
            signer=(
                webhook_signer(options.webhook_secrets, options.clock)
                if options.webhook_secrets
                else None
            ),
        )
        quota = UnitQuota(options.concurrency_limit)
        return cls(
            options=options,
            book=TaskBook(options, quota, callbacks),
            quota=quota,
            faults=Faults(random.Random(seed)),
            auth=Authenticator(
                api_key=options.api_key,
                access_key=options.access_key,
                secret_key=options.secret_key,
                clock=options.clock,
            ),
            bucket=None if options.rate_limit is None else TokenBucket(options.rate_limit),
        )

    def route(self, method: str, raw_path: str) -> Routing:
        """Route a request and count it."""
        routing = routing_of(method, raw_path, self.options.path_prefix)
        self.counts[routing.route] += 1
        return routing

    def receive(self, routing: Routing, request: Request) -> Call:
        """Record the request and pick the fault that hits it."""
        record: RecordedRequest | None = None
        if self.options.record_requests:
            record = RecordedRequest(
                method=request.method,
                path=request.path,
                query=dict(request.query),
                route=routing.route,
                endpoint=routing.endpoint,
                json=None if request.body is NOT_JSON else request.body,
                authorization=request.headers.get("Authorization"),
                arrived_at=time.monotonic(),
            )
            self.requests.append(record)
        fault = None
        if routing.operation in _FAULTABLE and self.faults.active:
            fault = self.faults.pick(routing.route, routing.endpoint)
            if fault is not None and record is not None:
                record.fault = fault.kind
        return Call(request, routing, record, fault)

    def answer(self, call: Call) -> Reply | None:
        """The reply to ``call``, as :class:`WireShapes` bends it; ``None`` to close
        the connection without one."""
        fault = call.fault
        if fault is None:
            reply: Reply | None = self._serve(call.routing, call.request)
        else:
            served = self._serve(call.routing, call.request) if acts(fault) else None
            reply = fault_reply(fault, served)
        if reply is None:
            return None
        reply = self._shape(reply)
        if call.record is not None:
            call.record.http_status = reply.status
            call.record.code = reply.code
        return reply

    def stats(self) -> dict[str, Any]:
        """The figures ``GET /_fake/stats`` serves."""
        limit = self.options.concurrency_limit
        return {
            "requests": dict(self.counts),
            "requests_total": sum(self.counts.values()),
            "creates_accepted": self.book.created,
            "creates_rejected_concurrency": self.quota.rejected,
            "rate_limited": 0 if self.bucket is None else self.bucket.refused,
            "concurrency_limit": limit,
            "units_in_use": self.quota.in_use,
            "peak_units": self.quota.peak,
            "utilisation": self.quota.utilisation() if limit is not None else None,
            "live_tasks": len(self.book.live),
            "tasks": len(self.book.tasks),
        }

    # --- the handlers -----------------------------------------------------------------

    def _serve(self, routing: Routing, request: Request) -> Reply:
        operation, endpoint = routing.operation, routing.endpoint
        if operation == "task_list":
            tasks = [task.to_data() | {"prompt": task.prompt} for task in self.book.tasks.values()]
            return Reply(200, json.dumps(tasks).encode(), None)
        if operation == "stats":
            return Reply(200, json.dumps(self.stats()).encode(), None)
        if operation == "callback":
            return ok("null")
        if operation == "other":
            return error(1202, "no such method or path")
        if operation == "download":
            task_id, _, name = routing.rest.partition("/")
            return serve_result(self.book.tasks.get(task_id), name, request.headers.get("Range"))
        assert endpoint is not None
        refusal = self.auth.check(request.headers.get("Authorization"))
        if refusal is None and self.bucket is not None:
            refusal = self.bucket.refusal()
        if refusal is not None:
            return refusal
        if operation in ("sync_post", "sync_get"):
            body = None if request.body is NOT_JSON else request.body
            return self.sync.answer(endpoint, body, request.query, self.book.origin)
        if operation == "create":
            return self._create(endpoint, None if request.body is NOT_JSON else request.body)
        if operation == "get":
            return self._get(endpoint, routing.rest)
        return self._list(endpoint, request.query)

    def _create(self, endpoint: str, parsed: object) -> Reply:
        try:
            body = validate_create(endpoint, parsed, self.options.models)
        except Rejection as rejection:
            return error(rejection.code, rejection.message)
        external = body.get("external_task_id")
        if external is not None and external in self.book.by_external:
            duplicate = invalid("external_task_id", "external_task_id already exists")
            return error(duplicate.code, duplicate.message)
        if self.options.quota_error is not None:
            return error(self.options.quota_error, "resource pack exhausted (simulated)")
        refusal = self.quota.refusal(units_of(endpoint, body))
        if refusal is not None:
            return refusal
        task = self.book.create(endpoint, body, external)
        data: dict[str, Any] = {"task_id": task.task_id}
        if self.options.shapes.create_answer == "full":
            data.update(
                task_status=task.status,
                task_info={"external_task_id": external or ""},
                created_at=task.created_at_ms,
                updated_at=task.updated_at_ms,
            )
        return ok(json.dumps(data, separators=(",", ":")))

    def _get(self, endpoint: str, ident: str) -> Reply:
        task = self.book.tasks.get(ident)
        if task is None or task.endpoint != endpoint:
            task = self.book.by_external.get(ident)
        if task is None or task.endpoint != endpoint:
            return error(1203, f"task not found: {ident}")
        return ok(task.to_json())

    def _list(self, endpoint: str, query: Mapping[str, str]) -> Reply:
        bounds = (("pageNum", 1, MAX_PAGE_NUMBER), ("pageSize", DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE))
        values: list[int] = []
        for name, default, highest in bounds:
            text = query.get(name)
            try:
                value = default if text is None else int(text)
            except ValueError:
                value = 0
            if not 1 <= value <= highest:
                rejection = invalid(name, f"must be an integer between 1 and {highest}")
                return error(rejection.code, rejection.message)
            values.append(value)
        page, size = values
        tasks = self.book.order[endpoint]
        stop = len(tasks) - (page - 1) * size
        start = max(stop - size, 0)
        page_tasks = tasks[start:stop] if stop > 0 else []
        return ok("[" + ",".join(task.to_json() for task in reversed(page_tasks)) + "]")

    def _shape(self, reply: Reply) -> Reply:
        """``reply`` as :class:`WireShapes` bends Kling envelopes (not files or pages)."""
        shapes = self.options.shapes
        if reply.code is None or not shapes.bends_envelopes:
            return reply
        payload = json.loads(reply.body)
        status = reply.status
        if not shapes.request_id:
            payload.pop("request_id", None)
        if reply.code != 0:
            if not shapes.error_data:
                payload.pop("data", None)
            if shapes.error_http_status is not None:
                status = shapes.error_http_status
        body = json.dumps(payload, separators=(",", ":")).encode()
        return attrs.evolve(reply, status=status, body=body)
