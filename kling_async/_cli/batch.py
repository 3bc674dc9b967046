"""``kling-async batch``: every request of a JSONL file, resumable."""

from __future__ import annotations

import json
import sys
import time
from decimal import Decimal
from pathlib import Path

import click
from rich.markup import escape

from kling_async._batch import BatchCost
from kling_async._frontend import (
    EXIT_BUDGET,
    EXIT_ERROR,
    Estimates,
    estimate_line,
    estimate_record,
)
from kling_async._journal import Journal

from .group import command
from .options import (
    dry_run_option,
    max_units_option,
    out_for,
    out_option,
    writable_directory,
    writable_results,
)
from .runner import JOURNAL_NAME, BatchJob, Numbered, read_requests, request_of, run_batch
from .session import Settings, current, rerun_hint

__all__: list[str] = []


@command()
@click.argument("requests_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@out_option("Directory to save images in, and for results.jsonl (created if missing).")
@click.option(
    "--concurrency",
    type=click.IntRange(1, 10_000),
    default=None,
    help="The account's concurrency quota in units (a task holds n); learned if not given.",
)
@click.option(
    "--max-in-flight",
    type=click.IntRange(1),
    default=None,
    help="Cap on tasks running on Kling at once, whatever the quota.",
)
@click.option(
    "--results",
    "results_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to append one JSON line per request [default: OUT/results.jsonl].",
)
@click.option(
    "--no-download",
    is_flag=True,
    help="Do not save images: each result line (in the results file, and on stdout with "
    "--json) lists the image URLs instead.",
)
@click.option(
    "--wait",
    is_flag=True,
    help="If another run is working on this --out, wait for it to end instead of stopping.",
)
@click.option(
    "--fresh",
    is_flag=True,
    help=f"Start over: forget what earlier runs did (delete OUT/{JOURNAL_NAME} and the "
    "results file) instead of continuing where they stopped.",
)
@dry_run_option
@max_units_option(
    "Cap what the batch may spend, in resource-pack units, its earlier runs (the journal's) "
    "included: a line whose estimate no longer fits is not sent and is reported as refused "
    "(exit 3)."
)
def batch(
    requests_file: Path,
    out: Path,
    concurrency: int | None,
    max_in_flight: int | None,
    results_path: Path | None,
    no_download: bool,
    wait: bool,
    fresh: bool,
    dry_run: bool,
    max_units: Decimal | None,
) -> None:
    """Run every request of a JSONL file (one request object, or a prompt string,
    per line), download the images, and write one result line per request.

    Run it again after a crash, Ctrl-C or a kill and it continues where it
    stopped: a journal in the output directory remembers every create, so no
    line is created twice, what ended is not sent again, and the results file
    ends with exactly one record per line. --fresh starts over.

    A line is known by its content (identical lines are distinct requests), so
    fixing, adding or deleting other lines between runs never creates it again;
    editing it makes it a new request. A request object may carry its own
    "key" (a string, unique in the output directory): the line is then that
    key whatever its content, its idempotency key. It names its endpoint with
    "endpoint" (e.g. "omni-image"), else its fields decide (text-to-image if
    none says otherwise).

    Image paths in the file are relative to the file's folder. Invalid lines are
    reported and never sent. Exits 0 when every request succeeded, 3 when
    --max-units refused a line, 1 otherwise.
    """
    settings = current()
    if no_download and results_path is not None:
        out_for(out, no_download)  # --out would decide nothing: refused
    numbered, invalid = read_requests(settings, requests_file)
    for line in invalid:
        settings.stderr.print(
            f"line {line['line']}: {escape(line['error']['message'])}", soft_wrap=True
        )
    if not numbered and not invalid:
        settings.stderr.print(
            f"[yellow]warning: {escape(str(requests_file))} has no requests "
            "(only blank lines or # comments); nothing to do[/yellow]"
        )
        return
    if dry_run:
        _print_estimates(settings, numbered)
        if invalid:
            sys.exit(EXIT_ERROR)
        return
    results_path = results_path or out / "results.jsonl"
    if not no_download:
        writable_directory(out)
    writable_results(results_path)
    journal = (results_path.parent if no_download else out) / JOURNAL_NAME
    if fresh:
        Journal.discard(journal)  # refused while another run works on it
        results_path.unlink(missing_ok=True)
    settings.rerun = rerun_hint(sys.argv[1:], dropped=("--fresh",))
    job = BatchJob(
        numbered=numbered,
        invalid=invalid,
        out=None if no_download else out,
        results_path=results_path,
        journal=journal,
        name=requests_file.name,
        concurrency=concurrency,
        max_in_flight=max_in_flight,
        wait=wait,
        max_units=max_units,
    )
    started = time.monotonic()
    run = settings.run(lambda: run_batch(settings, job))
    invalid_note = f", {len(invalid)} invalid (not sent)" if invalid else ""
    refused_note = f", {run.refused} refused by --max-units (not sent)" if run.refused else ""
    earlier = f" ({run.resumed} finished in an earlier run)" if run.resumed else ""
    settings.stderr.print(
        f"{run.succeeded} succeeded{earlier}, {run.failed} failed{refused_note}{invalid_note} "
        f"in {time.monotonic() - started:.1f}s; {units_summary(run.this_run, run.earlier)}; "
        f"results in {results_path}",
        soft_wrap=True,
    )
    if run.refused:
        settings.stderr.print(
            "next step: raise --max-units and run the same command again: lines that ended "
            "are not sent again, and what they cost still counts",
            soft_wrap=True,
        )
        sys.exit(EXIT_BUDGET)
    if run.failed or invalid:
        sys.exit(EXIT_ERROR)


def _units(cost: BatchCost) -> str:
    text = f"{cost.estimated} estimated, {cost.deducted} deducted"
    if cost.unreported:
        text += f" ({cost.unreported} tasks with no deduction reported)"
    if cost.unpriced:
        text += f" ({cost.unpriced} tasks with no estimate)"
    return text


def units_summary(this_run: BatchCost, earlier: BatchCost) -> str:
    """The batch's units, estimated against deducted, in all and, when it
    resumed, this run's apart from what earlier runs' lines cost."""
    total = BatchCost(
        estimated=this_run.estimated + earlier.estimated,
        deducted=this_run.deducted + earlier.deducted,
        unreported=this_run.unreported + earlier.unreported,
        unpriced=this_run.unpriced + earlier.unpriced,
    )
    text = f"units: {_units(total)}"
    if earlier != BatchCost():
        text += f" (this run: {_units(this_run)}; earlier runs: {_units(earlier)})"
    return text


def _print_estimates(settings: Settings, numbered: list[Numbered]) -> None:
    """``--dry-run``: each valid line's estimate and the total, on stdout; exits 1
    when a line has no price (the total is then a lower bound). Nothing is sent
    and no file is written."""
    estimates = Estimates.of([request_of(item) for _, item in numbered], settings.prices)
    for (number, _), item in zip(numbered, estimates.each, strict=True):
        if settings.as_json:
            record = (
                {"line": number, "dry_run": True, "error": settings.error_record(item)}
                if isinstance(item, Exception)
                else {"line": number, "dry_run": True, "estimate": estimate_record(item)}
            )
            click.echo(json.dumps(record))
        else:
            click.echo(f"line {number}: {estimate_line(item)}")
    if settings.as_json:
        click.echo(json.dumps({"dry_run": True, "total": estimates.total_record()}))
    else:
        click.echo(estimates.total_line())
        settings.stderr.print("dry run: nothing was sent")
    if estimates.unknown:
        sys.exit(EXIT_ERROR)
