"""Every exception kling_async raises, as one tree.

::

    KlingError
    ├── ValidationError (also a ValueError)   a request is invalid; nothing was sent
    ├── ConfigurationError (also a ValueError) credentials or settings are missing or wrong
    ├── ClientClosedError                     the client was closed while work was pending
    ├── JournalError                          the journal cannot be opened or written
    │   └── JournalInUseError                 another owner holds the journal
    ├── EventLoopError (also a RuntimeError)  a client used on two running event loops
    ├── TransportError                        the API could not be reached (connection, timeout)
    ├── TaskFailedError                       the task ended in ``failed``; ``.task`` says why
    ├── TaskTimeoutError (also a TimeoutError) a wait ran out; the handle stays usable
    ├── UnknownPriceError (also a LookupError) the price table cannot estimate a request
    ├── BudgetExceededError                   a create would take spending past a budget; not sent
    └── APIError                              Kling answered with an error code
        ├── AuthenticationError      1000-1004
        ├── QuotaExceededError       1100-1102   (HTTP 429, but never worth retrying)
        ├── PermissionDeniedError    1103, 1304
        ├── InvalidRequestError      1200, 1201
        ├── NotFoundError            1202, 1203
        │   └── TaskNotFoundError    Kling no longer knows a task it created (an outcome)
        ├── ContentPolicyError       1300, 1301
        ├── RateLimitError           1302        (retried with backoff)
        ├── ConcurrencyLimitError    1303        (retried once capacity frees)
        └── ServerError              5000-5002, HTTP 5xx (retried)

Only this module decides which class a Kling code maps to; the transport decides
*whether* to retry from :func:`is_retryable`, never from strings.
"""

from __future__ import annotations

import os
import socket
from datetime import datetime, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from ._handle import TaskHandle
    from ._models import Task

__all__ = [
    "APIError",
    "AuthenticationError",
    "BudgetExceededError",
    "ClientClosedError",
    "ConcurrencyLimitError",
    "ConfigurationError",
    "ContentPolicyError",
    "EventLoopError",
    "InvalidRequestError",
    "JournalError",
    "JournalInUseError",
    "KlingError",
    "NotFoundError",
    "PermissionDeniedError",
    "QuotaExceededError",
    "RateLimitError",
    "ServerError",
    "TaskFailedError",
    "TaskNotFoundError",
    "TaskTimeoutError",
    "TransportError",
    "UnknownPriceError",
    "ValidationError",
]


class KlingError(Exception):
    """Root of every error raised by kling_async: ``except KlingError`` catches them all.

    An error raised from a create carries the create's ``external_task_id`` (also
    in its message), so a task whose fate is unclear can always be looked up.
    """

    #: The external_task_id of the create this error ended, else ``None``.
    external_task_id: str | None = None
    #: What became of that create's task ("nothing was created", "it may exist..."),
    #: else ``None``.
    create_outcome: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The error as plain, JSON-ready data, e.g. for a results file or a log.

        Always ``type`` (the class name) and ``message``; beside them the fields
        a caller acts on: Kling's ``code``, ``request_id`` and ``http_status``
        for an :class:`APIError`, ``field`` and ``rule`` for a
        :class:`ValidationError`, the ``task_id`` of a :class:`TaskFailedError`.
        Nothing secret is in it: messages never carry credentials.
        """
        return {"type": type(self).__name__, "message": str(self)}

    def __reduce__(self) -> tuple[Any, ...]:
        # Job queues (arq) pickle a job's exception as its result: rebuilt from
        # its state, not by calling __init__ again with the message (subclasses
        # take other arguments, and the result could not be read back).
        return (_restore_error, (type(self), self.args, dict(self.__dict__)))


def _restore_error(
    cls: type[KlingError], args: tuple[Any, ...], state: dict[str, Any]
) -> KlingError:
    """A pickled :class:`KlingError` again (see ``KlingError.__reduce__``)."""
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class ValidationError(KlingError, ValueError):
    """A request field breaks one of Kling's rules; raised before anything is sent.

    ``field`` names the offending field (as the user spelled it, e.g. ``"prompt"`` or
    ``"subject_images[2]"``) and ``rule`` says what it must satisfy.
    """

    def __init__(self, field: str, rule: str) -> None:
        self.field = field
        self.rule = rule
        super().__init__(f"{field}: {rule}")

    def to_dict(self) -> dict[str, Any]:
        """:meth:`KlingError.to_dict`, with the ``field`` and its ``rule``."""
        return {**super().to_dict(), "field": self.field, "rule": self.rule}


class ConfigurationError(KlingError, ValueError):
    """The client is missing credentials or was given a setting it cannot use
    (an empty key, a ``base_url`` that is not an http(s) URL, a timeout that is
    not positive, ...). Also a ``ValueError``, as a bad argument value is."""


class EventLoopError(KlingError, RuntimeError):
    """A :class:`~kling_async.Client` was used on an event loop while still in use on
    another. A client serves one event loop at a time (used again after its loop
    ended, as by a second ``asyncio.run()``, it simply starts afresh)."""


class ClientClosedError(KlingError):
    """The client was closed while a call or a wait was still pending.

    Tasks already created keep running on Kling's side; re-attach to them with
    ``client.images.attach(task_id)`` on an open client.
    """


class JournalError(KlingError):
    """The journal cannot be used: it could not be opened, its writer failed, or
    entries recorded earlier are not committed yet (a failed commit). Raised to
    every operation waiting on it, chained (``__cause__``) to the reason; a
    create that meets it is not sent."""


class JournalInUseError(JournalError):
    """Another owner holds the journal: a journal has one owner at a time, so two
    runs never work on it together. ``pid``, ``host`` and ``since`` (Unix seconds)
    name the owner, when it could be read. Wait for it to end (``Journal(path,
    wait=...)``, ``kling-async batch --wait``) or stop it; an owner that died
    lets go by itself."""

    def __init__(
        self, path: str, *, pid: int | None, host: str | None, since: float | None
    ) -> None:
        self.path = path
        self.pid = pid
        self.host = host
        self.since = since
        super().__init__(f"the journal {path} is in use by {self.owner}; a journal has one owner")

    @property
    def owner(self) -> str:
        """The owner in words: ``process 123 on host-a since 2026-12-06 04:20:00 UTC``."""
        if self.pid is None:
            return "another process (it did not say which)"
        same = self.pid == os.getpid() and self.host == socket.gethostname()
        who = (
            f"this process (pid {self.pid}: another Journal object on the same file)"
            if same
            else f"process {self.pid} on {self.host}"
        )
        if self.since is None:
            return who
        when = datetime.fromtimestamp(self.since, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"{who} since {when}"


class TransportError(KlingError):
    """The request did not get a Kling answer: connection refused or reset, or a timeout.

    When a create fails this way the task may or may not exist; the client has
    already looked it up by ``external_task_id`` before giving up, so raising this
    means it could not tell and the create was not repeated beyond the retry budget.

    ``may_have_reached_server`` is False only when the connection was never made
    (refused, DNS failure), i.e. when Kling cannot have acted on the request.
    """

    def __init__(self, message: str, *, may_have_reached_server: bool = True) -> None:
        self.may_have_reached_server = may_have_reached_server
        super().__init__(message)


class TaskFailedError(KlingError):
    """The task reached ``failed``. ``task.status_message`` carries Kling's reason."""

    def __init__(self, task: Task) -> None:
        self.task = task
        reason = task.status_message or "no reason given"
        super().__init__(f"task {task.task_id} failed: {reason}")

    def to_dict(self) -> dict[str, Any]:
        """:meth:`KlingError.to_dict`, with the failed task's ``task_id``."""
        return {**super().to_dict(), "task_id": self.task.task_id}


class TaskTimeoutError(KlingError, TimeoutError):
    """A wait ran out before the task finished. The task keeps running and the
    handle stays usable: ``await error.handle`` or ``await error.handle.wait(...)``
    continues waiting."""

    def __init__(self, handle: TaskHandle, timeout: float) -> None:
        self.handle = handle
        self.timeout = timeout
        super().__init__(
            f"task {handle.task_id} did not finish within {timeout:g}s; it is still running, "
            "wait on the handle again or re-attach later with client.images.attach(task_id)"
        )


class UnknownPriceError(KlingError, LookupError):
    """The price table has no row for a request, so an estimate would be a guess.

    ``endpoint``, ``model_name`` and ``resolution`` say what is missing; add a
    :class:`~kling_async.Price` for it with ``PriceTable.replacing(...)``.
    """

    def __init__(self, endpoint: str, model_name: str, resolution: str, table: str) -> None:
        self.endpoint = endpoint
        self.model_name = model_name
        self.resolution = resolution
        super().__init__(
            f"no price for {endpoint} with model {model_name!r} at {resolution} in {table}; "
            "an estimate would be a guess: add a kling_async.Price for it with "
            "PriceTable.replacing(...)"
        )


class BudgetExceededError(KlingError):
    """A create was refused before anything was sent: its estimate would take
    spending past a budget (``Client(budget=...)``, ``client.batch(max_units=...)``).

    ``budget`` is the limit in resource-pack units, ``spent`` what ended tasks
    were billed, ``reserved`` the estimates of creates and tasks still running,
    ``estimate`` this request's; ``spent + reserved + estimate > budget``.
    ``name`` says which budget refused it. Nothing was created: raise the
    budget, or run the request once reserved tasks have ended (a task billed
    less than its estimate gives the difference back).
    """

    def __init__(
        self,
        *,
        budget: Decimal,
        spent: Decimal,
        reserved: Decimal,
        estimate: Decimal,
        name: str = "budget",
    ) -> None:
        self.budget = budget
        self.spent = spent
        self.reserved = reserved
        self.estimate = estimate
        self.name = name
        left = budget - spent - reserved
        super().__init__(
            f"{name} of {budget} units exceeded: this request is estimated at {estimate} "
            f"units, {spent} are spent and {reserved} reserved by tasks still running, "
            f"{max(left, Decimal(0))} left; nothing was sent. Raise the {name}, or run it "
            "again once the running tasks have ended"
        )


class APIError(KlingError):
    """Kling answered with an error.

    ``code`` is Kling's business code (``None`` when the body was not a Kling
    envelope), ``message`` its text, ``request_id`` the id to quote to Kling's
    support, ``http_status`` the HTTP status, ``retry_after`` the seconds a
    ``Retry-After`` header asked for (or ``None``).
    """

    hint: ClassVar[str] = ""

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        request_id: str | None = None,
        http_status: int | None = None,
        retry_after: float | None = None,
        body: Any = None,
    ) -> None:
        self.code = code
        self.message = message
        self.request_id = request_id
        self.http_status = http_status
        self.retry_after = retry_after
        self.body = body
        super().__init__(self._render())

    def to_dict(self) -> dict[str, Any]:
        """:meth:`KlingError.to_dict`, with Kling's ``code``, ``request_id`` and
        the ``http_status`` (each ``None`` when Kling did not say)."""
        return {
            **super().to_dict(),
            "code": self.code,
            "request_id": self.request_id,
            "http_status": self.http_status,
        }

    def _render(self) -> str:
        head = f"[{self.code}] {self.message}" if self.code is not None else self.message
        context = ", ".join(
            part
            for part in (
                f"HTTP {self.http_status}" if self.http_status is not None else "",
                f"request_id={self.request_id}" if self.request_id else "",
            )
            if part
        )
        text = f"{head} ({context})" if context else head
        if self.create_outcome is not None:
            text = f"{text} [external_task_id={self.external_task_id}: {self.create_outcome}]"
        return f"{text}. {self.hint}" if self.hint else text


class AuthenticationError(APIError):
    """Codes 1000-1004: the token is missing, invalid, not yet valid or expired."""

    hint = (
        "Check KLING_API_KEY (or KLING_ACCESS_KEY and KLING_SECRET_KEY) and that the "
        "machine's clock is right."
    )


class QuotaExceededError(APIError):
    """Codes 1100-1102: the account is abnormal, in arrears, or out of resource packs."""

    hint = "Top up or renew the account's resource pack; retrying will not help."


class PermissionDeniedError(APIError):
    """Code 1103 (no access to this endpoint or model) or 1304 (IP whitelist)."""

    hint = "Check the account's access to this model/endpoint and its IP whitelist."


class InvalidRequestError(APIError):
    """Codes 1200-1201: Kling rejected the request's parameters."""

    hint = "Fix the request; the message names what Kling rejected."


class NotFoundError(APIError):
    """Codes 1202-1203: the method, model or task does not exist."""

    hint = "Check the task id, model name and base_url."


class TaskNotFoundError(NotFoundError):
    """Kling answers "not found" (1203) for a task this client created or re-attached:
    it belongs to another account or ``base_url``, was purged, or was only ever
    simulated. An *outcome*, not a wait: the handle ends with this error (``await
    handle`` raises it, ``handle.done()`` is True), the task's concurrency units
    are given back, a batch reports it as the request's result and goes on, and a
    journal settles the entry as ``gone`` (a rerun reports it and creates nothing).

    ``task_id`` and ``external_task_id`` name the task. Nothing more will happen to
    it from this client; if it should exist, check ``base_url`` and credentials,
    else submit the request again (a new task, billed again).
    """

    hint = (
        "Kling does not know this task (another account or base_url, or purged): it is "
        "settled as gone. Check base_url and credentials, or submit the request again."
    )

    def __init__(
        self,
        message: str,
        *,
        task_id: str | None = None,
        external_task_id: str | None = None,
        **details: Any,
    ) -> None:
        self.task_id = task_id
        super().__init__(message, **details)
        if external_task_id is not None:
            self.external_task_id = external_task_id

    @classmethod
    def from_answer(
        cls, answer: APIError, task_id: str, external_task_id: str | None
    ) -> TaskNotFoundError:
        """The outcome for ``task_id`` after Kling answered ``answer`` to its lookup."""
        named = f"task {task_id}" + (
            f" (external_task_id {external_task_id})" if external_task_id else ""
        )
        error = cls(
            f"{named} is not known to Kling: {answer.message}",
            task_id=task_id,
            external_task_id=external_task_id,
            code=answer.code,
            request_id=answer.request_id,
            http_status=answer.http_status,
            body=answer.body,
        )
        error.__cause__ = answer
        return error


class ContentPolicyError(APIError):
    """Codes 1300-1301: the platform or content-safety policy refused the request."""

    hint = "Change the prompt or images; the same request will be refused again."


class RateLimitError(APIError):
    """Code 1302: requests arrive too fast. Retried automatically with backoff."""

    hint = "Slow down, or let the client's retries and limiter pace the requests."


class ConcurrencyLimitError(APIError):
    """Code 1303: the account's concurrency quota is full until running tasks end."""

    hint = "Wait for running tasks to finish, or set Client(max_concurrency=...) to queue locally."


class ServerError(APIError):
    """Codes 5000-5002 or an HTTP 5xx: Kling failed or is in maintenance. Retried."""

    hint = "Kling is failing or in maintenance; retry later."


_CODE_FAMILIES: tuple[tuple[range, type[APIError]], ...] = (
    (range(1000, 1005), AuthenticationError),
    (range(1100, 1103), QuotaExceededError),
    (range(1103, 1104), PermissionDeniedError),
    (range(1200, 1202), InvalidRequestError),
    (range(1202, 1204), NotFoundError),
    (range(1300, 1302), ContentPolicyError),
    (range(1302, 1303), RateLimitError),
    (range(1303, 1304), ConcurrencyLimitError),
    (range(1304, 1305), PermissionDeniedError),
    (range(5000, 5003), ServerError),
)

_HTTP_FALLBACK: dict[int, type[APIError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
}

#: The only HTTP statuses retried when the body carries no retryable Kling code.
RETRYABLE_HTTP_STATUSES = frozenset({502, 503, 504})
RETRYABLE_CODES = frozenset({1302, 5000, 5001, 5002})
#: Codes after which a JWT is signed afresh and the request repeated once.
RESIGN_CODES = frozenset({1003, 1004})


def for_create(error: KlingError, external_task_id: str, outcome: str) -> KlingError:
    """Mark ``error`` as the end of the create ``external_task_id`` and say in its
    message what became of the task (``outcome``). Returns the same error."""
    if error.external_task_id is not None:
        return error
    error.external_task_id = external_task_id
    error.create_outcome = outcome
    if isinstance(error, APIError):
        error.args = (error._render(),)  # before the hint: the hint stays last
    else:
        error.args = (f"{error} [external_task_id={external_task_id}: {outcome}]",)
    return error


def error_class_for(code: int | None, http_status: int | None) -> type[APIError]:
    """The exception class for Kling's ``code``, falling back on the HTTP status.

    An unknown 429 stays a plain :class:`APIError`: on Kling a 429 may be a quota
    problem (1100-1102, 1304) and retrying those only burns requests.
    """
    if code is not None:
        for codes, cls in _CODE_FAMILIES:
            if code in codes:
                return cls
    if http_status is not None:
        if http_status >= 500:
            return ServerError
        return _HTTP_FALLBACK.get(http_status, APIError)
    return APIError


def is_ambiguous(error: BaseException) -> bool:
    """Whether Kling may have acted on a request that failed this way: a connection
    lost after sending, a timeout, or a 5xx. A create that failed ambiguously is
    looked up by its external_task_id before it is sent again."""
    if isinstance(error, TransportError):
        return error.may_have_reached_server
    return isinstance(error, ServerError)


def means_task_unknown(error: BaseException) -> bool:
    """Whether the answer to a get *by task_id* says Kling has no such task: code
    1203 (HTTP 404). Neither 1202 (no such method) nor a bare 404 without a Kling
    code is: both are what a wrong ``base_url`` answers, a setting to fix, and
    settling every task as gone for it would lose them."""
    if isinstance(error, TaskNotFoundError):
        return True
    return isinstance(error, NotFoundError) and error.code == 1203


def is_retryable(error: BaseException) -> bool:
    """Whether repeating the same request can succeed: 1302, 5000-5002, 502/503/504,
    and transport failures. Everything else (auth, quota, 12xx, policy, 1304, 1303)
    is final for a plain retry; 1303 is the limiter's business, not the transport's."""
    if isinstance(error, TransportError):
        return True
    if isinstance(error, APIError):
        if error.code is not None and error.code in RETRYABLE_CODES:
            return True
        return error.code is None and error.http_status in RETRYABLE_HTTP_STATUSES
    return False
