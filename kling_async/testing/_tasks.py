"""The fake's record of one task."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Final

import attrs

from ._endpoints import outputs, task_result

__all__ = ["FakeTask"]

TERMINAL_STATUSES = frozenset(("succeed", "failed"))
FAIL_MARKER: Final = "[fail]"
"""A prompt containing this fails under the default ``outcome``."""
DEFAULT_FAILURE_MESSAGE: Final = "Content review failed (simulated)"
"""The ``task_status_msg`` of a task the default ``outcome`` fails."""


@attrs.define(kw_only=True, eq=False)
class FakeTask:
    """A task the fake server holds, in the state clients would see.

    ``endpoint`` is the path under ``/v1/`` (``"images/generations"`` or
    ``"images/multi-image2image"``); ``body`` the create request's JSON; ``images``
    the wire ``task_result.images`` list (empty until the task succeeds); times are
    Unix milliseconds from the server's ``clock``. Change a task through
    :meth:`FakeKlingServer.finish`, not by assigning to it.
    """

    task_id: str
    endpoint: str
    external_task_id: str | None
    body: dict[str, Any] = attrs.field(repr=False)
    n: int
    status: str = "submitted"
    status_message: str = ""
    created_at_ms: int
    updated_at_ms: int
    callback_url: str | None = None
    images: list[dict[str, Any]] = attrs.field(factory=list)
    final_unit_deduction: str = "0"
    _timers: list[asyncio.TimerHandle] = attrs.field(factory=list, init=False, repr=False)
    _json: str | None = attrs.field(default=None, init=False, repr=False)

    @property
    def is_terminal(self) -> bool:
        """True once the task has succeeded or failed."""
        return self.status in TERMINAL_STATUSES

    @property
    def prompt(self) -> str | None:
        """The request's prompt, if it had one."""
        value = self.body.get("prompt")
        return value if isinstance(value, str) else None

    @property
    def aspect_ratio(self) -> str:
        """The requested aspect ratio, Kling's default ``16:9`` if none was given."""
        value = self.body.get("aspect_ratio")
        return value if isinstance(value, str) else "16:9"

    @property
    def watermark(self) -> bool:
        """Whether a watermarked copy of each image was asked for."""
        info = self.body.get("watermark_info")
        return isinstance(info, dict) and info.get("enabled") is True

    def to_data(self) -> dict[str, Any]:
        """The task as a get, a list page or a callback carries it."""
        return {
            "task_id": self.task_id,
            "task_status": self.status,
            "task_status_msg": self.status_message,
            "task_info": {"external_task_id": self.external_task_id or ""},
            "created_at": self.created_at_ms,
            "updated_at": self.updated_at_ms,
            "final_unit_deduction": self.final_unit_deduction,
            "watermark_info": {"enabled": self.watermark},
            "task_result": task_result(self.endpoint, self.body, self.images),
        }

    def to_new_design(self) -> dict[str, Any]:
        """The task in the new-design callback format (``{id, status, outputs, ...}``)."""
        body: dict[str, Any] = {
            "id": self.task_id,
            "status": "succeeded" if self.status == "succeed" else self.status,
            "message": self.status_message,
            "outputs": outputs(self.endpoint, self.body, self.images),
            "create_time": self.created_at_ms,
            "update_time": self.updated_at_ms,
        }
        if self.external_task_id:
            body["external_id"] = self.external_task_id
        if self.is_terminal:
            body["billing"] = [
                {
                    "charge_type": "unit",
                    "amount": self.final_unit_deduction,
                    "package_type": "image",
                }
            ]
        return body

    def to_json(self) -> str:
        """:meth:`to_data` encoded, cached until the task next changes."""
        if self._json is None:
            self._json = json.dumps(self.to_data(), separators=(",", ":"))
        return self._json

    def _changed(self, now_ms: int) -> None:
        # Strictly increasing even under a frozen test clock, so receivers can
        # order updates by updated_at as Kling's docs tell them to.
        self.updated_at_ms = max(now_ms, self.updated_at_ms + 1)
        self._json = None

    def _cancel_timers(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()


def default_outcome(task: FakeTask) -> str | None:
    """The default ``outcome`` of FakeKlingServer: a prompt holding
    :data:`FAIL_MARKER` fails, every other task succeeds."""
    return DEFAULT_FAILURE_MESSAGE if FAIL_MARKER in (task.prompt or "") else None
