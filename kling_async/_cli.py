"""The ``kling-async`` commands (needs the ``cli`` extra; ``kling_async.cli``
imports this module only when the command runs).

With no credentials set, or with ``--mock``, every command runs against an
embedded :class:`~kling_async.testing.FakeKlingServer` on loopback and says so on
stderr: a new user sees the whole flow, and gets real PNG files, offline. The
simulation keeps its tasks in the user's cache directory, so ``status``,
``list`` and ``download`` find what an earlier ``generate`` made.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import os
import re
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn, TypeVar

import attrs
import click
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
)
from rich.table import Table

from ._auth import ENV_ACCESS_KEY, ENV_API_KEY, ENV_SECRET_KEY
from ._batch import Batch, BatchItem, BatchResult
from ._client import Client
from ._config import ENV_BASE_URL
from ._durations import user_cache_dir
from ._exceptions import (
    APIError,
    AuthenticationError,
    ConcurrencyLimitError,
    JournalInUseError,
    KlingError,
    NotFoundError,
    TaskFailedError,
    TaskNotFoundError,
    TaskTimeoutError,
    ValidationError,
)
from ._handle import TaskHandle
from ._journal import Journal
from ._models import (
    ASPECT_RATIOS,
    IMAGE_REFERENCES,
    MAX_ELEMENT_ID,
    RESOLUTIONS,
    Endpoint,
    ImageGenerationRequest,
    MultiImageRequest,
    Task,
    TaskRequest,
    TaskStatus,
    build_request,
    request_from_mapping,
)
from ._records import records
from ._resources import read_image_files
from ._urls import url_scheme

__all__: list[str] = []

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process it terminated

OFFLINE_NOTICE = (
    "kling-async: OFFLINE SIMULATION - no API key is set (or --mock was given), so requests go "
    "to a fake Kling server on this machine. The images are placeholder PNGs, not "
    f"generations. Set {ENV_API_KEY} (or {ENV_ACCESS_KEY} and {ENV_SECRET_KEY}) to use Kling."
)

#: The request fields of ``generate`` and ``multi-image`` as their options are
#: spelled, so an invalid value is reported by the flag the user typed.
FLAGS: Mapping[str, str] = {
    "prompt": "PROMPT",
    "negative_prompt": "--negative-prompt",
    "image": "--image",
    "image_reference": "--image-reference",
    "image_fidelity": "--image-fidelity",
    "human_fidelity": "--human-fidelity",
    "element_ids": "--element-id",
    "resolution": "--resolution",
    "n": "-n",
    "aspect_ratio": "--aspect-ratio",
    "model_name": "--model",
    "watermark": "--watermark",
    "callback_url": "--callback-url",
    "external_task_id": "--external-task-id",
    "subject_images": "--subject",
    "scene_image": "--scene",
    "style_image": "--style",
}
_INDEXED_FIELD = re.compile(r"(\w+)\[(\d+)\]")
_IMAGE_FIELDS = ("image", "subject_images", "subject_image_list", "scene_image", "style_image")


#: Options whose value is a credential, and the environment variable that can
#: carry it instead: a hint that shows the command line never shows their values.
CREDENTIAL_OPTIONS: Mapping[str, str] = {
    "--api-key": ENV_API_KEY,
    "--access-key": ENV_ACCESS_KEY,
    "--secret-key": ENV_SECRET_KEY,
}


def rerun_hint(arguments: Sequence[str], *, dropped: Sequence[str] = ()) -> str:
    """The line that tells how to continue an interrupted run: the command as typed
    (``arguments`` without the program name), less the flags in ``dropped`` and
    less every credential option with its value (``--api-key X`` or
    ``--api-key=X``), whose environment variable the line names instead.

    Terminal scrollback, CI logs and log collectors keep stderr: a key typed on
    the command line must not be copied there.
    """
    kept: list[str] = []
    needs: dict[str, str] = {}  # option -> its environment variable
    position = 0
    while position < len(arguments):
        argument = arguments[position]
        position += 1
        if argument == "--":  # the rest are arguments, whatever they look like
            kept.extend(arguments[position - 1 :])
            break
        name = argument.partition("=")[0]
        if name in CREDENTIAL_OPTIONS:
            needs[name] = CREDENTIAL_OPTIONS[name]
            if "=" not in argument:
                position += 1  # its value is the next argument
            continue
        if argument not in dropped:
            kept.append(argument)
    command = shlex.join(["kling-async", *kept])
    if not needs:
        return f"run it again to continue where it stopped: {command}"
    where = " and ".join(f"the value of {option} in {env}" for option, env in needs.items())
    return f"run it again to continue where it stopped, with {where}: {command}"


def offline_state_file() -> Path:
    """Where the offline simulation keeps its tasks: the user's cache directory
    (``$XDG_CACHE_HOME``, else the platform's own), ``kling-async/offline-tasks.json``."""
    return user_cache_dir() / "kling-async" / "offline-tasks.json"


class CommandError(Exception):
    """A failure the CLI words itself: printed as is, exit 2 when ``usage``."""

    def __init__(self, message: str, *, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


@attrs.define(kw_only=True)
class Settings:
    """What the global options resolved to, shared by every command."""

    api_key: str | None = attrs.field(repr=False)
    api_key_from_env: bool = False
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
    #: Whether the command looks at multi-image tasks (for the not-found hint).
    multi: bool = False
    #: The line telling how to continue an interrupted run (:func:`rerun_hint`),
    #: if it can be continued.
    rerun: str | None = None
    #: How this command's options spell request fields, if it takes them.
    flags: Mapping[str, str] | None = None

    @property
    def offline(self) -> bool:
        # One key of the pair alone is a mistake to report, not a reason to simulate.
        has_keys = bool(os.environ.get(ENV_ACCESS_KEY) or os.environ.get(ENV_SECRET_KEY))
        return self.mock or not (self.api_key or has_keys)

    @contextlib.asynccontextmanager
    async def client(
        self, max_concurrency: int | None = None, journal: Path | None = None
    ) -> AsyncIterator[Client]:
        """A client for the real API, or for an embedded fake server when offline."""
        if not self.offline:
            async with Client(
                self.api_key,
                base_url=self.base_url,
                max_concurrency=max_concurrency,
                journal=journal,
            ) as client:
                yield client
            return
        from .testing import FakeKlingServer

        self.stderr.print(f"[yellow]{OFFLINE_NOTICE}[/yellow]")
        state = offline_state_file()
        server = FakeKlingServer(
            task_duration=self.mock_task_seconds,
            processing_delay=self.mock_task_seconds / 4,
            state_file=state,
        )
        await server.start()
        try:
            async with Client(
                "offline-simulation",
                base_url=server.url,
                max_concurrency=max_concurrency,
                journal=journal,
            ) as client:
                yield client
        finally:
            try:
                await server.close()
            except OSError as error:
                self.stderr.print(
                    f"[yellow]warning: the offline simulation could not save its tasks in "
                    f"{escape(str(state))} ({error.strerror or error}); later commands will "
                    "not know them[/yellow]",
                    soft_wrap=True,
                )

    def run(self, work: Callable[[], Awaitable[T]]) -> T:
        """Run ``work`` on a fresh loop and turn failures into one clear line.

        Ctrl-C and SIGTERM both stop it the same way: the work is cancelled, so
        creates on the wire settle, records are written and the client closes,
        then the submitted tasks are named (exit 130, or 143 for SIGTERM).
        """
        terminated: list[bool] = []
        try:
            return asyncio.run(_awaited(work, terminated, self._stop_now))
        except KeyboardInterrupt:
            self._interrupted(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED)

    def _stop_now(self) -> NoReturn:
        """A second SIGTERM while the first one's clean stop runs: whatever that
        stop waits for (a create on the wire, a journal that does not answer),
        the process ends now. The batch's journal recorded every create before
        it was sent, so running the command again settles what this cuts short."""
        self.stderr.print(
            "terminated again: stopped at once; creates that were on the wire may have "
            "landed on Kling",
            soft_wrap=True,
        )
        if self.rerun:
            self.stderr.print(escape(self.rerun), soft_wrap=True)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(EXIT_TERMINATED)

    def _interrupted(self, status: int) -> NoReturn:
        if self.batch is not None:
            self.submitted = [handle.task_id for handle in self.batch.pending]
        where = "in the offline simulation" if self.offline else "on Kling"
        mock = " --mock" if self.mock else ""
        if self.submitted:
            ids = " ".join(self.submitted)
            self.stderr.print(
                f"interrupted; these tasks were submitted and keep running {where}: {ids}\n"
                f"check them with: kling-async{mock} status{self.multi_flag} TASK_ID",
                soft_wrap=True,
            )
        else:
            self.stderr.print("interrupted; nothing was submitted")
        if self.rerun:
            self.stderr.print(escape(self.rerun), soft_wrap=True)
        sys.exit(status)

    def fail(self, error: BaseException) -> NoReturn:
        """Report ``error`` on one line (JSON with ``--json``) and exit: 2 for
        invalid input, 1 for anything else."""
        if self.verbose:
            self.stderr.print_exception(show_locals=False)
        usage = isinstance(error, ValidationError) or (
            isinstance(error, CommandError) and error.usage
        )
        if self.as_json:
            click.echo(json.dumps({"error": self.error_record(error)}), err=True)
        else:
            self.stderr.print(f"[red]error:[/red] {escape(self.describe(error))}", soft_wrap=True)
        sys.exit(EXIT_USAGE if usage else EXIT_ERROR)

    def describe(self, error: BaseException) -> str:
        """``error`` in the CLI's words: flags and commands, not Python calls."""
        if isinstance(error, ValidationError):
            return f"invalid {self._flag(error.field)}: {error.rule}; nothing was sent"
        if isinstance(error, TaskTimeoutError):
            task_id = error.handle.task_id
            return (
                f"task {task_id} did not finish within {error.timeout:g}s; it keeps running: "
                f"check it later with: kling-async status{self.multi_flag} {task_id}"
            )
        if isinstance(error, APIError):
            return self._describe_api_error(error)
        if isinstance(error, UnicodeError):
            return f"cannot decode text: {error}"
        if isinstance(error, OSError):
            reason = error.strerror or str(error) or type(error).__name__
            return f"{error.filename}: {reason}" if error.filename else reason
        return str(error) or type(error).__name__

    def error_record(self, error: BaseException) -> dict[str, Any]:
        """``error`` as JSON-ready data, with the CLI's wording as the message."""
        record: dict[str, Any] = (
            records.unstructure(error, KlingError)
            if isinstance(error, KlingError)
            else {"type": type(error).__name__}
        )
        record["message"] = self.describe(error)
        if isinstance(error, TaskTimeoutError):
            # The task runs on: what a script needs to come back to it, as fields.
            record["task_id"] = error.handle.task_id
            record["status"] = str(error.handle.status or TaskStatus.SUBMITTED)
        return record

    def timed_out_record(self, error: TaskTimeoutError) -> dict[str, Any]:
        """A task still running when ``--timeout`` ran out, for ``--json`` stdout:
        its latest known state, and the command that checks on it later."""
        handle = error.handle
        latest = handle.task
        record: dict[str, Any] = (
            latest.to_dict()
            if latest is not None
            else {"task_id": handle.task_id, "status": str(TaskStatus.SUBMITTED)}
        )
        record["timed_out"] = True
        record["next_step"] = (
            f"the task keeps running; check it with: kling-async status{self.multi_flag} "
            f"{handle.task_id}"
        )
        return record

    @property
    def multi_flag(self) -> str:
        """``" --multi-image"`` when the command is about multi-image tasks, for advice."""
        return " --multi-image" if self.multi else ""

    def _flag(self, field: str) -> str:
        if self.flags is None:
            return field
        indexed = _INDEXED_FIELD.fullmatch(field)
        if indexed is not None:
            name, position = indexed.groups()
            return f"{self.flags.get(name, name)} #{int(position) + 1}"
        return self.flags.get(field, field)

    def _describe_api_error(self, error: APIError) -> str:
        text = str(error)
        if error.hint and text.endswith(error.hint):
            text = text[: -len(error.hint)].rstrip()
        if isinstance(error, TaskNotFoundError):
            return (
                f"{text} It is settled as gone and will not be created again. If it should "
                "exist, check --base-url and the key; else run the request again (a new task)."
            )
        if isinstance(error, NotFoundError):
            other = (
                "A text-to-image task is found only without --multi-image."
                if self.multi
                else "A multi-image task is found only with --multi-image."
            )
            # Only the flags this command has: status and download take no --model.
            checks = (
                "the task id, --model and --base-url"
                if self.flags
                else "the task id and --base-url"
            )
            return f"{text} Check {checks}. {other}"
        if isinstance(error, AuthenticationError):
            if self.api_key and not self.api_key_from_env:
                advice = "Check the key given with --api-key."
            elif self.api_key:
                advice = f"Check {ENV_API_KEY}."
            else:
                advice = (
                    f"Check {ENV_ACCESS_KEY} and {ENV_SECRET_KEY}, and that this machine's clock "
                    "is right (the token they sign is only valid for a while)."
                )
            return f"{text} {advice}"
        if isinstance(error, ConcurrencyLimitError):
            return (
                f"{text} Wait for running tasks to end, or run requests through "
                "kling-async batch --concurrency N to queue them."
            )
        return str(error)


async def _awaited(
    work: Callable[[], Awaitable[T]],
    terminated: list[bool],
    stop_now: Callable[[], NoReturn],
) -> T:
    """``work()``, with SIGTERM taken like Ctrl-C: the work is cancelled and
    cleans up, then :class:`KeyboardInterrupt` reaches ``Settings.run``. A
    second SIGTERM calls ``stop_now``: a stop never depends on the clean-up
    finishing."""
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    assert me is not None

    def terminate() -> None:
        if terminated:
            stop_now()
        terminated.append(True)
        me.cancel()

    try:
        loop.add_signal_handler(signal.SIGTERM, terminate)
    except (NotImplementedError, RuntimeError):  # not on this platform or thread
        return await work()
    try:
        return await work()
    except asyncio.CancelledError:
        if terminated:
            raise KeyboardInterrupt from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def _settings() -> Settings:
    settings = click.get_current_context().find_object(Settings)
    assert settings is not None
    return settings


def _guarded(command: Callable[..., None]) -> Callable[..., None]:
    """Any failure of a command is one line (``-v`` adds the traceback), never
    a traceback: Kling's errors, file system errors, undecodable input."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except (KlingError, OSError, ValueError, CommandError) as error:
            _settings().fail(error)

    return run


def _task_record(task: Task, paths: Sequence[Path] = ()) -> dict[str, Any]:
    return {**task.to_dict(), **({"paths": [str(path) for path in paths]} if paths else {})}


async def _follow(settings: Settings, handle: TaskHandle, timeout: float | None) -> Task:
    """Wait for the task, showing a live status line with elapsed time."""
    started = time.monotonic()
    status = str(handle.status) if handle.status else "submitted"

    async def watch() -> None:
        nonlocal status
        async for update in handle.updates():
            status = str(update.status)

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


def _writable_directory(out: Path) -> None:
    """Make ``out`` and check that a file can be written in it, before anything
    is submitted: a task Kling ran (and billed) must not end in "cannot save"."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out, prefix=".kling-async-check-"):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise CommandError(
            f"cannot save images in {out}: {reason}; nothing was sent", usage=True
        ) from None


def _writable_results(path: Path) -> None:
    """Check that the results file can be written (it is rewritten through a
    temporary file beside it, then appended to) before anything is sent: a run
    must not create tasks whose records it cannot keep."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent, prefix=".kling-async-check-"):
            pass
        if path.exists():
            with path.open("a", encoding="utf-8"):
                pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise CommandError(
            f"cannot write results to {path}: {reason}; nothing was sent", usage=True
        ) from None


async def _save_images(
    settings: Settings, client: Client, task: Task, out: Path, watermarked: bool
) -> list[Path]:
    """Download the task's images (and watermarked copies); a failure names the
    task and the command that fetches them later."""
    try:
        paths = await client.download(task, out)
        if watermarked:
            paths += await client.download(task, out, watermarked=True)
    except (KlingError, OSError) as error:
        raise CommandError(
            f"task {task.task_id} succeeded, but saving its images failed: "
            f"{settings.describe(error)}; fetch them later with: "
            f"kling-async download{settings.multi_flag} {task.task_id} --out {out}"
        ) from error
    return paths


async def _generate_and_save(
    settings: Settings,
    request: TaskRequest,
    out: Path | None,
    timeout: float | None,
) -> None:
    async with settings.client() as client:
        handle = await client.images.submit(request)
        settings.submitted.append(handle.task_id)
        if not settings.as_json:
            settings.stderr.print(f"submitted task {handle.task_id}")
        try:
            task = await _follow(settings, handle, timeout)
        except TaskTimeoutError as error:
            if settings.as_json:
                click.echo(json.dumps(settings.timed_out_record(error)))
            raise
        watermarked = bool(request.watermark)
        paths = await _save_images(settings, client, task, out, watermarked) if out else []
    if settings.as_json:
        click.echo(json.dumps(_task_record(task, paths)))
    elif paths:
        for path in paths:
            click.echo(str(path))
    else:
        for image in task.images:
            click.echo(image.url)
            if image.watermark_url and request.watermark:
                click.echo(image.watermark_url)


# --- options shared by several commands -----------------------------------------------


def _late_flag(*names: str, attribute: str, help: str) -> Callable[[F], F]:
    """A global flag also accepted after the command (``generate p --json``)."""

    def given(context: click.Context, _parameter: click.Parameter, value: bool) -> None:
        if value:
            settings = context.find_object(Settings)
            assert settings is not None
            setattr(settings, attribute, True)
            if attribute == "verbose":
                _debug_logging()

    return click.option(
        *names, is_flag=True, expose_value=False, callback=given, help=help, is_eager=False
    )


_GLOBAL_FLAGS = (
    (("--json",), "as_json", "Machine-readable JSON on stdout (also accepted before the command)."),
    (("--mock",), "mock", "Use the offline simulation (also accepted before the command)."),
    (("-v", "--verbose"), "verbose", "Debug logs and tracebacks (also before the command)."),
)


def _command(group: click.Group, name: str | None = None) -> Callable[[Callable[..., None]], Any]:
    """``group.command``, with the global flags accepted after it and failures
    reported as one line."""

    def decorate(function: Callable[..., None]) -> Any:
        function = _guarded(function)
        for names, attribute, text in reversed(_GLOBAL_FLAGS):
            function = _late_flag(*names, attribute=attribute, help=text)(function)
        return group.command(name)(function)

    return decorate


def _finite(_context: click.Context, _parameter: click.Parameter, value: float) -> float:
    if not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a number of seconds")
    return value


_timeout_option = click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    callback=_finite,
    default=1800.0,
    show_default=True,
    help="Give up waiting after this many seconds (the task keeps running).",
)


def _out_option(help: str) -> Callable[[F], F]:
    return click.option(
        "--out",
        "out",
        type=click.Path(file_okay=False, path_type=Path),
        default=Path("."),
        show_default=True,
        help=help,
    )


def _known_models(default: str, names: str) -> str:
    return (
        f"Model name [default: {default}; Kling lists {names}; any name your account has "
        "is accepted]."
    )


def _image_options(cls: type[TaskRequest], models: str) -> Callable[[F], F]:
    """The options every image command takes; ``--model`` names ``cls``'s default."""
    default_model = str(attrs.fields_dict(cls)["model_name"].default)
    options = [
        click.option(
            "-n",
            "n",
            type=click.IntRange(1, 9),
            default=1,
            show_default=True,
            help="How many images to make (each holds one unit of the account's quota).",
        ),
        click.option(
            "--aspect-ratio",
            type=click.Choice(ASPECT_RATIOS),
            default="16:9",
            show_default=True,
            help="Width:height of the images.",
        ),
        click.option(
            "--model", "model_name", default=None, help=_known_models(default_model, models)
        ),
        click.option(
            "--watermark",
            is_flag=True,
            help="Also have watermarked copies made, and save them beside the images "
            "(as <task_id>_<index>_watermarked.png).",
        ),
        click.option(
            "--callback-url",
            default=None,
            help="An http(s) URL Kling POSTs each status change of the task to.",
        ),
        click.option(
            "--external-task-id",
            default=None,
            help="Your own id for the task (unique per account); status and download "
            "accept it in place of the task id.",
        ),
        _out_option("Directory to save images in (created if missing)."),
        click.option(
            "--no-download",
            is_flag=True,
            help="Print the result URLs instead of saving the images (--out is then unused).",
        ),
        _timeout_option,
    ]

    def decorate(function: F) -> F:
        for option in reversed(options):
            function = option(function)
        return function

    return decorate


def _out_for(out: Path, no_download: bool) -> Path | None:
    """The directory to save in, or ``None`` with ``--no-download``; an ``--out``
    given together with ``--no-download`` would be silently unused: refused."""
    context = click.get_current_context()
    given = context.get_parameter_source("out") is not click.core.ParameterSource.DEFAULT
    if no_download:
        if given:
            raise click.UsageError("--out has no effect with --no-download: give one or the other")
        return None
    return out


class _VerboseHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """``-v``'s output: the ``kling_async`` records, on whatever ``sys.stderr``
    is when each is emitted (a test runner swaps it between commands)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.setStream(sys.stderr)
        super().emit(record)


def _debug_logging() -> None:
    """``-v``: the library's own debug lines on stderr, and only those. The root
    logger is left alone: at DEBUG it would print asyncio's selector notices and
    every other library's chatter, which say nothing about Kling."""
    library = logging.getLogger("kling_async")
    library.setLevel(logging.DEBUG)
    if not any(isinstance(handler, _VerboseHandler) for handler in library.handlers):
        handler = _VerboseHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        library.addHandler(handler)


# --- commands ------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--api-key",
    envvar=ENV_API_KEY,
    default=None,
    help=f"Kling or gateway token [env: {ENV_API_KEY}]. Without any key: offline simulation.",
)
@click.option(
    "--base-url",
    envvar=ENV_BASE_URL,
    default=None,
    help=f"API root before /v1, e.g. http://127.0.0.1:PORT for python -m kling_async.testing "
    f"[env: {ENV_BASE_URL}].",
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
    simulation and say so on stderr; its tasks are kept between commands in the
    user's cache directory. --json, --mock and -v may also follow the command.
    """
    if verbose:
        _debug_logging()
    source = context.get_parameter_source("api_key")
    context.obj = Settings(
        # A blank key (an empty variable, a stray newline) counts as none.
        api_key=(api_key or "").strip() or None,
        api_key_from_env=source is click.core.ParameterSource.ENVIRONMENT,
        base_url=(base_url or "").strip() or None,
        mock=mock,
        as_json=as_json,
        verbose=verbose,
        mock_task_seconds=mock_task_seconds,
    )


def _create_and_save(
    settings: Settings,
    cls: type[TaskRequest],
    fields: dict[str, Any],
    out: Path,
    no_download: bool,
    timeout: float,
) -> None:
    """Build the request (its files read: a ValidationError is reported by the
    flag that set the field), check the output folder, and only then create the
    task, wait for it and save its images."""
    settings.flags = FLAGS
    request = read_image_files(build_request(cls, fields))
    target = _out_for(out, no_download)
    if target is not None:
        _writable_directory(target)
    settings.run(lambda: _generate_and_save(settings, request, target, timeout))


@_command(main)
@click.argument("prompt")
@_image_options(ImageGenerationRequest, "kling-v3 and kling-v2-1")
@click.option("--negative-prompt", default=None, help="What to keep out of the image.")
@click.option("--image", default=None, help="Reference image: a path or an http(s) URL.")
@click.option(
    "--image-reference",
    type=click.Choice(IMAGE_REFERENCES),
    default=None,
    help="What to take from --image: the subject, or the face.",
)
@click.option(
    "--image-fidelity",
    type=click.FloatRange(0, 1),
    default=None,
    help="How closely to follow --image, 0 to 1 [default: Kling's].",
)
@click.option(
    "--human-fidelity",
    type=click.FloatRange(0, 1),
    default=None,
    help="How closely to keep the person of --image, 0 to 1 (with --image-reference "
    "subject) [default: Kling's].",
)
@click.option(
    "--element-id",
    "element_ids",
    type=click.IntRange(0, MAX_ELEMENT_ID),
    multiple=True,
    help="An element of your Kling element library (repeatable; with images, at most 10).",
)
@click.option(
    "--resolution",
    type=click.Choice(RESOLUTIONS),
    default=None,
    help="Image resolution [default: Kling's].",
)
def generate(
    prompt: str,
    n: int,
    aspect_ratio: str,
    model_name: str | None,
    watermark: bool,
    callback_url: str | None,
    external_task_id: str | None,
    out: Path,
    no_download: bool,
    timeout: float,
    negative_prompt: str | None,
    image: str | None,
    image_reference: str | None,
    image_fidelity: float | None,
    human_fidelity: float | None,
    element_ids: tuple[int, ...],
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
        "callback_url": callback_url,
        "external_task_id": external_task_id,
        "negative_prompt": negative_prompt,
        "image": image,
        "image_reference": image_reference,
        "image_fidelity": image_fidelity,
        "human_fidelity": human_fidelity,
        "element_ids": element_ids or None,
        "resolution": resolution,
    }
    _create_and_save(settings, ImageGenerationRequest, fields, out, no_download, timeout)


@_command(main, "multi-image")
@click.argument("prompt", required=False)
@click.option(
    "--subject",
    "subjects",
    multiple=True,
    required=True,
    help="Subject image, a path or an http(s) URL (1 to 4 times).",
)
@click.option("--scene", default=None, help="Scene reference image, a path or an http(s) URL.")
@click.option("--style", default=None, help="Style reference image, a path or an http(s) URL.")
@_image_options(MultiImageRequest, "kling-v2 and kling-v2-1")
def multi_image(
    prompt: str | None,
    subjects: tuple[str, ...],
    scene: str | None,
    style: str | None,
    n: int,
    aspect_ratio: str,
    model_name: str | None,
    watermark: bool,
    callback_url: str | None,
    external_task_id: str | None,
    out: Path,
    no_download: bool,
    timeout: float,
) -> None:
    """Combine 1-4 subject images (plus optional scene and style) into new images."""
    settings = _settings()
    settings.multi = True
    fields: dict[str, Any] = {
        "subject_images": list(subjects),
        "prompt": prompt,
        "scene_image": scene,
        "style_image": style,
        "n": n,
        "aspect_ratio": aspect_ratio,
        "model_name": model_name,
        "watermark": watermark or None,
        "callback_url": callback_url,
        "external_task_id": external_task_id,
    }
    _create_and_save(settings, MultiImageRequest, fields, out, no_download, timeout)


_endpoint_option = click.option(
    "--multi-image",
    "multi",
    is_flag=True,
    help="The task is a multi-image task (Kling keeps the two kinds apart).",
)


def _endpoint(multi: bool) -> Endpoint:
    _settings().multi = multi
    return Endpoint.MULTI_IMAGE if multi else Endpoint.GENERATIONS


def _print_tasks(settings: Settings, tasks: Sequence[Task]) -> None:
    if settings.as_json:
        for task in tasks:
            click.echo(json.dumps(_task_record(task)))
    if not tasks:
        # Said on stderr, with --json too: an empty stdout alone reads as a failure.
        settings.stderr.print(
            "no multi-image tasks found (text-to-image tasks are listed without --multi-image)"
            if settings.multi
            else "no text-to-image tasks found (multi-image tasks are listed with --multi-image)"
        )
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


@_command(main)
@click.argument("task_id")
@_endpoint_option
def status(task_id: str, multi: bool) -> None:
    """Show one task, by its task id or your external task id."""
    settings = _settings()
    endpoint = _endpoint(multi)

    async def work() -> Task:
        async with settings.client() as client:
            return await client.images.get(task_id, endpoint=endpoint)

    _print_tasks(settings, [settings.run(work)])


@_command(main)
@click.argument("task_id")
@_endpoint_option
@_out_option("Directory to save images in (created if missing).")
@click.option(
    "--watermarked",
    is_flag=True,
    help="Save the watermarked copies (the task must have asked for them).",
)
def download(task_id: str, multi: bool, out: Path, watermarked: bool) -> None:
    """Save the images of a finished task; files already saved are skipped."""
    settings = _settings()
    endpoint = _endpoint(multi)
    _writable_directory(out)
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
        click.echo(json.dumps(_task_record(task, paths)))
        return
    if skipped:
        settings.stderr.print(f"{skipped} of {len(paths)} files were already complete; skipped")
    for path in paths:
        click.echo(str(path))


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
    for name in _IMAGE_FIELDS:
        value = fixed.get(name)
        if isinstance(value, list):
            fixed[name] = [
                {**item, "subject_image": resolved(item.get("subject_image"))}
                if isinstance(item, dict)
                else resolved(item)
                for item in value
            ]
        elif value is not None:
            fixed[name] = resolved(value)
    return fixed


def _read_requests(
    path: Path,
) -> tuple[list[tuple[int, TaskRequest | BatchItem]], list[dict[str, Any]]]:
    """Parse a JSONL file: one request object (or a bare prompt string) per line.

    Returns the valid requests with their line numbers, and a result record for
    every invalid line (nothing is sent for those). A request object may carry a
    ``"key"``, its idempotency key (a :class:`BatchItem`'s): the line is that
    request whatever else changes in the file; one key per line.
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
    settings = _settings()
    requests: list[tuple[int, TaskRequest | BatchItem]] = []
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


def _pace(done: int, resumed: int, total: int, elapsed: float) -> tuple[str, str]:
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


class _BatchProgress:
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
        rate, eta = _pace(done, resumed, self.total, self.clock() - self.started)
        self.progress.update(
            self.task,
            completed=done,
            failed=failed,
            # Created and not ended, on Kling: not the requests still queued here.
            running=len(batch.pending),
            rate=rate,
            eta=eta,
        )


JOURNAL_NAME = "kling-journal.db"


class _Results:
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

    def __enter__(self) -> _Results:
        self._rewrite()
        self._file = self.path.open("a", encoding="utf-8")
        return self

    def __exit__(self, *_exc_info: object) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._rewrite()

    def add(self, record: dict[str, Any]) -> None:
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


@attrs.define(eq=False)
class _BatchRun:
    """One run of ``kling-async batch``: results in, records and images out."""

    settings: Settings
    lines: list[int]
    keys: list[str | None]
    results: _Results
    out: Path | None
    display: _BatchProgress
    succeeded: int = 0
    failed: int = 0
    resumed: int = 0
    _saving: asyncio.Semaphore = attrs.field(factory=lambda: asyncio.Semaphore(8))
    _jobs: set[asyncio.Task[None]] = attrs.field(factory=set)

    async def run(self, client: Client, batch: Batch) -> None:
        ticker = asyncio.create_task(self._refresh(batch))
        try:
            async for result in batch:
                self.succeeded += result.ok
                self.failed += not result.ok
                self.resumed += result.resumed
                job = asyncio.create_task(self._finish(client, result))
                self._jobs.add(job)
                job.add_done_callback(self._jobs.discard)
                self.display.update(batch, self.succeeded + self.failed, self.failed, self.resumed)
        finally:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
            # Records and images of results already out, even when interrupted.
            await asyncio.gather(*self._jobs, return_exceptions=True)
            self.display.update(batch, self.succeeded + self.failed, self.failed, self.resumed)

    async def _refresh(self, batch: Batch) -> None:
        # Between results too: tasks go in flight long before the first ends.
        while True:
            self.display.update(batch, self.succeeded + self.failed, self.failed, self.resumed)
            await asyncio.sleep(0.5)

    async def _finish(self, client: Client, result: BatchResult) -> None:
        record: dict[str, Any] = {
            "line": self.lines[result.index],
            "task_id": result.handle.task_id if result.handle else None,
            "external_task_id": (
                result.handle.external_task_id if result.handle else result.request.external_task_id
            ),
            "status": _result_status(result),
            "error": self.settings.error_record(result.error) if result.error else None,
        }
        if self.keys[result.index] is not None:
            record["key"] = self.keys[result.index]
        if result.resumed:
            record["resumed"] = True
        task = result.task
        if result.ok and task is not None and self.out is not None:
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

    async def _save(self, client: Client, task: Task, result: BatchResult) -> list[Path]:
        assert self.out is not None
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
        assert self.out is not None
        paths = await client.download(task, self.out)
        if request.watermark:
            paths += await client.download(task, self.out, watermarked=True)
        return paths


def _result_status(result: BatchResult) -> str:
    """A batch line's status: the task's, else ``gone`` (Kling no longer knows
    the task) or ``error`` (no task)."""
    if result.task is not None:
        return str(result.task.status)
    return "gone" if isinstance(result.error, TaskNotFoundError) else "error"


async def _run_batch(
    settings: Settings,
    numbered: list[tuple[int, TaskRequest | BatchItem]],
    invalid: list[dict[str, Any]],
    out: Path | None,
    results_path: Path,
    journal: Path,
    name: str,
    concurrency: int | None,
    max_in_flight: int | None,
    wait: bool = False,
) -> _BatchRun:
    # The journal is taken first: a second run on the same --out is refused (or
    # waits) before it writes anything, results included.
    owned = await _own_journal(settings, journal, wait)
    try:
        return await _run_owned_batch(
            settings, numbered, invalid, out, results_path, owned, name, concurrency, max_in_flight
        )
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


async def _run_owned_batch(
    settings: Settings,
    numbered: list[tuple[int, TaskRequest | BatchItem]],
    invalid: list[dict[str, Any]],
    out: Path | None,
    results_path: Path,
    journal: Journal,
    name: str,
    concurrency: int | None,
    max_in_flight: int | None,
) -> _BatchRun:
    lines = [number for number, _ in numbered]
    display = _BatchProgress(settings, len(numbered))
    results = _Results(results_path, {*lines, *(line["line"] for line in invalid)})
    keys = [item.key if isinstance(item, BatchItem) else None for _, item in numbered]
    run = _BatchRun(settings, lines, keys, results, out, display)
    with results, display.progress:
        for line in invalid:
            results.add(line)
            if settings.as_json:
                click.echo(json.dumps(line))
        async with settings.client(max_concurrency=concurrency) as client:
            batch = client.batch(
                (item for _, item in numbered),
                max_in_flight=max_in_flight,
                journal=journal,
                name=name,
            )
            settings.batch = batch
            await run.run(client, batch)
    return run


@_command(main)
@click.argument("requests_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_out_option("Directory to save images in, and for results.jsonl (created if missing).")
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
def batch(
    requests_file: Path,
    out: Path,
    concurrency: int | None,
    max_in_flight: int | None,
    results_path: Path | None,
    no_download: bool,
    wait: bool,
    fresh: bool,
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
    key whatever its content, its idempotency key.

    Image paths in the file are relative to the file's folder. Invalid lines are
    reported and never sent. Exits 0 when every request succeeded, 1 otherwise.
    """
    settings = _settings()
    if no_download and results_path is not None:
        _out_for(out, no_download)  # --out would decide nothing: refused
    numbered, invalid = _read_requests(requests_file)
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
    results_path = results_path or out / "results.jsonl"
    if not no_download:
        _writable_directory(out)
    _writable_results(results_path)
    journal = (results_path.parent if no_download else out) / JOURNAL_NAME
    if fresh:
        Journal.discard(journal)  # refused while another run works on it
        results_path.unlink(missing_ok=True)
    settings.rerun = rerun_hint(sys.argv[1:], dropped=("--fresh",))
    started = time.monotonic()
    run = settings.run(
        lambda: _run_batch(
            settings,
            numbered,
            invalid,
            None if no_download else out,
            results_path,
            journal,
            requests_file.name,
            concurrency,
            max_in_flight,
            wait,
        )
    )
    invalid_note = f", {len(invalid)} invalid (not sent)" if invalid else ""
    earlier = f" ({run.resumed} finished in an earlier run)" if run.resumed else ""
    settings.stderr.print(
        f"{run.succeeded} succeeded{earlier}, {run.failed} failed{invalid_note} in "
        f"{time.monotonic() - started:.1f}s; results in {results_path}",
        soft_wrap=True,
    )
    if run.failed or invalid:
        sys.exit(EXIT_ERROR)


@_command(main)
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
@_timeout_option
def resume(journal: Path, out: Path | None, timeout: float) -> None:
    """Settle every create a journal holds that did not end (a batch's
    OUT/kling-journal.db, or any Client(journal=...) file), wait for the tasks,
    and print them.

    Tasks Kling created are re-attached; creates that may or may not have landed
    are looked up and sent again, under the same id, only if Kling has none.
    """
    settings = _settings()
    if out is not None:
        _writable_directory(out)

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
                    paths = await _save_images(settings, client, task, out, False)
                done.append((task, paths))
            return done

    finished = settings.run(work)
    if settings.as_json:
        for task, paths in finished:
            click.echo(json.dumps(_task_record(task, paths)))
    elif finished:
        _print_tasks(settings, [task for task, _ in finished])


@_command(main, "list")
@click.option(
    "--limit",
    type=click.IntRange(1, 10_000),
    default=20,
    show_default=True,
    help="Show at most this many tasks.",
)
@_endpoint_option
def list_tasks(limit: int, multi: bool) -> None:
    """List recent tasks, newest first."""
    settings = _settings()
    endpoint = _endpoint(multi)

    async def work() -> list[Task]:
        async with settings.client() as client:
            return [
                task
                async for task in client.images.list(
                    endpoint=endpoint, page_size=min(limit, 500), limit=limit
                )
            ]

    _print_tasks(settings, settings.run(work))


@_command(main)
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
    callback=_finite,
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
def mcp(http_port: int | None, out: Path | None, timeout: float, concurrency: int | None) -> None:
    """Serve Kling image generation as MCP tools for AI agents (the mcp extra):
    generate_image, multi_image, get_task, list_tasks, download_task.

    Speaks MCP over stdio (stdout is the protocol; messages go to stderr) until
    the client closes stdin, or over streamable HTTP on loopback with --http.
    """
    try:
        from . import _mcp
    except ImportError as error:
        raise CommandError(str(error)) from None
    if out is not None:
        _writable_directory(out)
    _mcp.run(
        _settings(),
        http_port=http_port,
        out=out.resolve() if out is not None else None,
        default_timeout=timeout,
        concurrency=concurrency,
    )
