"""The tasks a fake server holds, and the timers that move them through their life."""

from __future__ import annotations

import asyncio
import secrets
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import attrs

from ._billing import deduction
from ._callbacks import CallbackDispatcher
from ._endpoints import endpoints, units_of
from ._endpoints import result_images as endpoint_images
from ._files import result_images
from ._options import ServerOptions
from ._quota import UnitQuota
from ._tasks import FakeTask


@attrs.define(eq=False)
class TaskBook:
    """Every task by task_id and by external_task_id, each endpoint's tasks oldest
    first (for list pages), and the live ones.

    A task is created ``submitted``; timers on the event loop (real time, not the
    injected ``clock``, which only stamps times) move it to ``processing`` and to
    its end, which ``options.outcome`` decides. Each change is posted to its
    callback URL; the quota's units are held from create to end.
    """

    options: ServerOptions
    quota: UnitQuota
    callbacks: CallbackDispatcher
    tasks: dict[str, FakeTask] = attrs.field(factory=dict, init=False)
    by_external: dict[str, FakeTask] = attrs.field(factory=dict, init=False)
    #: Each endpoint's tasks, oldest first (an endpoint's list appears with its first task).
    order: defaultdict[str, list[FakeTask]] = attrs.field(
        factory=lambda: defaultdict(list), init=False
    )
    live: dict[str, FakeTask] = attrs.field(factory=dict, init=False)
    created: int = attrs.field(default=0, init=False)
    #: Called after every change of a task (created, processing, ended): the
    #: server's state file is written through from it.
    on_change: Callable[[], None] = attrs.field(default=lambda: None, init=False)
    _loop: asyncio.AbstractEventLoop | None = attrs.field(default=None, init=False)
    _origin: str = attrs.field(default="", init=False)

    @property
    def origin(self) -> str:
        """Where result files are served from (set by :meth:`open`)."""
        return self._origin

    def open(self, origin: str, saved: list[FakeTask]) -> None:
        """Start on the running loop, serving result files from ``origin``, with
        the ``saved`` tasks of an earlier server (oldest first)."""
        self._loop = asyncio.get_running_loop()
        self._origin = origin
        self._restore(saved)

    async def close(self) -> None:
        """Stop every task's timers and abandon pending callbacks."""
        for task in self.live.values():
            task._cancel_timers()
        await self.callbacks.close()

    def create(self, endpoint: str, body: dict[str, Any], external: str | None) -> FakeTask:
        """Create a task from a validated create ``body`` and start its timers."""
        task_id = secrets.token_hex(12)
        while task_id in self.tasks:  # pragma: no cover - 96 random bits
            task_id = secrets.token_hex(12)
        now = self._now_ms()
        callback_url = body.get("callback_url")
        task = FakeTask(
            task_id=task_id,
            endpoint=endpoint,
            external_task_id=external,
            body=body,
            n=units_of(endpoint, body),
            created_at_ms=now,
            updated_at_ms=now,
            callback_url=callback_url if isinstance(callback_url, str) else None,
        )
        self._add(task)
        self.live[task_id] = task
        self.created += 1
        self.quota.change(task.n)
        self._schedule(task)
        self.on_change()
        return task

    def end(self, task: FakeTask, failure: str | None) -> None:
        """End a live ``task``: it succeeds, or fails with ``failure``."""
        task._cancel_timers()
        if failure is None:
            task.status = "succeed"
            task.status_message = ""
            task.final_unit_deduction = str(
                deduction(self.options.prices, task.endpoint, task.body, task.n)
            )
            task.images = self._images(task)
        else:
            task.status = "failed"
            task.status_message = failure
            task.final_unit_deduction = "0"
            task.images = []
        task._changed(self._now_ms())
        del self.live[task.task_id]
        self.quota.change(-task.n)
        self.on_change()
        self.callbacks.notify(task)

    def _now_ms(self) -> int:
        return int(self.options.clock() * 1000)

    def _add(self, task: FakeTask) -> None:
        self.tasks[task.task_id] = task
        if task.external_task_id is not None:
            self.by_external[task.external_task_id] = task
        self.order[task.endpoint].append(task)

    def _images(self, task: FakeTask) -> list[dict[str, Any]]:
        files = result_images(self._origin, task, self.options.shapes.image_index)
        return endpoint_images(task.endpoint, files)

    def _schedule(self, task: FakeTask, elapsed: float = 0.0) -> None:
        """Start the task's timers; ``elapsed`` seconds of its life have passed."""
        assert self._loop is not None
        options = self.options
        duration = (
            options.task_duration(task)
            if callable(options.task_duration)
            else options.task_duration
        )
        if duration is None or options.processing_delay < duration:
            task._timers.append(
                self._loop.call_later(
                    max(options.processing_delay - elapsed, 0.0), self._start_processing, task
                )
            )
        if duration is not None:
            task._timers.append(
                self._loop.call_later(max(duration - elapsed, 0.0), self._time_up, task)
            )

    def _start_processing(self, task: FakeTask) -> None:
        if task.status != "submitted":
            return
        task.status = "processing"
        task._changed(self._now_ms())
        self.on_change()
        self.callbacks.notify(task)

    def _time_up(self, task: FakeTask) -> None:
        if not task.is_terminal:
            self.end(task, self.options.outcome(task))

    def _restore(self, saved: list[FakeTask]) -> None:
        # Finished tasks get result URLs of this server, running ones their
        # remaining time.
        now = self._now_ms()
        for task in saved:
            if task.task_id in self.tasks or task.endpoint not in endpoints():
                continue
            self._add(task)
            if task.status == "succeed":
                task.images = self._images(task)
            elif not task.is_terminal:
                self.live[task.task_id] = task
                self.quota.change(task.n)
                self._schedule(task, elapsed=max(now - task.created_at_ms, 0) / 1000)
