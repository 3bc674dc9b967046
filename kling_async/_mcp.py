"""``kling-async mcp``: Kling image generation as tools for AI agents (the ``mcp`` extra).

An MCP server, on the official ``mcp`` SDK's low-level ``Server``, over one
:class:`~kling_async.Client`: one create tool per task endpoint, derived from
its declaration (``generate_image``, ``multi_image``, ``omni_image``,
``expand_image``, ``multi_shot``, ``virtual_try_on``), and ``get_task``,
``list_tasks``, ``download_task`` and ``estimate``. Agents get what services
get: requests validated by the request models (an invalid field is named and
nothing is sent), creates that are never repeated (each goes through
``client.images.submit``, so the create owner and the ledger settle a lost
answer by lookup), and the account's concurrency quota.

The low-level server rather than the decorator API, because the tools' input
schemas are generated here from the request models (their fields, types,
defaults and Kling's limits), not from Python signatures.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, Protocol

try:
    import mcp.types as mcp_types
    import uvicorn
    from mcp.server.lowlevel import Server
    from mcp.server.stdio import stdio_server
    from mcp.shared.exceptions import MCPError, NoBackChannelError
except ImportError as error:  # only without the extra: say which extra, not which module
    raise ImportError(
        "kling-async mcp needs the official MCP SDK, its mcp extra: pip install "
        "'.[mcp]' in the kling-async checkout, or pip install mcp"
    ) from error

from ._client import Client
from ._endpoints import EndpointDeclaration, by_mcp_name, declarations
from ._exceptions import (
    APIError,
    BudgetExceededError,
    KlingError,
    NotFoundError,
    TaskFailedError,
    TaskTimeoutError,
    UnknownPriceError,
    ValidationError,
)
from ._frontend import (
    DEFAULT_CONFIRM_ABOVE,
    EXIT_INTERRUPTED,
    OFFLINE_NOTICE,
    Connection,
    Estimates,
    RequestField,
    budget_next_step,
    describe,
    error_record,
    estimate_record,
    follow,
    request_fields,
    save_images,
    task_record,
)
from ._handle import TaskHandle
from ._models import Endpoint, Task, TaskRequest, TaskStatus, _whole, build_request
from ._version import __version__

logger = logging.getLogger("kling_async")

#: The longest wait an agent may ask of one call; the task runs on regardless.
MAX_WAIT: Final = 1800.0
#: How often a waiting call sends a progress notification.
PROGRESS_INTERVAL: Final = 1.0
#: How many tasks ``list_tasks`` returns at most: a tool result lands in the
#: agent's context, where hundreds of tasks would crowd out everything else.
MAX_LIST: Final = 100

#: The key of the confirmation among a call's input requests (2026-07-28 MCP).
_CONFIRM_KEY: Final = "confirm_spend"
_CONFIRM_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "properties": {
        "confirm": {
            "type": "boolean",
            "title": "Create it",
            "description": "Spend the estimated units on this create.",
        }
    },
    "required": ["confirm"],
}

#: The ``kind`` of a task, named after the tool that creates it.
KINDS: Final[Mapping[str, Endpoint]] = {
    declaration.mcp_name: declaration.endpoint for declaration in declarations()
}
_KIND_OF: Final = {endpoint: kind for kind, endpoint in KINDS.items()}
_EPOCH: Final = datetime.fromtimestamp(0, timezone.utc)

# --- input schemas, from the request models ------------------------------------------

#: How an agent gives an image.
_IMAGE_FORMS = (
    "an absolute path of a file on the machine this server runs on, an http(s) URL Kling "
    "can fetch, or base64 data (a data: URL is accepted too)"
)
#: The tools that find a task by id.
_LOOKUPS = "get_task and download_task"
#: Request fields agents are not offered: this server follows its tasks itself,
#: and a callback URL an agent made up would only send Kling's posts elsewhere.
_HIDDEN_FIELDS: Final = frozenset({"callback_url"})


def _field_schema(field: RequestField, declaration: EndpointDeclaration) -> dict[str, Any]:
    """One request field as JSON schema: its type (of each item, for a list),
    the values a Literal allows, ``"auto"`` beside integers, Kling's limits."""
    item: dict[str, Any] = {"type": field.scalar}
    if field.choices is not None:
        item["enum"] = list(field.choices)
    if field.many:
        schema: dict[str, Any] = {"type": "array", "items": {**item, **field.item_limits}}
        schema.update(field.limits)
    elif field.auto:
        schema = {
            "anyOf": [{**item, **field.limits}, {"type": "string", "enum": ["auto"]}],
        }
    else:
        schema = {**item, **field.limits}
    if field.required and field.scalar == "string" and not field.many:
        schema["minLength"] = 1
    if field.default is not None:
        schema["default"] = field.default
    schema["description"] = field.describe(
        declaration, spell=str, forms=_IMAGE_FORMS, lookups=_LOOKUPS
    )
    return schema


def request_schema(declaration: EndpointDeclaration) -> dict[str, Any]:
    """The JSON schema of a request model's fields, as a tool's input schema.

    Types, choices, defaults and Kling's limits come from the model's attrs
    fields (``_frontend.request_fields``), descriptions from Kling's
    documentation. A field that is required in the model is required here.
    """
    fields = [
        field
        for field in request_fields(declaration.request_type)
        if field.name not in _HIDDEN_FIELDS
    ]
    return {
        "type": "object",
        "properties": {field.name: _field_schema(field, declaration) for field in fields},
        "required": [field.name for field in fields if field.required],
        "additionalProperties": False,
    }


def _timeout_schema(default: float, *, what: str) -> dict[str, Any]:
    return {
        "type": "number",
        "minimum": 0,
        "maximum": MAX_WAIT,
        "default": default,
        "description": f"Seconds to wait for the task to end {what}, with progress "
        "notifications meanwhile. When it is still running then, the result has its "
        "task_id and status: call get_task later. 0 returns at once.",
    }


_KIND_SCHEMA: Final = {
    "type": "string",
    "enum": list(KINDS),
    "description": "The tool that created the task (Kling keeps each endpoint's tasks "
    "apart). When omitted, every kind is searched.",
}
_TASK_ID_SCHEMA: Final = {
    "type": "string",
    "minLength": 1,
    "description": "The task_id a create returned, or the task's external_task_id.",
}

_CONFIRM_ARGUMENT: Final = {
    "type": "boolean",
    "default": False,
    "description": "The user agreed to spend this create's estimate. Needed only when a "
    "call came back with confirmation_required (its estimate is above this server's "
    "threshold): ask the user first, never set it on your own.",
}

_AFTER_CREATE = (
    "Returns the image URLs{paths}. If the task is still running when the wait ends, the "
    "result has its task_id: call get_task with it later, and do not call this tool again "
    "for the same images: that would create (and bill) a second task."
)


class KlingTools:
    """The tools this server offers, over one :class:`Client`.

    ``out`` is the folder successful tasks' images are saved in (``None``: not
    saved, URLs only); ``default_timeout`` how long a create waits for its task
    unless the agent says otherwise; ``offline`` whether the client talks to the
    embedded fake server, which every result then says. ``confirm_above`` is
    the estimate (units) above which a create asks the user first (``None``,
    the default here: never; ``kling-async mcp`` asks above
    :data:`DEFAULT_CONFIRM_ABOVE`). The session's budget is the client's
    (``Client(budget=)``).
    """

    def __init__(
        self,
        client: Client,
        *,
        out: Path | None,
        default_timeout: float,
        offline: bool,
        confirm_above: Decimal | None = None,
    ) -> None:
        self.client = client
        self.out = out
        self.default_timeout = default_timeout
        self.offline = offline
        #: A create estimated above this many units (or with no estimate) asks
        #: the user first; ``None``: never.
        self.confirm_above = confirm_above
        #: The kind of each task this server created or found, by task_id and
        #: external_task_id: get_task without a kind asks the right endpoint first.
        self._kinds: dict[str, Endpoint] = {}
        #: The tools as ``tools/list`` gives them.
        self.definitions = self._definitions()
        self._schemas = {tool.name: tool.input_schema for tool in self.definitions}
        self._handlers: dict[str, Handler] = {
            **{declaration.mcp_name: self._creator(declaration) for declaration in declarations()},
            "get_task": self.get_task,
            "list_tasks": self.list_tasks,
            "download_task": self.download_task,
            "estimate": self.estimate,
        }

    def _definitions(self) -> list[mcp_types.Tool]:
        paths = " and the paths of the saved files" if self.out else ""
        after_create = _AFTER_CREATE.format(paths=paths)
        create_timeout = _timeout_schema(self.default_timeout, what="after creating it")

        def create_tool(declaration: EndpointDeclaration) -> mcp_types.Tool:
            schema = request_schema(declaration)
            schema["properties"]["timeout"] = create_timeout
            schema["properties"]["confirm"] = _CONFIRM_ARGUMENT
            return mcp_types.Tool(
                name=declaration.mcp_name,
                title=f"{declaration.title} (Kling)",
                description=f"{declaration.title}, with Kling's {declaration.path}. Waits for "
                f"the task up to timeout seconds, sending progress notifications. {after_create}",
                input_schema=schema,
                annotations=mcp_types.ToolAnnotations(
                    read_only_hint=False,
                    destructive_hint=False,
                    idempotent_hint=False,
                    open_world_hint=True,
                ),
            )

        lookup = mcp_types.ToolAnnotations(read_only_hint=True, open_world_hint=True)
        saved = (
            f"saves their images in {self.out} and returns the paths"
            if self.out
            else "returns their image URLs (this server has no output folder to save them in)"
        )
        return [
            *(create_tool(declaration) for declaration in declarations()),
            mcp_types.Tool(
                name="estimate",
                title="Estimate a Kling task's cost",
                description="What a create would cost, from Kling's published prices, before "
                "anything is sent: its resource-pack units and their price. Give the create "
                "tool's name and the arguments you would call it with. Nothing is created. "
                "When the price table has no price for the request, the result says so "
                "instead of guessing.",
                input_schema={
                    "type": "object",
                    "properties": {
                        "tool": {
                            "type": "string",
                            "enum": list(KINDS),
                            "description": "The create tool the arguments are for.",
                        },
                        "arguments": {
                            "type": "object",
                            "description": "The arguments the create tool would be called "
                            "with (its timeout is ignored).",
                        },
                    },
                    "required": ["tool", "arguments"],
                    "additionalProperties": False,
                },
                annotations=mcp_types.ToolAnnotations(
                    read_only_hint=True, idempotent_hint=True, open_world_hint=False
                ),
            ),
            mcp_types.Tool(
                name="get_task",
                title="Get a Kling task",
                description="Look up one task by its task_id (or external_task_id): its "
                f"status, Kling's reason if it failed, its image URLs. For a finished task it "
                f"{saved}. With a timeout it also waits for a running task to end (e.g. one "
                "a create returned unfinished).",
                input_schema={
                    "type": "object",
                    "properties": {
                        "task_id": _TASK_ID_SCHEMA,
                        "kind": _KIND_SCHEMA,
                        "timeout": {**_timeout_schema(0, what="if it is running"), "default": 0},
                    },
                    "required": ["task_id"],
                    "additionalProperties": False,
                },
                annotations=lookup,
            ),
            mcp_types.Tool(
                name="list_tasks",
                title="List Kling tasks",
                description="List the account's recent tasks, newest first, with their "
                "status and image URLs.",
                input_schema={
                    "type": "object",
                    "properties": {
                        "kind": {
                            **_KIND_SCHEMA,
                            "description": "List only tasks of this kind [default: both].",
                        },
                        "limit": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": MAX_LIST,
                            "default": 10,
                            "description": "How many tasks to return at most.",
                        },
                    },
                    "additionalProperties": False,
                },
                annotations=lookup,
            ),
            mcp_types.Tool(
                name="download_task",
                title="Save a Kling task's images",
                description=(
                    f"Save the images of a task that succeeded in {self.out} and return the "
                    "paths; files already saved are skipped."
                    if self.out
                    else "Save the images of a task that succeeded. This server has no "
                    "output folder (kling-async mcp --out DIR), so it answers with an error; "
                    "get_task gives the image URLs."
                ),
                input_schema={
                    "type": "object",
                    "properties": {
                        "task_id": _TASK_ID_SCHEMA,
                        "kind": _KIND_SCHEMA,
                        "watermarked": {
                            "type": "boolean",
                            "default": False,
                            "description": "Save the watermarked copies instead (the task "
                            "must have been created with watermark).",
                        },
                    },
                    "required": ["task_id"],
                    "additionalProperties": False,
                },
                annotations=mcp_types.ToolAnnotations(
                    read_only_hint=False,
                    destructive_hint=False,
                    idempotent_hint=True,
                    open_world_hint=True,
                ),
            ),
        ]

    # --- calls ------------------------------------------------------------------

    async def call(
        self,
        name: str,
        arguments: Mapping[str, Any] | None,
        progress: Progress,
        asker: Asker | None = None,
    ) -> mcp_types.CallToolResult:
        """Run one tool; any failure of the tool is a tool error (``isError``)
        the agent reads, never a protocol error, which it would not see.
        ``asker`` asks the user to confirm a costly create (``None``: the
        client cannot be asked); it may raise :class:`_InputNeeded`, which
        passes through, for the server to answer the call with."""
        handler = self._handlers.get(name)
        if handler is None:
            raise MCPError(
                code=mcp_types.INVALID_PARAMS,
                message=f"unknown tool {name!r}; the tools are {', '.join(self._handlers)}",
            )
        try:
            if arguments is not None and not isinstance(arguments, Mapping):
                raise ValidationError("arguments", "must be a JSON object")
            _ASKER.set(asker)
            return self._result(await handler(dict(arguments or {}), progress))
        except _InputNeeded:
            raise
        except Exception as error:  # every failure reaches the agent, as one line
            if not isinstance(error, (KlingError, ToolError, OSError, ValueError, _OverBudget)):
                logger.exception("kling-async mcp: tool %s failed unexpectedly", name)
            return self._error(error)

    def _creator(self, declaration: EndpointDeclaration) -> Handler:
        async def create(arguments: dict[str, Any], progress: Progress) -> Record:
            timeout = _timeout(arguments.pop("timeout", None), self.default_timeout)
            confirmed = arguments.pop("confirm", False)
            if not isinstance(confirmed, bool):
                raise ValidationError("confirm", f"must be true or false; got {confirmed!r}")
            request = build_request(
                declaration.request_type, _request_fields(declaration, arguments)
            )
            estimate = self._estimate_of(request)
            if not confirmed and self._asks(estimate):
                refusal = await self._confirm(declaration, request, estimate)
                if refusal is not None:
                    return refusal
            try:
                handle = await self.client.images.submit(request)
            except BudgetExceededError as error:
                raise _OverBudget(error) from error
            return await self._created(handle, timeout, progress, estimate)

        create.__doc__ = f"``{declaration.mcp_name}``: create a task and wait for it."
        return create

    def _estimate_of(self, request: TaskRequest) -> Decimal | None:
        try:
            return self.client.estimate(request).units
        except UnknownPriceError:
            return None

    def _asks(self, estimate: Decimal | None) -> bool:
        """Whether a create of this estimate needs the user's yes. One with no
        estimate does (it cannot be shown to be under the threshold), unless a
        budget refuses it anyway."""
        if self.confirm_above is None:
            return False
        if estimate is None:
            return self.client.budget is None
        return estimate > self.confirm_above

    async def _confirm(
        self, declaration: EndpointDeclaration, request: TaskRequest, estimate: Decimal | None
    ) -> Record | None:
        """Ask the user, through MCP elicitation, whether to spend ``estimate``:
        ``None`` when they agreed, else the result that says nothing was sent."""
        what = (
            f"{estimate} units"
            if estimate is not None
            else "an amount the price table cannot estimate"
        )
        images = getattr(request, "n", None)
        message = (
            f"{declaration.mcp_name} will create a Kling task estimated at {what} "
            f"(this server asks above {self.confirm_above} units)"
            + (f" for {images} images" if isinstance(images, int) else "")
            + ". Create it?"
        )
        asker = _ASKER.get()
        answer = await asker(message) if asker is not None else None
        if answer == "accept":
            return None
        record: Record = {
            "tool": declaration.mcp_name,
            "sent": False,
            "estimate": str(estimate) if estimate is not None else None,
            "confirm_above": str(self.confirm_above),
        }
        if answer is None:
            record["confirmation_required"] = True
            record["next_step"] = (
                f"Nothing was sent. This create is estimated at {what}, above this server's "
                f"confirmation threshold of {self.confirm_above} units. Ask the user whether "
                f"to spend it; if they agree, call {declaration.mcp_name} again with the same "
                "arguments and confirm=true (or ask for fewer images)."
            )
        else:
            record["declined"] = True
            record["next_step"] = (
                "Nothing was sent: the user did not confirm spending "
                f"{what}. Do not call it again unless the user asks for it."
            )
        return record

    async def estimate(self, arguments: dict[str, Any], _progress: Progress) -> Record:
        """``estimate``: what a create tool's call would cost; sends nothing."""
        _only(arguments, "estimate", "tool", "arguments")
        tool = arguments.get("tool")
        if not isinstance(tool, str) or tool not in KINDS:
            raise ValidationError("tool", f"must be one of {', '.join(KINDS)}; got {tool!r}")
        given = arguments.get("arguments")
        if not isinstance(given, Mapping):
            raise ValidationError("arguments", "must be an object: the create tool's arguments")
        fields = {
            name: value for name, value in given.items() if name not in ("timeout", "confirm")
        }
        declaration = by_mcp_name(tool)
        request = build_request(declaration.request_type, _request_fields(declaration, fields))
        estimates = Estimates.of([request], self.client.prices)
        (item,) = estimates.each
        if isinstance(item, Exception):
            raise item
        return {
            "tool": tool,
            "estimate": estimate_record(item),
            "prices": estimates.total_record()["prices"],
            "sent": False,
            "needs_confirmation": self._asks(item.units),
        }

    async def get_task(self, arguments: dict[str, Any], progress: Progress) -> Record:
        """``get_task``: one task, optionally waited for, its images saved if it succeeded."""
        _only(arguments, "get_task", "task_id", "kind", "timeout")
        task_id = _task_id(arguments)
        timeout = _timeout(arguments.get("timeout"), 0.0)
        task, endpoint = await self._lookup(task_id, _kind(arguments))
        if not task.is_terminal and timeout > 0:
            handle = self.client.images.attach(task.task_id, endpoint=endpoint)
            try:
                task = await _follow(handle, timeout, progress) or handle.task or task
            except TaskFailedError as error:  # a lookup's answer, not a failure of this tool
                task = error.task
        return await self._record(task, endpoint)

    async def list_tasks(self, arguments: dict[str, Any], _progress: Progress) -> Record:
        """``list_tasks``: the newest tasks of one kind, or of both."""
        _only(arguments, "list_tasks", "kind", "limit")
        limit = _whole(arguments.get("limit", 10))
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST:
            raise ValidationError(
                "limit", f"must be an integer from 1 to {MAX_LIST}; got {limit!r}"
            )
        kind = _kind(arguments)
        endpoints = [kind] if kind else list(KINDS.values())
        tasks: list[tuple[Task, Endpoint]] = []
        for endpoint in endpoints:
            async for task in self.client.images.list(
                endpoint=endpoint, page_size=limit, limit=limit
            ):
                tasks.append((task, endpoint))
        # Newest first across both kinds, as each list is.
        tasks.sort(key=lambda pair: pair[0].created_at or _EPOCH, reverse=True)
        return {"tasks": [_task_record(task, endpoint) for task, endpoint in tasks[:limit]]}

    async def download_task(self, arguments: dict[str, Any], _progress: Progress) -> Record:
        """``download_task``: save a succeeded task's images in the output folder."""
        _only(arguments, "download_task", "task_id", "kind", "watermarked")
        task_id = _task_id(arguments)
        watermarked = arguments.get("watermarked", False)
        if not isinstance(watermarked, bool):
            raise ValidationError("watermarked", f"must be true or false; got {watermarked!r}")
        if self.out is None:
            raise ToolError(
                "this server has no output folder to save images in: start it with "
                "kling-async mcp --out DIR; get_task gives the image URLs meanwhile"
            )
        task, endpoint = await self._lookup(task_id, _kind(arguments))
        if task.status is TaskStatus.FAILED:
            raise TaskFailedError(task)
        if task.status is not TaskStatus.SUCCEED:
            raise ToolError(
                f"task {task.task_id} is {task.status} and has no images yet: call get_task "
                "with a timeout to wait for it, then download it"
            )
        record = _task_record(task, endpoint)
        record["paths"] = [
            str(path)
            for path in await self.client.download(task, self.out, watermarked=watermarked)
        ]
        return record

    # --- the parts the tools share ------------------------------------------------

    async def _created(
        self,
        handle: TaskHandle,
        timeout: float,
        progress: Progress,
        estimate: Decimal | None = None,
    ) -> Record:
        """After a create: remember the task, wait for it, record it (with its
        ``estimate``). A failed task raises :class:`TaskFailedError`: the tool
        failed to make images."""
        self._remember(handle.task_id, handle.external_task_id, handle.endpoint)
        await progress(0, timeout or None, f"task {handle.task_id} created on Kling")
        task = await _follow(handle, timeout, progress) or handle.task
        if task is None:  # Kling answered the create with a task_id alone
            task = Task(
                task_id=handle.task_id,
                status=TaskStatus.SUBMITTED,
                external_task_id=handle.external_task_id,
            )
        return await self._record(task, handle.endpoint, estimate)

    async def _record(
        self, task: Task, endpoint: Endpoint, estimate: Decimal | None = None
    ) -> Record:
        """The task as the agent gets it, with its cost (and ``estimate``): with
        the saved paths when it succeeded and there is an output folder, with
        what to do next when it runs on."""
        record = _task_record(task, endpoint, estimate)
        if task.status is TaskStatus.SUCCEED and self.out is not None:
            try:
                # The watermarked copies too when the task has them (it asked for them).
                watermarked = bool(task.images) and all(i.watermark_url for i in task.images)
                paths = await save_images(self.client, task, self.out, watermarked=watermarked)
                record["paths"] = [str(path) for path in paths]
            except (KlingError, OSError) as error:
                # The task succeeded (and was paid for): a tool error here would
                # invite the agent to create it again. The URLs are in the record.
                record["download_error"] = (
                    f"saving the images failed ({_describe(error)}); download_task fetches "
                    "them later"
                )
        elif not task.is_terminal:
            record["next_step"] = (
                f"The task is still {task.status} on Kling. Call get_task with task_id "
                f"{task.task_id!r} (and a timeout to wait for it) to get its images; do not "
                "create it again."
            )
        return record

    async def _lookup(self, task_id: str, endpoint: Endpoint | None) -> tuple[Task, Endpoint]:
        """Fetch a task from its endpoint: the one given, else the one it was
        seen at, else both in turn (Kling answers "not found" at the other)."""
        if endpoint is not None:
            candidates = [endpoint]
        elif task_id in self._kinds:
            known = self._kinds[task_id]
            candidates = [known, *(e for e in KINDS.values() if e is not known)]
        else:
            candidates = list(KINDS.values())
        for position, candidate in enumerate(candidates):
            try:
                task = await self.client.images.get(task_id, endpoint=candidate)
            except NotFoundError:
                if position == len(candidates) - 1:
                    raise
                continue
            self._remember(task.task_id, task.external_task_id, candidate)
            return task, candidate
        raise AssertionError("unreachable: the last candidate returns or raises")

    def _remember(self, task_id: str, external_task_id: str | None, endpoint: Endpoint) -> None:
        self._kinds[task_id] = endpoint
        if external_task_id:
            self._kinds[external_task_id] = endpoint

    def _result(self, data: Record) -> mcp_types.CallToolResult:
        data = self._with_notice(data)
        return mcp_types.CallToolResult(
            content=[mcp_types.TextContent(text=json.dumps(data, indent=2, ensure_ascii=False))],
            structured_content=data,
        )

    def _error(self, error: BaseException) -> mcp_types.CallToolResult:
        description = _describe(error)
        data = self._with_notice({"error": _error_record(error, description)})
        return mcp_types.CallToolResult(
            content=[
                mcp_types.TextContent(
                    text=f"error: {description}\n{json.dumps(data, indent=2, ensure_ascii=False)}"
                )
            ],
            structured_content=data,
            is_error=True,
        )

    def _with_notice(self, data: Record) -> Record:
        if not self.offline:
            return data
        return {"offline_simulation": True, "notice": OFFLINE_NOTICE, **data}


Record = dict[str, Any]
"""A tool's result: JSON-ready data."""


class Progress(Protocol):
    """Sends one MCP progress notification (a no-op when the caller asked for none)."""

    def __call__(
        self, progress: float, total: float | None = None, message: str | None = None
    ) -> Awaitable[None]: ...


Handler = Callable[[dict[str, Any], Progress], Awaitable[Record]]
"""A tool: its arguments and the caller's progress channel in, its result out."""


Asker = Callable[[str], Awaitable[str | None]]
"""Asks the user a yes/no question through MCP elicitation: ``"accept"`` (yes),
``"decline"`` or ``"cancel"``; ``None`` when the client cannot be asked."""

#: The running call's asker: concurrent calls each see their own.
_ASKER: contextvars.ContextVar[Asker | None] = contextvars.ContextVar("asker", default=None)


class _InputNeeded(Exception):
    """The call needs the user's answer first (2026-07-28 MCP): the client gets
    ``result`` and calls again with the answer."""

    def __init__(self, result: mcp_types.InputRequiredResult) -> None:
        super().__init__("input required")
        self.result = result


class _OverBudget(Exception):
    """The session's budget refused a create: nothing was sent."""

    def __init__(self, error: BudgetExceededError) -> None:
        super().__init__(str(error))
        self.error = error


class ToolError(Exception):
    """A tool cannot do what it was asked, for a reason of this server's (no output
    folder, a task with no images yet): reported to the agent as a tool error."""


async def _follow(handle: TaskHandle, timeout: float, progress: Progress) -> Task | None:
    """Wait up to ``timeout`` seconds for the task to end, sending a progress
    notification every :data:`PROGRESS_INTERVAL`. Returns the terminal task, or
    ``None`` if it is still running; raises :class:`TaskFailedError`."""
    if timeout <= 0:
        return None

    async def tick(status: TaskStatus, elapsed: float) -> None:
        if status.is_terminal:
            return  # its waiter ends on the next turn; the result reports it, not progress
        await progress(
            round(elapsed, 1), timeout, f"task {handle.task_id}: {status} ({elapsed:.0f}s)"
        )

    try:
        return await follow(handle, timeout, tick, PROGRESS_INTERVAL)
    except TaskTimeoutError:  # the task runs on; the agent comes back with get_task
        return None


def _task_record(task: Task, endpoint: Endpoint, estimate: Decimal | None = None) -> dict[str, Any]:
    return task_record(task, kind=_KIND_OF[endpoint], estimate=estimate)


def _describe(error: BaseException) -> str:
    """``error`` in one line for an agent: tool arguments, not Python calls."""
    if isinstance(error, _OverBudget):
        return f"this session's budget refused the create: {error.error}"
    if isinstance(error, ValidationError):
        return f"invalid {error.field}: {error.rule}; nothing was sent to Kling"
    return describe(error)


def _error_record(error: BaseException, description: str) -> dict[str, Any]:
    """``error`` as data: Kling's code, message, request_id and the SDK's hint;
    the invalid field; the failed task; the create's external_task_id; a
    budget's budget, spent, reserved and estimate."""
    if isinstance(error, _OverBudget):
        record = error_record(error.error, description)
        record["next_step"] = (
            budget_next_step(
                error.error, raise_with="ask the user; it is this server's --max-units"
            )
            + "; do not retry it as it is"
        )
        return record
    record = error_record(error, description)
    if not isinstance(error, KlingError):
        return record
    if isinstance(error, APIError):
        record["kling_message"] = error.message
        if error.hint:
            record["hint"] = error.hint
    if isinstance(error, TaskFailedError):
        record["task"] = error.task.to_dict()
    if error.external_task_id is not None:
        record["external_task_id"] = error.external_task_id
        record["create_outcome"] = error.create_outcome
        if "may exist" in (error.create_outcome or ""):
            # The SDK could not tell whether the create landed: a new create
            # could be a second, billed task, and get_task finds out.
            record["next_step"] = (
                "Kling may have created this task. Call get_task with task_id "
                f"{error.external_task_id!r} to find out before creating it again."
            )
    return record


# --- arguments -------------------------------------------------------------------------


def _request_fields(
    declaration: EndpointDeclaration, arguments: Mapping[str, Any]
) -> dict[str, Any]:
    """The request fields among a create's arguments (its timeout taken out).
    Unknown names are refused (a misspelt field must not be silently dropped),
    and whole numbers sent as floats (JSON has one number type) are taken as the
    integers they are, as request_from_mapping takes them; everything else is
    the request model's to check."""
    offered = {
        field.name: field
        for field in request_fields(declaration.request_type)
        if field.name not in _HIDDEN_FIELDS
    }
    _only(arguments, declaration.mcp_name, *offered, "timeout", "confirm")
    fields: dict[str, Any] = {}
    for name, value in arguments.items():
        field = offered[name]
        if field.scalar == "integer":
            value = [_whole(v) for v in value] if isinstance(value, list) else _whole(value)
        fields[name] = value
    return fields


def _only(arguments: Mapping[str, Any], tool: str, *names: str) -> None:
    for name in arguments:
        if name not in names:
            raise ValidationError(name, f"is not an argument of {tool}")


def _timeout(value: object, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_WAIT:
        raise ValidationError(
            "timeout", f"must be a number of seconds from 0 to {MAX_WAIT:g}; got {value!r}"
        )
    return float(value)


def _task_id(arguments: Mapping[str, Any]) -> str:
    task_id = arguments.get("task_id")
    if not isinstance(task_id, str) or not task_id.strip():
        raise ValidationError("task_id", "is required: the task_id a create returned")
    return task_id.strip()


def _kind(arguments: Mapping[str, Any]) -> Endpoint | None:
    kind = arguments.get("kind")
    if kind is None:
        return None
    if kind not in KINDS:
        raise ValidationError("kind", f"must be one of {', '.join(KINDS)}; got {kind!r}")
    return KINDS[kind]


# --- the server ------------------------------------------------------------------------

_INSTRUCTIONS = (
    "Kling image generation. One tool per Kling endpoint creates a task: "
    + "; ".join(f"{d.mcp_name}: {d.title[0].lower()}{d.title[1:]}" for d in declarations())
    + ". Each waits for its task (timeout, in seconds) and returns image URLs; a task still "
    "running at the timeout comes back with its task_id: call get_task with it later instead "
    "of creating it again, which would bill a second task. estimate says what a create would "
    "cost before anything is sent; every task result carries its cost (units deducted) and "
    "estimate. A create above the server's confirmation threshold asks the user first, or "
    "returns confirmation_required: then ask the user, and call again with confirm=true only "
    "if they agree. list_tasks shows recent tasks; download_task saves a "
    "finished task's images."
)


def _asker(context: Any, params: mcp_types.CallToolRequestParams) -> Asker | None:
    """How to ask this call's user: an elicitation request while the call waits
    (handshake-era MCP), or, on 2026-07-28 connections, which have no channel
    back, an input-required result the client answers by calling again.
    ``None`` when the client did not declare elicitation."""
    session = context.session
    wanted = mcp_types.ClientCapabilities(elicitation=mcp_types.ElicitationCapability())
    if not session.check_client_capability(wanted):
        return None

    async def ask(message: str) -> str | None:
        answered = (params.input_responses or {}).get(_CONFIRM_KEY)
        if answered is None:
            try:
                answered = await session.elicit_form(
                    message, _CONFIRM_SCHEMA, related_request_id=context.request_id
                )
            except NoBackChannelError:
                request = mcp_types.ElicitRequest(
                    params=mcp_types.ElicitRequestFormParams(
                        message=message, requested_schema=_CONFIRM_SCHEMA
                    )
                )
                raise _InputNeeded(
                    mcp_types.InputRequiredResult(input_requests={_CONFIRM_KEY: request})
                ) from None
        if not isinstance(answered, mcp_types.ElicitResult):
            return "decline"
        if answered.action == "accept" and (answered.content or {}).get("confirm") is not True:
            return "decline"  # the form sent back without a yes
        return answered.action

    return ask


def build_server(tools: KlingTools) -> Server[Any]:
    """The MCP server: ``tools/list`` and ``tools/call`` over ``tools``."""

    async def list_tools(_context: Any, _params: Any) -> mcp_types.ListToolsResult:
        return mcp_types.ListToolsResult(tools=tools.definitions)

    async def call_tool(
        context: Any, params: mcp_types.CallToolRequestParams
    ) -> mcp_types.CallToolResult | mcp_types.InputRequiredResult:
        try:
            return await tools.call(
                params.name,
                params.arguments,
                context.session.report_progress,
                _asker(context, params),
            )
        except _InputNeeded as needed:
            return needed.result

    instructions = _INSTRUCTIONS + (f" {OFFLINE_NOTICE}" if tools.offline else "")
    return Server(
        "kling-async",
        version=__version__,
        title="Kling image generation (kling-async)",
        instructions=instructions,
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(
    connection: Connection,
    *,
    http_port: int | None,
    out: Path | None,
    default_timeout: float,
    concurrency: int | None,
    max_units: Decimal | None = None,
    confirm_above: Decimal | None = DEFAULT_CONFIRM_ABOVE,
    say: Callable[[str], None] = _say,
) -> None:
    """Run ``kling-async mcp``: the tools over a client of ``connection`` (Kling,
    or the offline simulation with no key set), over stdio until the MCP client
    closes stdin, or over streamable HTTP on 127.0.0.1:``http_port`` until
    SIGINT or SIGTERM. ``max_units`` is the session's budget (the client's),
    ``confirm_above`` the estimate above which a create asks the user.
    ``say`` writes a line for the person who started it (stderr: stdout is
    the protocol)."""
    # Bound first: a port in use is one error line before anything starts.
    sock = _bind_loopback(http_port) if http_port is not None else None

    async def work() -> None:
        async with connection.client(
            max_concurrency=concurrency,
            budget=max_units,
            announce=lambda notice: say(f"kling-async: {notice}"),
            warn=lambda warning: say(f"warning: {warning}"),
        ) as client:
            tools = KlingTools(
                client,
                out=out,
                default_timeout=default_timeout,
                offline=connection.offline,
                confirm_above=confirm_above,
            )
            server = build_server(tools)
            if sock is None:
                async with stdio_server() as (read_stream, write_stream):
                    options = server.create_initialization_options()
                    await server.run(read_stream, write_stream, options)
            else:
                await _serve_http(server, sock, say)

    try:
        asyncio.run(work())
    except KeyboardInterrupt:  # Ctrl-C on a stdio server run by hand
        sys.exit(EXIT_INTERRUPTED)
    finally:
        if sock is not None:
            sock.close()


async def _serve_http(server: Server[Any], sock: socket.socket, say: Callable[[str], None]) -> None:
    host, port = sock.getsockname()[:2]
    app = server.streamable_http_app(host=host)
    web = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    loop = asyncio.get_running_loop()

    def stop() -> None:
        web.should_exit = True

    # uvicorn takes both signals while it serves and raises them again once it has
    # stopped; these handlers catch that second raise, so the client still closes
    # (and the offline simulation saves its tasks) before the process exits.
    handled: list[signal.Signals] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not on this platform
            loop.add_signal_handler(signum, stop)
            handled.append(signum)
    try:
        say(f"kling-async mcp: serving MCP over streamable HTTP at http://{host}:{port}/mcp")
        await web.serve(sockets=[sock])
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)


def _bind_loopback(port: int) -> socket.socket:
    """A TCP socket listening on 127.0.0.1 (``port`` 0 picks a free one)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        # Listening from now on: a client that reads the URL printed before
        # uvicorn starts up waits in the backlog instead of being refused.
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock
