"""``kling-async costs``: where the money went, from a batch's journal (per batch,
day, endpoint and model, estimated against deducted), and with credentials the
account's resource packs (``/account/costs``)."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

import click
from rich.markup import escape

from kling_async._budget import Spend, SpendGrouping
from kling_async._exceptions import JournalInUseError
from kling_async._frontend import EXIT_ERROR
from kling_async._journal import Journal

from .group import command
from .runner import JOURNAL_NAME
from .session import CommandError, Settings, current

__all__: list[str] = []

GROUPINGS = ("batch", "day", "endpoint", "model", "total")

#: Kling's own words on the account figure: "remaining_quantity" lags.
ACCOUNT_LAG = (
    "Kling's remaining figures lag by up to 12 hours: tasks of the last hours may not be "
    "counted yet"
)


def spend_record(by: str, spend: Spend) -> dict[str, Any]:
    """One group's spend as JSON-ready data; units as decimal strings."""
    return {
        "by": by,
        "group": spend.group,
        "tasks": spend.tasks,
        "estimated": str(spend.estimated),
        "deducted": str(spend.deducted),
        "running": spend.running,
        "unreported": spend.unreported,
        "unpriced": spend.unpriced,
    }


def spend_line(spend: Spend) -> str:
    """One group's spend in words."""
    line = (
        f"{spend.group}: {spend.tasks} tasks, {spend.estimated} units estimated, "
        f"{spend.deducted} deducted"
    )
    notes = [
        f"{spend.running} still running (their bill is to come)" if spend.running else "",
        f"{spend.unreported} ended with no deduction reported" if spend.unreported else "",
        f"{spend.unpriced} with no estimate" if spend.unpriced else "",
    ]
    notes = [note for note in notes if note]
    return line + (f" ({'; '.join(notes)})" if notes else "")


async def read_spend(path: Path, groupings: tuple[str, ...]) -> dict[str, list[Spend]]:
    """The journal's spend by each of ``groupings``. A journal a batch is
    running on is refused: its owner holds it."""
    journal = Journal(path)
    try:
        await journal.open()
        return {by: await journal.spend(by=cast(SpendGrouping, by)) for by in groupings}
    except JournalInUseError as error:
        raise CommandError(
            f"{path} is in use by {error.owner}; run costs again when that run has ended"
        ) from None
    finally:
        await journal.close()


async def account_packs(settings: Settings, days: int) -> list[dict[str, Any]]:
    """The account's resource packs active in the last ``days`` days."""
    end = datetime.now(timezone.utc)
    async with settings.client() as client:
        costs = await client.account.costs(start_time=end - timedelta(days=days), end_time=end)
    packs = []
    for pack in costs.packs:
        packs.append(
            {
                "resource_pack_name": pack.resource_pack_name,
                "resource_pack_type": pack.resource_pack_type,
                "total_quantity": pack.total_quantity,
                "remaining_quantity": pack.remaining_quantity,
                "status": pack.status,
                "invalid_time": pack.invalid_time.isoformat() if pack.invalid_time else None,
            }
        )
    return packs


@command()
@click.option(
    "--journal",
    "journal_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help=f"The journal to read [default: OUT/{JOURNAL_NAME}, the one batch writes].",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="The --out a batch ran with: its journal is read.",
)
@click.option(
    "--by",
    type=click.Choice([*GROUPINGS, "all"]),
    default="all",
    show_default=True,
    help="Group the spend by batch, day (UTC), endpoint or model, in total, or all of these.",
)
@click.option(
    "--account",
    is_flag=True,
    help="Show the account's resource packs instead (Kling's /account/costs; needs "
    "credentials). Kling's figure lags by hours.",
)
@click.option(
    "--days",
    type=click.IntRange(1, 366),
    default=30,
    show_default=True,
    help="With --account: the packs active in the last DAYS days.",
)
def costs(journal_path: Path | None, out: Path, by: str, account: bool, days: int) -> None:
    """Where the money went: what the creates a journal recorded were estimated
    at and billed (resource-pack units), per batch, day, endpoint and model; or,
    with --account, the account's resource packs and what remains of them.

    Reads the journal without sending anything to Kling (a journal a batch is
    running on is refused until it ends). Exits 1 when there is nothing to read.
    """
    settings = current()
    if account:
        _account(settings, days)
        return
    path = journal_path or out / JOURNAL_NAME
    if not path.is_file():
        raise CommandError(
            f"no journal at {path}: give the --out a batch ran with, or --journal PATH"
        )
    groupings = GROUPINGS if by == "all" else (by,)
    spends = settings.run(lambda: read_spend(path, groupings))
    for grouping, rows in spends.items():
        if settings.as_json:
            for row in rows:
                click.echo(json.dumps(spend_record(grouping, row)))
            continue
        click.echo(f"by {grouping}:")
        for row in rows:
            click.echo(f"  {spend_line(row)}")
        if not rows:
            click.echo("  nothing created")


def _account(settings: Settings, days: int) -> None:
    if settings.offline:
        settings.stderr.print(
            "[red]error:[/red] no account to ask: no Kling API key is set (or --mock was "
            "given), and the offline simulation has no resource packs. Set KLING_API_KEY "
            "(or KLING_ACCESS_KEY and KLING_SECRET_KEY) to see the account's packs.",
            soft_wrap=True,
        )
        sys.exit(EXIT_ERROR)
    packs = settings.run(lambda: account_packs(settings, days))
    if settings.as_json:
        click.echo(json.dumps({"packs": packs, "lag": ACCOUNT_LAG}))
        return
    for pack in packs:
        click.echo(
            f"{pack['resource_pack_name']}: {pack['remaining_quantity']} of "
            f"{pack['total_quantity']} remaining ({pack['status'] or 'status not given'}"
            + (f", valid until {pack['invalid_time']}" if pack["invalid_time"] else "")
            + ")"
        )
    if not packs:
        click.echo(f"no resource packs active in the last {days} days")
    settings.stderr.print(escape(f"note: {ACCOUNT_LAG}"), soft_wrap=True)
