"""Commands about tasks that exist: ``status``, ``list``, ``download`` and
``resume`` (the creates a journal holds that did not end)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape

from kling_async._exceptions import TaskFailedError, TaskNotFoundError
from kling_async._models import Task, TaskStatus

from .group import command
from .options import (
    chosen_endpoint,
    endpoint_options,
    out_option,
    timeout_option,
    writable_directory,
)
from .output import echo_record, print_tasks, save_images
from .runner import JOURNAL_NAME
from .session import CommandError, current

__all__: list[str] = []


@command()
@click.argument("task_id")
@endpoint_options
def status(task_id: str, multi: bool, endpoint_name: str | None) -> None:
    """Show one task, by its task id or your external task id."""
    settings = current()
    endpoint = chosen_endpoint(multi, endpoint_name)

    async def work() -> Task:
        async with settings.client() as client:
            return await client.images.get(task_id, endpoint=endpoint)

    print_tasks(settings, [settings.run(work)])


@command("list")
@click.option(
    "--limit",
    type=click.IntRange(1, 10_000),
    default=20,
    show_default=True,
    help="Show at most this many tasks.",
)
@endpoint_options
def list_tasks(limit: int, multi: bool, endpoint_name: str | None) -> None:
    """List recent tasks, newest first."""
    settings = current()
    endpoint = chosen_endpoint(multi, endpoint_name)

    async def work() -> list[Task]:
        async with settings.client() as client:
            return [
                task
                async for task in client.images.list(
                    endpoint=endpoint, page_size=min(limit, 500), limit=limit
                )
            ]

    print_tasks(settings, settings.run(work))


@command()
@click.argument("task_id")
@endpoint_options
@out_option("Directory to save images in (created if missing).")
@click.option(
    "--watermarked",
    is_flag=True,
    help="Save the watermarked copies (the task must have asked for them).",
)
def download(
    task_id: str, multi: bool, endpoint_name: str | None, out: Path, watermarked: bool
) -> None:
    """Save the images of a finished task; files already saved are skipped."""
    settings = current()
    endpoint = chosen_endpoint(multi, endpoint_name)
    writable_directory(out)
    already_there = set(out.iterdir())

    async def work() -> tuple[Task, list[Path]]:
        async with settings.client() as client:
            task = await client.images.get(task_id, endpoint=endpoint)
            if task.status is TaskStatus.FAILED:
                reason = task.status_message or "no reason given"
                raise CommandError(f"task {task.task_id} failed ({reason}); it has no images")
            if task.status is not TaskStatus.SUCCEED:
                raise CommandError(
                    f"task {task.task_id} is {task.status} and has no images yet; try again "
                    f"when kling-async status{settings.multi_flag} {task.task_id} says succeed"
                )
            return task, await client.download(task, out, watermarked=watermarked)

    task, paths = settings.run(work)
    skipped = sum(path in already_there for path in paths)
    if settings.as_json:
        echo_record(task, paths)
        return
    if skipped:
        settings.stderr.print(f"{skipped} of {len(paths)} files were already complete; skipped")
    for path in paths:
        click.echo(str(path))


@command()
@click.argument(
    "journal",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=JOURNAL_NAME,
    required=False,
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory to save the images of the tasks that succeed in [default: not saved].",
)
@timeout_option
def resume(journal: Path, out: Path | None, timeout: float) -> None:
    """Settle every create a journal holds that did not end (a batch's
    OUT/kling-journal.db, or any Client(journal=...) file), wait for the tasks,
    and print them.

    Tasks Kling created are re-attached; creates that may or may not have landed
    are looked up and sent again, under the same id, only if Kling has none.
    """
    settings = current()
    if out is not None:
        writable_directory(out)

    async def work() -> list[tuple[Task, list[Path]]]:
        async with settings.client(journal=journal) as client:
            handles = await client.resume()
            settings.submitted = [handle.task_id for handle in handles]
            if not handles:
                settings.stderr.print(f"nothing to resume in {journal}")
            done: list[tuple[Task, list[Path]]] = []
            for handle in handles:
                try:
                    task = await handle.wait(timeout=timeout)
                except TaskFailedError as error:
                    task = error.task
                except TaskNotFoundError as error:  # an outcome: say so, go on
                    settings.stderr.print(f"[yellow]{escape(settings.describe(error))}[/yellow]")
                    continue
                paths = []
                if out is not None and task.status is TaskStatus.SUCCEED:
                    paths = await save_images(settings, client, task, out, False)
                done.append((task, paths))
            return done

    finished = settings.run(work)
    if settings.as_json:
        for task, paths in finished:
            echo_record(task, paths)
    elif finished:
        print_tasks(settings, [task for task, _ in finished])
