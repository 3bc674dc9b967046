"""``kling-async``: generate images from a terminal (needs the ``cli`` extra).

With no credentials set, or with ``--mock``, every command runs against an
embedded :class:`~kling_async.testing.FakeKlingServer` on loopback and says so on
stderr: a new user sees the whole flow, and gets real PNG files, offline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import attrs

try:
    import click
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.table import Table
except ImportError:  # pragma: no cover - only without the extra
    sys.exit("kling-async needs its CLI extra: pip install 'kling-async[cli]'")

from ._auth import ENV_ACCESS_KEY, ENV_API_KEY, ENV_SECRET_KEY
from ._batch import Batch, BatchResult
from ._client import Client
from ._config import ENV_BASE_URL
from ._exceptions import APIError, KlingError, NotFoundError, TaskFailedError, ValidationError
from ._handle import TaskHandle
from ._models import (
    ASPECT_RATIOS,
    IMAGE_REFERENCES,
    RESOLUTIONS,
    Endpoint,
    ImageGenerationRequest,
    MultiImageRequest,
    Task,
    TaskRequest,
    request_from_mapping,
)

__all__ = ["main"]

T = TypeVar("T")

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

OFFLINE_NOTICE = (
    "kling-async: OFFLINE SIMULATION - no API key is set (or --mock was given), so requests go "
    "to a fake Kling server on this machine. The images are placeholder PNGs, not "
    f"generations. Set {ENV_API_KEY} (or {ENV_ACCESS_KEY} and {ENV_SECRET_KEY}) to use Kling."
)


@attrs.define(kw_only=True)
class Settings:
    """What the global options resolved to, shared by every command."""

    api_key: str | None = attrs.field(repr=False)
    base_url: str | None
    mock: bool
    as_json: bool
    verbose: bool
    mock_task_seconds: float
    stderr: Console = attrs.field(factory=lambda: Console(stderr=True, highlight=False))
    #: Task ids created so far, reported if the run is interrupted.
    submitted: list[str] = attrs.field(factory=list)
    #: The batch being run, whose pending tasks an interruption reports.
    batch: Batch | None = None

    @property
    def offline(self) -> bool:
        # One key of the pair alone is a mistake to report, not a reason to simulate.
        has_keys = bool(os.environ.get(ENV_ACCESS_KEY) or os.environ.get(ENV_SECRET_KEY))
        return self.mock or not (self.api_key or has_keys)

    @contextlib.asynccontextmanager
    async def client(self, max_concurrency: int | None = None) -> AsyncIterator[Client]:
        """A client for the real API, or for an embedded fake server when offline."""
        if not self.offline:
            async with Client(
                self.api_key, base_url=self.base_url, max_concurrency=max_concurrency
            ) as client:
                yield client
            return
        from .testing import FakeKlingServer

        self.stderr.print(f"[yellow]{OFFLINE_NOTICE}[/yellow]")
        async with (
            FakeKlingServer(
                task_duration=self.mock_task_seconds,
                processing_delay=self.mock_task_seconds / 4,
            ) as server,
            Client(
                "offline-simulation", base_url=server.url, max_concurrency=max_concurrency
            ) as client,
        ):
            yield client

    def run(self, work: Callable[[], Awaitable[T]]) -> T:
        """Run ``work`` on a fresh loop and turn failures into one clear line."""
        try:
            return asyncio.run(_awaited(work))
        except KeyboardInterrupt:
            self._interrupted()
        except (KlingError, OSError, ValueError) as error:
            self._fail(error)

    def _interrupted(self) -> NoReturn:
        if self.batch is not None:
            self.submitted = [handle.task_id for handle in self.batch.pending]
        if self.submitted:
            ids = " ".join(self.submitted)
            self.stderr.print(
                f"interrupted; these tasks were submitted and keep running on Kling: {ids}\n"
                "check them with: kling-async status TASK_ID"
            )
        else:
            self.stderr.print("interrupted; nothing was submitted")
        sys.exit(EXIT_INTERRUPTED)

    def _fail(self, error: BaseException) -> NoReturn:
        if self.verbose:
            self.stderr.print_exception(show_locals=False)
        usage = isinstance(error, ValidationError)
        if self.as_json:
            click.echo(json.dumps({"error": _error_record(error)}), err=True)
        else:
            self.stderr.print(f"[red]error:[/red] {escape(_describe(error))}", soft_wrap=True)
        sys.exit(EXIT_USAGE if usage else EXIT_ERROR)


async def _awaited(work: Callable[[], Awaitable[T]]) -> T:
    return await work()


def _describe(error: BaseException) -> str:
    if isinstance(error, ValidationError):
        return f"invalid {error}; nothing was sent"
    if isinstance(error, TaskFailedError):
        return f"{error} (task {error.task.task_id})"
    if isinstance(error, NotFoundError):
        return f"{error} A multi-image task is found only with --multi-image."
    return str(error) or type(error).__name__


def _error_record(error: BaseException) -> dict[str, Any]:
    record: dict[str, Any] = {"type": type(error).__name__, "message": _describe(error)}
    if isinstance(error, APIError):
        record.update(code=error.code, request_id=error.request_id, http_status=error.http_status)
    if isinstance(error, ValidationError):
        record["field"] = error.field
    if isinstance(error, TaskFailedError):
        record["task_id"] = error.task.task_id
    return record


def _task_record(task: Task, paths: Sequence[Path] = ()) -> dict[str, Any]:
    return {
        "task_id": task.task_id,
        "status": task.status.value,
        "status_message": task.status_message,
        "external_task_id": task.external_task_id,
        "created_at": task.created_at.isoformat() if task.created_at else None,
        "updated_at": task.updated_at.isoformat() if task.updated_at else None,
        "images": [
            {"index": image.index, "url": image.url, "watermark_url": image.watermark_url}
            for image in task.images
        ],
        **({"paths": [str(path) for path in paths]} if paths else {}),
    }


async def _follow(settings: Settings, handle: TaskHandle, timeout: float | None) -> Task:
    """Wait for the task, showing a live status line with elapsed time."""
    started = time.monotonic()
    status = handle.status.value if handle.status else "submitted"

    async def watch() -> None:
        nonlocal status
        async for update in handle.updates():
            status = update.status.value

    with settings.stderr.status(f"task {handle.task_id}: {status}") as line:
        watcher = asyncio.create_task(watch())
        waiter = asyncio.ensure_future(handle.wait(timeout=timeout))
        try:
            while not waiter.done():
                line.update(f"task {handle.task_id}: {status} · {time.monotonic() - started:.1f}s")
                await asyncio.wait({waiter}, timeout=0.2)
            return waiter.result()
        finally:
            for task in (watcher, waiter):
                task.cancel()
            await asyncio.gather(watcher, waiter, return_exceptions=True)


async def _generate_and_save(
    settings: Settings, request: TaskRequest, out: Path, timeout: float | None, save: bool
) -> None:
    async with settings.client() as client:
        handle = await client.images.submit(request)
        settings.submitted.append(handle.task_id)
        if not settings.as_json:
            settings.stderr.print(f"submitted task {handle.task_id}")
        task = await _follow(settings, handle, timeout)
        paths = await client.download(task, out) if save else []
    if settings.as_json:
        click.echo(json.dumps(_task_record(task, paths)))
    elif paths:
        for path in paths:
            click.echo(str(path))
    else:
        for image in task.images:
            click.echo(image.url)


# --- commands ------------------------------------------------------------------

_timeout_option = click.option(
    "--timeout",
    type=float,
    default=1800.0,
    show_default=True,
    help="Give up waiting after this many seconds (the task keeps running).",
)
_out_option = click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Directory to save images in.",
)
_no_download_option = click.option(
    "--no-download", is_flag=True, help="Print result URLs instead of saving the images."
)


def _common_image_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            click.option("-n", "n", type=click.IntRange(1, 9), default=1, show_default=True),
            click.option(
                "--aspect-ratio",
                type=click.Choice(ASPECT_RATIOS),
                default="16:9",
                show_default=True,
            ),
            click.option("--model", "model_name", default=None, help="Model name."),
            click.option("--watermark", is_flag=True, help="Also produce watermarked copies."),
            _out_option,
            _no_download_option,
            _timeout_option,
        ]
    ):
        func = option(func)
    return func


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--api-key", envvar=ENV_API_KEY, default=None, help=f"Kling token [env: {ENV_API_KEY}]."
)
@click.option(
    "--base-url",
    envvar=ENV_BASE_URL,
    default=None,
    help=f"API root before /v1 [env: {ENV_BASE_URL}].",
)
@click.option(
    "--mock", is_flag=True, help="Use an embedded fake Kling server (offline simulation)."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logs and tracebacks.")
@click.option("--mock-task-seconds", type=float, default=1.5, hidden=True)
@click.version_option(package_name="kling-async")
@click.pass_context
def main(
    context: click.Context,
    api_key: str | None,
    base_url: str | None,
    mock: bool,
    as_json: bool,
    verbose: bool,
    mock_task_seconds: float,
) -> None:
    """Generate images with Kling from the command line.

    Without credentials (or with --mock) commands run against an offline
    simulation and say so on stderr.
    """
    if verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
    context.obj = Settings(
        api_key=api_key,
        base_url=base_url,
        mock=mock,
        as_json=as_json,
        verbose=verbose,
        mock_task_seconds=mock_task_seconds,
    )


def _settings() -> Settings:
    settings = click.get_current_context().obj
    assert isinstance(settings, Settings)
    return settings


def _validated(build: Callable[[], T]) -> T:
    """Build a request, reporting a ValidationError as the CLI's usage error."""
    try:
        return build()
    except ValidationError as error:
        _settings()._fail(error)


@main.command()
@click.argument("prompt")
@_common_image_options
@click.option("--negative-prompt", default=None, help="What to keep out of the image.")
@click.option("--image", default=None, help="Reference image: a path or an http(s) URL.")
@click.option("--image-reference", type=click.Choice(IMAGE_REFERENCES), default=None)
@click.option("--resolution", type=click.Choice(RESOLUTIONS), default=None)
def generate(
    prompt: str,
    n: int,
    aspect_ratio: str,
    model_name: str | None,
    watermark: bool,
    out: Path,
    no_download: bool,
    timeout: float,
    negative_prompt: str | None,
    image: str | None,
    image_reference: str | None,
    resolution: str | None,
) -> None:
    """Generate images from PROMPT, wait for them, and save them."""
    settings = _settings()
    fields: dict[str, Any] = {
        "prompt": prompt,
        "n": n,
        "aspect_ratio": aspect_ratio,
        "model_name": model_name,
        "watermark": watermark or None,
        "negative_prompt": negative_prompt,
        "image": image,
        "image_reference": image_reference,
        "resolution": resolution,
    }
    request = _validated(
        lambda: ImageGenerationRequest(**{k: v for k, v in fields.items() if v is not None})
    )
    settings.run(lambda: _generate_and_save(settings, request, out, timeout, not no_download))


@main.command("multi-image")
@click.argument("prompt", required=False)
@click.option(
    "--subject", "subjects", multiple=True, required=True, help="Subject image (1-4 times)."
)
@click.option("--scene", default=None, help="Scene reference image.")
@click.option("--style", default=None, help="Style reference image.")
@_common_image_options
def multi_image(
    prompt: str | None,
    subjects: tuple[str, ...],
    scene: str | None,
    style: str | None,
    n: int,
    aspect_ratio: str,
    model_name: str | None,
    watermark: bool,
    out: Path,
    no_download: bool,
    timeout: float,
) -> None:
    """Combine 1-4 subject images (plus optional scene and style) into new images."""
    settings = _settings()
    fields: dict[str, Any] = {
        "subject_images": list(subjects),
        "prompt": prompt,
        "scene_image": scene,
        "style_image": style,
        "n": n,
        "aspect_ratio": aspect_ratio,
        "model_name": model_name,
        "watermark": watermark or None,
    }
    request = _validated(
        lambda: MultiImageRequest(**{k: v for k, v in fields.items() if v is not None})
    )
    settings.run(lambda: _generate_and_save(settings, request, out, timeout, not no_download))


_endpoint_option = click.option(
    "--multi-image", "multi", is_flag=True, help="The task is a multi-image2image task."
)


def _endpoint(multi: bool) -> Endpoint:
    return Endpoint.MULTI_IMAGE if multi else Endpoint.GENERATIONS


def _print_tasks(settings: Settings, tasks: Sequence[Task]) -> None:
    if settings.as_json:
        for task in tasks:
            click.echo(json.dumps(_task_record(task)))
        return
    table = Table("task_id", "status", "created", "images", "message")
    for task in tasks:
        created = task.created_at.strftime("%Y-%m-%d %H:%M:%S") if task.created_at else ""
        table.add_row(
            task.task_id,
            task.status.value,
            created,
            str(len(task.images)),
            task.status_message or "",
        )
    Console().print(table)


@main.command()
@click.argument("task_id")
@_endpoint_option
def status(task_id: str, multi: bool) -> None:
    """Show one task (by task_id or external_task_id)."""
    settings = _settings()

    async def work() -> Task:
        async with settings.client() as client:
            return await client.images.get(task_id, endpoint=_endpoint(multi))

    _print_tasks(settings, [settings.run(work)])


@main.command()
@click.argument("task_id")
@_endpoint_option
@_out_option
def download(task_id: str, multi: bool, out: Path) -> None:
    """Save the images of a finished task; files already saved are skipped."""
    settings = _settings()
    already_there = set(out.iterdir()) if out.is_dir() else set()

    async def work() -> tuple[Task, list[Path]]:
        async with settings.client() as client:
            task = await client.images.get(task_id, endpoint=_endpoint(multi))
            if not task.images:
                raise ValueError(
                    f"task {task.task_id} is {task.status.value} and has no images to download"
                )
            return task, await client.download(task, out)

    task, paths = settings.run(work)
    skipped = sum(path in already_there for path in paths)
    if settings.as_json:
        click.echo(json.dumps(_task_record(task, paths)))
        return
    if skipped:
        settings.stderr.print(f"{skipped} of {len(paths)} files were already complete; skipped")
    for path in paths:
        click.echo(str(path))


def _read_requests(path: Path) -> tuple[list[tuple[int, TaskRequest]], list[dict[str, Any]]]:
    """Parse a JSONL file: one request object (or a bare prompt string) per line.

    Returns the valid requests with their line numbers, and a result record for
    every invalid line (nothing is sent for those).
    """
    requests: list[tuple[int, TaskRequest]] = []
    invalid: list[dict[str, Any]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            data = json.loads(line)
            if isinstance(data, str):
                data = {"prompt": data}
            requests.append((number, request_from_mapping(data)))
        except (ValueError, ValidationError) as error:
            if not isinstance(error, ValidationError):
                error = ValidationError("line", f"is not JSON ({error})")
            invalid.append({"line": number, "status": "invalid", "error": _error_record(error)})
    return requests, invalid


class _BatchProgress:
    """The live progress display of ``kling-async batch`` (on stderr)."""

    def __init__(self, settings: Settings, total: int) -> None:
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[failed]} failed · {task.fields[in_flight]} in flight"),
            TextColumn("· {task.fields[rate]}/s"),
            TimeRemainingColumn(),
            console=settings.stderr,
            disable=settings.as_json,
        )
        self.task = self.progress.add_task(
            "generating", total=total, failed=0, in_flight=0, rate="0.0"
        )
        self.started = time.monotonic()

    def update(self, batch: Batch, done: int, failed: int) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        self.progress.update(
            self.task,
            completed=done,
            failed=failed,
            in_flight=batch.in_flight,
            rate=f"{done / elapsed:.1f}",
        )


async def _run_batch(
    settings: Settings,
    numbered: list[tuple[int, TaskRequest]],
    invalid: list[dict[str, Any]],
    out: Path,
    results_path: Path,
    concurrency: int | None,
    max_in_flight: int | None,
    save: bool,
) -> tuple[int, int]:
    lines = [number for number, _ in numbered]
    display = _BatchProgress(settings, len(numbered) + len(invalid))
    succeeded, failed = 0, len(invalid)
    downloads: set[asyncio.Task[None]] = set()
    slots = asyncio.Semaphore(8)
    with results_path.open("a", encoding="utf-8") as results, display.progress:
        for record in invalid:
            results.write(json.dumps(record) + "\n")
        async with settings.client(max_concurrency=concurrency) as client:
            batch = client.batch((request for _, request in numbered), max_in_flight=max_in_flight)
            settings.batch = batch

            async def finish(result: BatchResult) -> None:
                record: dict[str, Any] = {
                    "line": lines[result.index],
                    "task_id": result.handle.task_id if result.handle else None,
                    "external_task_id": result.request.external_task_id,
                    "status": result.task.status.value if result.task else "error",
                    "error": _error_record(result.error) if result.error else None,
                }
                if result.ok and result.task is not None and save:
                    async with slots:
                        paths = await client.download(result.task, out)
                    record["paths"] = [str(path) for path in paths]
                elif result.task is not None:
                    record["images"] = [image.url for image in result.task.images]
                results.write(json.dumps(record) + "\n")
                if settings.as_json:
                    click.echo(json.dumps(record))

            async def refresh() -> None:
                # Between results too: tasks go in flight long before the first ends.
                while True:
                    display.update(batch, succeeded + failed, failed)
                    await asyncio.sleep(0.5)

            ticker = asyncio.create_task(refresh())
            try:
                async for result in batch:
                    if result.ok:
                        succeeded += 1
                    else:
                        failed += 1
                    job = asyncio.create_task(finish(result))
                    downloads.add(job)
                    job.add_done_callback(downloads.discard)
                    display.update(batch, succeeded + failed, failed)
            finally:
                ticker.cancel()
                await asyncio.gather(ticker, return_exceptions=True)
            await asyncio.gather(*downloads)
            display.update(batch, succeeded + failed, failed)
    return succeeded, failed


@main.command()
@click.argument("requests_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_out_option
@click.option(
    "--concurrency",
    type=click.IntRange(1, 10_000),
    default=None,
    help="The account's concurrency quota in units (a task holds n); learned if not given.",
)
@click.option("--max-in-flight", type=click.IntRange(1), default=None, help="Cap on running tasks.")
@click.option(
    "--results",
    "results_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to append one JSON line per request [default: OUT/results.jsonl].",
)
@_no_download_option
def batch(
    requests_file: Path,
    out: Path,
    concurrency: int | None,
    max_in_flight: int | None,
    results_path: Path | None,
    no_download: bool,
) -> None:
    """Run every request of a JSONL file (one request object, or a prompt string,
    per line), download the images, and write one result line per request.

    Exits 0 when every request succeeded, 1 otherwise.
    """
    settings = _settings()
    numbered, invalid = _read_requests(requests_file)
    out.mkdir(parents=True, exist_ok=True)
    results_path = results_path or out / "results.jsonl"
    started = time.monotonic()
    succeeded, failed = settings.run(
        lambda: _run_batch(
            settings,
            numbered,
            invalid,
            out,
            results_path,
            concurrency,
            max_in_flight,
            not no_download,
        )
    )
    invalid_note = f" ({len(invalid)} invalid lines)" if invalid else ""
    settings.stderr.print(
        f"{succeeded} succeeded, {failed} failed{invalid_note} in "
        f"{time.monotonic() - started:.1f}s; results in {results_path}",
        soft_wrap=True,
    )
    if failed:
        sys.exit(EXIT_ERROR)


@main.command("list")
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True)
@_endpoint_option
def list_tasks(limit: int, multi: bool) -> None:
    """List recent tasks, newest first."""
    settings = _settings()

    async def work() -> list[Task]:
        async with settings.client() as client:
            return [
                task
                async for task in client.images.list(
                    endpoint=_endpoint(multi), page_size=min(limit, 500), limit=limit
                )
            ]

    _print_tasks(settings, settings.run(work))


if __name__ == "__main__":  # pragma: no cover
    main()
