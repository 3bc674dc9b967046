"""One command per task endpoint (``generate``, ``multi-image``, ``omni-image``,
``expand``, ``multi-shot``, ``try-on``), each derived from its declaration: the
request model's fields are its argument and options, so a new endpoint needs no
code here."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from kling_async._endpoints import EndpointDeclaration, declarations
from kling_async._exceptions import TaskTimeoutError, UnknownPriceError
from kling_async._frontend import Estimates, cost_line, estimate_line, estimate_record
from kling_async._models import TaskRequest, build_request
from kling_async._resources import read_image_files

from .group import command
from .options import (
    dry_run_option,
    max_units_option,
    out_for,
    out_option,
    request_flags,
    request_options,
    request_values,
    timeout_option,
    writable_directory,
)
from .output import echo_record, follow_shown, save_images
from .session import Settings, current

__all__: list[str] = []


def _estimated(settings: Settings, request: TaskRequest) -> Decimal | None:
    """The request's estimate in units, ``None`` when the table has no price
    (a create under ``--max-units`` is then refused by the client itself)."""
    try:
        return settings.prices.estimate(request).units
    except UnknownPriceError:
        return None


async def _generate_and_save(
    settings: Settings, request: TaskRequest, out: Path | None, timeout: float | None
) -> None:
    estimate = _estimated(settings, request)
    async with settings.client() as client:
        handle = await client.images.submit(request)
        settings.submitted.append(handle.task_id)
        if not settings.as_json:
            settings.stderr.print(f"submitted task {handle.task_id}")
        try:
            task = await follow_shown(settings, handle, timeout)
        except TaskTimeoutError as error:
            if settings.as_json:
                click.echo(json.dumps(settings.timed_out_record(error)))
            raise
        watermarked = bool(request.watermark)
        paths = await save_images(settings, client, task, out, watermarked) if out else []
    if settings.as_json:
        echo_record(task, paths, estimate=estimate)
        return
    # On stderr: stdout holds only the paths (or URLs), for scripts.
    settings.stderr.print(escape(cost_line(task.cost, estimate)), soft_wrap=True)
    if paths:
        for path in paths:
            click.echo(str(path))
    else:
        for image in task.images:
            click.echo(image.url)
            if image.watermark_url and request.watermark:
                click.echo(image.watermark_url)


def print_estimate(settings: Settings, request: TaskRequest) -> None:
    """``--dry-run``: what ``request`` would cost, and that nothing was sent."""
    (item,) = Estimates.of([request], settings.prices).each
    if isinstance(item, UnknownPriceError):
        raise item
    if settings.as_json:
        click.echo(json.dumps({"dry_run": True, "estimate": estimate_record(item)}))
        return
    table = settings.prices
    click.echo(
        f"{estimate_line(item)}; prices of {table.as_of.isoformat()} ({table.source}); "
        "dry run: nothing was sent"
    )


def _create(declaration: EndpointDeclaration, values: dict[str, Any]) -> None:
    """Build the request (its files read: a ValidationError is reported by the
    flag that set the field), check the output folder, and only then create the
    task, wait for it and save its images."""
    settings = current()
    settings.endpoint = declaration.endpoint
    settings.flags = request_flags(declaration)
    out, no_download, timeout = values.pop("out"), values.pop("no_download"), values.pop("timeout")
    dry_run = values.pop("dry_run")
    settings.max_units = values.pop("max_units")
    request = read_image_files(
        build_request(declaration.request_type, request_values(declaration, values))
    )
    if dry_run:
        print_estimate(settings, request)
        return
    target = out_for(out, no_download)
    if target is not None:
        writable_directory(target)
    settings.run(lambda: _generate_and_save(settings, request, target, timeout))


def _task_command(declaration: EndpointDeclaration) -> click.Command:
    def run(**values: Any) -> None:
        _create(declaration, values)

    what = declaration.title
    run.__doc__ = (
        f"{what}: create a {declaration.path} task, wait for it, and save its images "
        "(print their URLs with --no-download)."
    )
    run.__name__ = declaration.method
    decorated = run
    for option in reversed(COMMON_OPTIONS):
        decorated = option(decorated)
    # Applied last, so listed first: the request's own options lead the help.
    decorated = request_options(declaration)(decorated)
    return command(declaration.cli_name)(decorated)


COMMON_OPTIONS = (
    out_option("Directory to save images in (created if missing)."),
    click.option(
        "--no-download",
        is_flag=True,
        help="Print the result URLs instead of saving the images (--out is then unused).",
    ),
    timeout_option,
    dry_run_option,
    max_units_option(
        "Refuse the create, sending nothing, if its estimate is more than UNITS "
        "resource-pack units (exit 3)."
    ),
)


COMMANDS = {declaration.cli_name: _task_command(declaration) for declaration in declarations()}
"""The task commands, by name."""
