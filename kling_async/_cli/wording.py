"""The CLI's words for what went wrong: flags and commands, not Python calls,
and where to look next (the flag that finds another endpoint's task, the key to
check)."""

from __future__ import annotations

import re
from collections.abc import Mapping

import attrs

from kling_async._auth import ENV_ACCESS_KEY, ENV_API_KEY, ENV_SECRET_KEY
from kling_async._endpoints import declaration_for
from kling_async._exceptions import (
    APIError,
    AuthenticationError,
    ConcurrencyLimitError,
    NotFoundError,
    TaskNotFoundError,
    TaskTimeoutError,
    ValidationError,
)
from kling_async._frontend import describe as describe_any
from kling_async._models import Endpoint

__all__: list[str] = []

_INDEXED_FIELD = re.compile(r"(\w+)\[(\d+)\]")


def endpoint_flag(endpoint: Endpoint) -> str:
    """The flag that points ``status``, ``list`` and ``download`` at ``endpoint``'s
    tasks, with a leading space (``""`` for text-to-image, the default)."""
    if endpoint is Endpoint.GENERATIONS:
        return ""
    if endpoint is Endpoint.MULTI_IMAGE:
        return " --multi-image"
    return f" --endpoint {declaration_for(endpoint).cli_name}"


def endpoint_kind(endpoint: Endpoint) -> str:
    """The endpoint's tasks in a word: ``text-to-image``, ``multi-image``, ``omni-image``."""
    if endpoint is Endpoint.GENERATIONS:
        return "text-to-image"
    return declaration_for(endpoint).cli_name


@attrs.frozen(kw_only=True)
class Wording:
    """How a command words failures: ``flags`` spell its request fields (none:
    the field names), ``endpoint`` is whose tasks it looks at, and where the key
    came from decides which one to check."""

    flags: Mapping[str, str] | None = None
    endpoint: Endpoint = Endpoint.GENERATIONS
    key_given: bool = False
    key_from_env: bool = False

    def describe(self, error: BaseException) -> str:
        """``error`` in one line."""
        if isinstance(error, ValidationError):
            return f"invalid {self.flag(error.field)}: {error.rule}; nothing was sent"
        if isinstance(error, TaskTimeoutError):
            task_id = error.handle.task_id
            return (
                f"task {task_id} did not finish within {error.timeout:g}s; it keeps running: "
                f"check it later with: kling-async status{endpoint_flag(self.endpoint)} {task_id}"
            )
        if isinstance(error, APIError):
            return self._api_error(error)
        if isinstance(error, UnicodeError):
            return f"cannot decode text: {error}"
        return describe_any(error)

    def flag(self, field: str) -> str:
        """The option that set ``field`` (``images[1]`` is ``--image #2``)."""
        if self.flags is None:
            return field
        indexed = _INDEXED_FIELD.fullmatch(field)
        if indexed is not None:
            name, position = indexed.groups()
            return f"{self.flags.get(name, name)} #{int(position) + 1}"
        return self.flags.get(field, field)

    def _api_error(self, error: APIError) -> str:
        text = str(error)
        if error.hint and text.endswith(error.hint):
            text = text[: -len(error.hint)].rstrip()
        if isinstance(error, TaskNotFoundError):
            return (
                f"{text} It is settled as gone and will not be created again. If it should "
                "exist, check --base-url and the key; else run the request again (a new task)."
            )
        if isinstance(error, NotFoundError):
            # Only the flags this command has: status and download take no --model.
            checks = (
                "the task id, --model and --base-url"
                if self.flags
                else "the task id and --base-url"
            )
            return f"{text} Check {checks}. {self._elsewhere()}"
        if isinstance(error, AuthenticationError):
            if self.key_given and not self.key_from_env:
                advice = "Check the key given with --api-key."
            elif self.key_given:
                advice = f"Check {ENV_API_KEY}."
            else:
                advice = (
                    f"Check {ENV_ACCESS_KEY} and {ENV_SECRET_KEY}, and that this machine's clock "
                    "is right (the token they sign is only valid for a while)."
                )
            return f"{text} {advice}"
        if isinstance(error, ConcurrencyLimitError):
            return (
                f"{text} Wait for running tasks to end, or run requests through "
                "kling-async batch --concurrency N to queue them."
            )
        return str(error)

    def _elsewhere(self) -> str:
        """Where a task of another endpoint is found (Kling keeps them apart)."""
        if self.endpoint is Endpoint.GENERATIONS:
            return (
                "A multi-image task is found only with --multi-image. Another endpoint's "
                "task only with --endpoint NAME."
            )
        flag = "--multi-image" if self.endpoint is Endpoint.MULTI_IMAGE else "--endpoint"
        return f"A text-to-image task is found only without {flag}."
