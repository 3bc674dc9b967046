"""What commands print: tasks (a table, or JSON lines), a live status line while
a task runs, and the images saved."""

from __future__ import annotations

import json
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

import click
from rich import box
from rich.console import Console
from rich.table import Table

from kling_async._client import Client
from kling_async._exceptions import KlingError
from kling_async._frontend import follow, task_record
from kling_async._frontend import save_images as save
from kling_async._handle import TaskHandle
from kling_async._models import Task, TaskStatus

from .session import CommandError, Settings
from .wording import endpoint_flag, endpoint_kind

__all__: list[str] = []

#: How often the status line is redrawn while a task runs.
STATUS_INTERVAL = 0.2


async def follow_shown(settings: Settings, handle: TaskHandle, timeout: float | None) -> Task:
    """Wait for the task, showing a live status line with elapsed time."""
    status = str(handle.status) if handle.status else "submitted"
    with settings.stderr.status(f"task {handle.task_id}: {status}") as line:

        async def tick(status: TaskStatus, elapsed: float) -> None:
            line.update(f"task {handle.task_id}: {status} · {elapsed:.1f}s")

        return await follow(handle, timeout, tick, STATUS_INTERVAL)


async def save_images(
    settings: Settings, client: Client, task: Task, out: Path, watermarked: bool
) -> list[Path]:
    """Download the task's images (and watermarked copies); a failure names the
    task and the command that fetches them later."""
    try:
        return await save(client, task, out, watermarked=watermarked)
    except (KlingError, OSError) as error:
        raise CommandError(
            f"task {task.task_id} succeeded, but saving its images failed: "
            f"{settings.describe(error)}; fetch them later with: "
            f"kling-async download{settings.multi_flag} {task.task_id} --out {out}"
        ) from error


def echo_record(task: Task, paths: Sequence[Path] = (), *, estimate: Decimal | None = None) -> None:
    """One task as a JSON line on stdout, with its cost (and estimate, when known)."""
    click.echo(json.dumps(task_record(task, paths, estimate=estimate)))


def print_tasks(settings: Settings, tasks: Sequence[Task]) -> None:
    """Tasks as JSON lines with ``--json``, else as a table; none found is said on stderr."""
    if settings.as_json:
        for task in tasks:
            echo_record(task)
    if not tasks:
        # Said on stderr, with --json too: an empty stdout alone reads as a failure.
        settings.stderr.print(_none_found(settings))
    if settings.as_json or not tasks:
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    # The id is what a user copies: never cut or wrapped, whatever the width.
    table.add_column("task_id", no_wrap=True, min_width=max(len(t.task_id) for t in tasks))
    table.add_column("status", no_wrap=True)
    table.add_column("created", no_wrap=True)
    table.add_column("images", justify="right")
    table.add_column("message", overflow="fold")
    for task in tasks:
        created = (
            task.created_at.astimezone().isoformat(sep=" ", timespec="seconds")
            if task.created_at
            else ""
        )
        table.add_row(
            task.task_id,
            str(task.status),
            created,
            str(len(task.images)),
            task.status_message or "",
        )
    Console().print(table)


def _none_found(settings: Settings) -> str:
    kind = endpoint_kind(settings.endpoint)
    if not settings.multi_flag:
        return (
            f"no {kind} tasks found (multi-image tasks are listed with --multi-image, other "
            "endpoints' with --endpoint NAME)"
        )
    flag = endpoint_flag(settings.endpoint).split()[0]
    return f"no {kind} tasks found (text-to-image tasks are listed without {flag})"
