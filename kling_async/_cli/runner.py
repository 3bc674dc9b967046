"""The batch runner behind ``kling-async batch``: a JSONL file of requests in,
one result line per request out, resumable (the journal remembers every create,
``results.jsonl`` keeps one record per input line however many runs it takes)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import attrs
import click
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

from kling_async._batch import Batch, BatchCost, BatchItem, BatchResult
from kling_async._client import Client
from kling_async._endpoints import declarations
from kling_async._exceptions import (
    BudgetExceededError,
    JournalInUseError,
    KlingError,
    TaskNotFoundError,
    ValidationError,
)
from kling_async._frontend import cost_record, save_images
from kling_async._journal import Journal
from kling_async._models import Task, TaskRequest, image_fields, request_from_mapping
from kling_async._resources import read_image_files
from kling_async._urls import url_scheme

from .session import CommandError, Settings

__all__: list[str] = []

JOURNAL_NAME = "kling-journal.db"

#: A line of the requests file: its number, and the request (with its key, if any).
Numbered = tuple[int, TaskRequest | BatchItem]


def _resolved_images(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Image paths in a request file, relative to the file's folder (not to
    wherever the command runs) when such a file exists."""

    def resolved(value: object) -> object:
        if not isinstance(value, str) or len(value) > 4096 or url_scheme(value) is not None:
            return value
        if value[:5].lower() == "data:" or os.path.isabs(value):
            return value
        candidate = folder / value
        try:
            if candidate.exists():
                return str(candidate)
            if ("/" in value or "." in value) and not Path(value).exists():
                # Meant as a file and found nowhere: reported where the file's
                # folder says it is, as the documentation promises.
                return str(candidate.absolute())
            return value
        except (OSError, ValueError):  # e.g. a name too long: base64, not a path
            return value

    fixed = dict(data)
    for name in _image_field_names():
        value = fixed.get(name)
        if isinstance(value, list):
            fixed[name] = [
                {**item, key: resolved(item.get(key))}
                if isinstance(item, dict) and (key := _WIRE_ITEM_KEYS.get(name)) is not None
                else resolved(item)
                for item in value
            ]
        elif value is not None:
            fixed[name] = resolved(value)
    return fixed


#: Kling's wire spelling of image lists, whose items are objects with the image in a key.
_WIRE_ITEM_KEYS = {"subject_image_list": "subject_image", "image_list": "image"}


def _image_field_names() -> set[str]:
    """Every image field of every declared request, and the wire spellings of lists."""
    names = {name for d in declarations() for name in image_fields(d.request_type)}
    return names | set(_WIRE_ITEM_KEYS)


def read_requests(settings: Settings, path: Path) -> tuple[list[Numbered], list[dict[str, Any]]]:
    """Parse a JSONL file: one request object (or a bare prompt string) per line.

    Returns the valid requests with their line numbers, and a result record for
    every invalid line (nothing is sent for those). A request object may carry a
    ``"key"``, its idempotency key (a :class:`BatchItem`'s): the line is that
    request whatever else changes in the file; one key per line. It names its
    endpoint with ``"endpoint"`` (``"images/omni-image"`` or ``"omni-image"``),
    or by fields only that endpoint's request has.
    """
    try:
        # utf-8-sig: a byte-order mark, as some Windows editors write, is not content.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise click.BadParameter(
            f"{path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
            f"{error.start}); save it as UTF-8",
            param_hint="REQUESTS_FILE",
        ) from None
    requests: list[Numbered] = []
    invalid: list[dict[str, Any]] = []
    key_lines: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            data = json.loads(line)
            key = None
            if isinstance(data, str):
                data = {"prompt": data}
            elif isinstance(data, dict):
                key = data.pop("key", None)
                data = _resolved_images(data, path.parent)
            request = read_image_files(request_from_mapping(data))
            if key is None:
                requests.append((number, request))
                continue
            item = BatchItem(request=request, key=key)
            if item.key in key_lines:
                raise ValidationError(
                    "key", f"{item.key!r} is also the key of line {key_lines[item.key]}"
                )
            key_lines[item.key] = number
            requests.append((number, item))
        except ValueError as error:
            if not isinstance(error, ValidationError):
                error = ValidationError("line", f"is not JSON ({error})")
            invalid.append(
                {"line": number, "status": "invalid", "error": settings.error_record(error)}
            )
    return requests, invalid


def request_of(item: TaskRequest | BatchItem) -> TaskRequest:
    """The request of a line, with or without its key."""
    return item.request if isinstance(item, BatchItem) else item


def pace(done: int, resumed: int, total: int, elapsed: float) -> tuple[str, str]:
    """The rate (per second) and time left of a batch run, from this run's work
    only: lines read back from an earlier run's journal end at once, and would
    make the run look many times faster than it is."""
    worked = max(done - resumed, 0)
    rate = worked / max(elapsed, 1e-6)
    left = total - done
    if left <= 0:
        return f"{rate:.1f}", "0:00:00"
    if worked == 0:
        return f"{rate:.1f}", "-:--:--"
    seconds = round(left / rate)
    return f"{rate:.1f}", f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class BatchProgress:
    """The live progress display of ``kling-async batch`` (on stderr)."""

    def __init__(
        self, settings: Settings, total: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[failed]} failed · {task.fields[running]} running"),
            TextColumn("· {task.fields[rate]}/s"),
            # Not rich's own estimate: it would count the lines an earlier run finished.
            TextColumn("[cyan]{task.fields[eta]}"),
            console=settings.stderr,
            disable=settings.as_json,
        )
        self.total = total
        self.task = self.progress.add_task(
            "generating", total=total, failed=0, running=0, rate="0.0", eta="-:--:--"
        )
        self.clock = clock
        self.started = clock()

    def update(self, batch: Batch, done: int, failed: int, resumed: int = 0) -> None:
        """Show ``done`` of the lines ended (``resumed`` of them read back from an
        earlier run), ``failed`` of them failed."""
        rate, eta = pace(done, resumed, self.total, self.clock() - self.started)
        self.progress.update(
            self.task,
            completed=done,
            failed=failed,
            # Created and not ended, on Kling: not the requests still queued here.
            running=len(batch.pending),
            rate=rate,
            eta=eta,
        )


class Results:
    """``results.jsonl``: one record per input line, whatever the number of runs.

    Records of earlier runs are read back (the newest of a line wins; a line
    torn by a kill is skipped) for the lines the input still has. This run's
    records are appended as they come, so a kill loses none already written,
    and the file is rewritten in line order, one record a line, when the run
    ends, however it ends.
    """

    def __init__(self, path: Path, lines: set[int]) -> None:
        self.path = path
        self.records: dict[int, dict[str, Any]] = {}
        self._file: IO[str] | None = None
        with contextlib.suppress(FileNotFoundError):
            for text in path.read_text(encoding="utf-8", errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(text)
                    if isinstance(record, dict) and record.get("line") in lines:
                        self.records[record["line"]] = record

    def __enter__(self) -> Results:
        self._rewrite()
        self._file = self.path.open("a", encoding="utf-8")
        return self

    def __exit__(self, *_exc_info: object) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._rewrite()

    def add(self, record: dict[str, Any]) -> None:
        """Keep ``record`` as its line's result, on disk at once."""
        self.records[record["line"]] = record
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def _rewrite(self) -> None:
        partial = self.path.with_name(f".{self.path.name}.partial")
        with partial.open("w", encoding="utf-8") as file:
            for line in sorted(self.records):
                file.write(json.dumps(self.records[line]) + "\n")
        os.replace(partial, self.path)


@attrs.frozen(kw_only=True)
class BatchJob:
    """What one run of ``kling-async batch`` works on, as its options gave it.

    ``numbered`` are the valid lines and ``invalid`` the records of the others;
    ``out`` where images go (``None``: not saved); ``results_path`` and
    ``journal`` the two files that make a run resumable; ``name`` the batch's
    name in the journal; ``concurrency`` and ``max_in_flight`` the limits;
    ``wait`` whether to wait for another run that holds the journal;
    ``max_units`` the batch's budget in units.
    """

    numbered: list[Numbered]
    invalid: list[dict[str, Any]]
    out: Path | None
    results_path: Path
    journal: Path
    name: str
    concurrency: int | None = None
    max_in_flight: int | None = None
    wait: bool = False
    #: ``--max-units``: the batch's budget, its earlier runs' spend included.
    max_units: Decimal | None = None

    @property
    def lines(self) -> list[int]:
        """The numbers of the valid lines, in file order."""
        return [number for number, _ in self.numbered]

    @property
    def keys(self) -> list[str | None]:
        """Each valid line's key, if it has one."""
        return [item.key if isinstance(item, BatchItem) else None for _, item in self.numbered]


def result_status(result: BatchResult) -> str:
    """A batch line's status: the task's, else ``gone`` (Kling no longer knows
    the task), ``refused`` (the budget left no room: nothing was sent) or
    ``error`` (no task)."""
    if result.task is not None:
        return str(result.task.status)
    if isinstance(result.error, BudgetExceededError):
        return "refused"
    return "gone" if isinstance(result.error, TaskNotFoundError) else "error"


@attrs.define(eq=False)
class BatchRun:
    """One run of ``kling-async batch``: results in, records and images out."""

    settings: Settings
    job: BatchJob
    results: Results
    display: BatchProgress
    succeeded: int = 0
    failed: int = 0
    resumed: int = 0
    #: Lines the budget refused (not sent; not counted in ``failed``).
    refused: int = 0
    #: What this run's results were estimated at and billed, and the lines an
    #: earlier run finished (read back from the journal).
    this_run: BatchCost = attrs.field(factory=BatchCost)
    earlier: BatchCost = attrs.field(factory=BatchCost)
    _saving: asyncio.Semaphore = attrs.field(factory=lambda: asyncio.Semaphore(8))
    _jobs: set[asyncio.Task[None]] = attrs.field(factory=set)

    async def run(self, client: Client, batch: Batch) -> None:
        """Take every result of ``batch`` as it ends, until the last."""
        ticker = asyncio.create_task(self._refresh(batch))
        try:
            async for result in batch:
                refused = isinstance(result.error, BudgetExceededError)
                self.refused += refused
                self.succeeded += result.ok
                self.failed += not result.ok and not refused
                self.resumed += result.resumed
                if result.resumed:
                    self.earlier = self.earlier.adding(result)
                else:
                    self.this_run = self.this_run.adding(result)
                job = asyncio.create_task(self._finish(client, result))
                self._jobs.add(job)
                job.add_done_callback(self._jobs.discard)
                self._show(batch)
        finally:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
            # Records and images of results already out, even when interrupted.
            await asyncio.gather(*self._jobs, return_exceptions=True)
            self._show(batch)

    def _show(self, batch: Batch) -> None:
        done = self.succeeded + self.failed + self.refused
        self.display.update(batch, done, self.failed, self.resumed)

    async def _refresh(self, batch: Batch) -> None:
        # Between results too: tasks go in flight long before the first ends.
        while True:
            self._show(batch)
            await asyncio.sleep(0.5)

    def record(self, result: BatchResult) -> dict[str, Any]:
        """The result line of ``result``, before its images are saved."""
        handle = result.handle
        record: dict[str, Any] = {
            "line": self.job.lines[result.index],
            "task_id": handle.task_id if handle else None,
            "external_task_id": (
                handle.external_task_id if handle else result.request.external_task_id
            ),
            "status": result_status(result),
            "error": self.settings.error_record(result.error) if result.error else None,
        }
        key = self.job.keys[result.index]
        if key is not None:
            record["key"] = key
        if result.resumed:
            record["resumed"] = True
        record["estimate"] = str(result.estimate) if result.estimate is not None else None
        record["cost"] = cost_record(result.cost)
        return record

    async def _finish(self, client: Client, result: BatchResult) -> None:
        record = self.record(result)
        task = result.task
        if result.ok and task is not None and self.job.out is not None:
            try:
                record["paths"] = [str(path) for path in await self._save(client, task, result)]
            except (KlingError, OSError) as error:
                # The task succeeded but its images are not here: a failure to
                # report on its line, not a reason to stop the others.
                self.failed += 1
                self.succeeded -= 1
                record["error"] = self.settings.error_record(error)
                record["images"] = [image.url for image in task.images]
        elif task is not None:
            record["images"] = [image.url for image in task.images]
        self.results.add(record)
        if self.settings.as_json:
            click.echo(json.dumps(record))
        elif isinstance(result.error, BudgetExceededError):
            self.settings.stderr.print(
                f"line {record['line']}: not sent: {escape(record['error']['message'])}",
                soft_wrap=True,
            )

    async def _save(self, client: Client, task: Task, result: BatchResult) -> list[Path]:
        async with self._saving:
            try:
                return await self._download(client, task, result.request)
            except (KlingError, OSError):
                if not result.resumed:
                    raise
            # Read back from the journal, its URLs may be stale: ask Kling again.
            fresh = await client.images.get(task.task_id, endpoint=result.request.endpoint)
            return await self._download(client, fresh, result.request)

    async def _download(self, client: Client, task: Task, request: TaskRequest) -> list[Path]:
        """The images, and the watermarked copies when the line asked for them
        (``watermark_info``), as ``generate --watermark`` saves them."""
        out = self.job.out
        assert out is not None
        return await save_images(client, task, out, watermarked=bool(request.watermark))


async def run_batch(settings: Settings, job: BatchJob) -> BatchRun:
    """Run ``job``. The journal is taken first: a second run on the same --out
    is refused (or waits) before it writes anything, results included."""
    owned = await _own_journal(settings, job.journal, job.wait)
    try:
        return await _run_owned(settings, job, owned)
    finally:
        await owned.close()


async def _own_journal(settings: Settings, path: Path, wait: bool) -> Journal:
    """The batch's journal, owned by this run; refused while another run holds it,
    unless ``wait``."""
    journal = Journal(path)
    try:
        await journal.open()
        return journal
    except JournalInUseError as error:
        await journal.close()
        if not wait:
            raise CommandError(
                f"{path} is in use by {error.owner}: another run is working on this --out. "
                "Let it finish (or stop it), or run with --wait to start when it ends."
            ) from None
        settings.stderr.print(
            f"waiting for {escape(error.owner)} to finish with {escape(str(path))}"
        )
    journal = Journal(path, wait=math.inf)
    try:
        await journal.open()
    except BaseException:
        await journal.close()
        raise
    return journal


async def _run_owned(settings: Settings, job: BatchJob, journal: Journal) -> BatchRun:
    display = BatchProgress(settings, len(job.numbered))
    results = Results(job.results_path, {*job.lines, *(line["line"] for line in job.invalid)})
    run = BatchRun(settings, job, results, display)
    with results, display.progress:
        for line in job.invalid:
            results.add(line)
            if settings.as_json:
                click.echo(json.dumps(line))
        async with settings.client(max_concurrency=job.concurrency) as client:
            batch = client.batch(
                (item for _, item in job.numbered),
                max_in_flight=job.max_in_flight,
                journal=journal,
                name=job.name,
                max_units=job.max_units,
            )
            settings.batch = batch
            await run.run(client, batch)
    return run
