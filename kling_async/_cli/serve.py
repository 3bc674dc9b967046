"""``kling-async mcp``: the CLI's one door into the MCP server (the mcp extra)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import click
from rich.markup import escape

from kling_async._frontend import DEFAULT_CONFIRM_ABOVE

from .group import command
from .options import finite, units_value, writable_directory
from .session import CommandError, current

__all__: list[str] = []


def confirm_value(
    context: click.Context, parameter: click.Parameter, value: str | None
) -> Decimal | None:
    """``--confirm-above``: units, or ``never`` (no confirmation)."""
    if value is None or value.strip().lower() == "never":
        return None
    return units_value(context, parameter, value)


@command()
@click.option(
    "--http",
    "http_port",
    type=click.IntRange(0, 65535),
    default=None,
    metavar="PORT",
    help="Serve streamable HTTP on 127.0.0.1:PORT (path /mcp; 0 picks a free port) instead "
    "of stdio.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory to save the images of finished tasks in; results then give the paths "
    "[default: not saved, URLs only].",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0, 1800),
    callback=finite,
    default=50.0,
    show_default=True,
    help="How long a create waits for its task unless the agent asks otherwise (under the "
    "60 s many MCP clients allow a call); a task still running then is returned by id.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 10_000),
    default=None,
    help="The account's concurrency quota in units (a task holds n): creates queue for it.",
)
@click.option(
    "--max-units",
    type=str,
    default=None,
    envvar="KLING_MCP_MAX_UNITS",
    metavar="UNITS",
    callback=units_value,
    help="The session's budget in resource-pack units: a create that would take what this "
    "server spent and reserved past it is refused, nothing sent (also KLING_MCP_MAX_UNITS) "
    "[default: no budget].",
)
@click.option(
    "--confirm-above",
    type=str,
    default=str(DEFAULT_CONFIRM_ABOVE),
    show_default=True,
    envvar="KLING_MCP_CONFIRM_ABOVE",
    metavar="UNITS",
    callback=confirm_value,
    help="A create estimated above UNITS (or that cannot be estimated) asks the user first, "
    "through MCP elicitation, or returns confirmation_required without spending; 'never' "
    "turns this off (also KLING_MCP_CONFIRM_ABOVE).",
)
def mcp(
    http_port: int | None,
    out: Path | None,
    timeout: float,
    concurrency: int | None,
    max_units: Decimal | None,
    confirm_above: Decimal | None,
) -> None:
    """Serve Kling image generation as MCP tools for AI agents (the mcp extra): one
    tool per task endpoint (generate_image, multi_image, omni_image, ...), and
    get_task, list_tasks, download_task and estimate.

    Speaks MCP over stdio (stdout is the protocol; messages go to stderr) until
    the client closes stdin, or over streamable HTTP on loopback with --http.
    """
    try:
        from kling_async import _mcp
    except ImportError as error:
        raise CommandError(str(error)) from None
    if out is not None:
        writable_directory(out)
    settings = current()
    _mcp.run(
        settings.connection,
        http_port=http_port,
        out=out.resolve() if out is not None else None,
        default_timeout=timeout,
        concurrency=concurrency,
        max_units=max_units,
        confirm_above=confirm_above,
        say=lambda text: settings.stderr.print(escape(text), soft_wrap=True, highlight=False),
    )
