"""One run of a ``kling-async`` command: the settings the global options parsed,
the client they open, the event loop it runs on with Ctrl-C and SIGTERM taken
alike, and the wording of every failure (one line, exit 1 or 2)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import shlex
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import attrs
import click
from rich.console import Console
from rich.markup import escape

from kling_async._auth import ENV_ACCESS_KEY, ENV_API_KEY, ENV_SECRET_KEY
from kling_async._batch import Batch
from kling_async._client import Client
from kling_async._exceptions import (
    BudgetExceededError,
    KlingError,
    TaskTimeoutError,
    ValidationError,
)
from kling_async._frontend import (
    EXIT_BUDGET,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    EXIT_USAGE,
    Connection,
    budget_next_step,
    error_record,
)
from kling_async._models import Endpoint, TaskStatus
from kling_async._pricing import DEFAULT_PRICES, PriceTable

from .wording import Wording, endpoint_flag

__all__: list[str] = []

T = TypeVar("T")

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
    #: The endpoint whose tasks the command looks at (for hints that name its flag).
    endpoint: Endpoint = Endpoint.GENERATIONS
    #: The line telling how to continue an interrupted run (:func:`rerun_hint`),
    #: if it can be continued.
    rerun: str | None = None
    #: How this command's options spell request fields, if it takes them.
    flags: Mapping[str, str] | None = None
    #: The prices ``--dry-run`` estimates with.
    prices: PriceTable = DEFAULT_PRICES
    #: ``--max-units``: what the command's client may spend, in units.
    max_units: Decimal | None = None

    @property
    def connection(self) -> Connection:
        """Where the client goes: Kling, or the offline simulation."""
        return Connection(
            api_key=self.api_key,
            base_url=self.base_url,
            mock=self.mock,
            task_seconds=self.mock_task_seconds,
            has_key_pair=bool(os.environ.get(ENV_ACCESS_KEY) or os.environ.get(ENV_SECRET_KEY)),
        )

    @property
    def offline(self) -> bool:
        """Whether commands run against the offline simulation."""
        return self.connection.offline

    @contextlib.asynccontextmanager
    async def client(
        self, max_concurrency: int | None = None, journal: Path | None = None
    ) -> AsyncIterator[Client]:
        """A client for the real API, or for an embedded fake server when offline."""
        async with self.connection.client(
            max_concurrency=max_concurrency,
            journal=journal,
            budget=self.max_units,
            announce=self.notice,
            warn=self.warn,
        ) as client:
            yield client

    def notice(self, text: str) -> None:
        """Say ``text`` on stderr, as kling-async's own note."""
        self.stderr.print(f"[yellow]kling-async: {escape(text)}[/yellow]")

    def warn(self, text: str) -> None:
        """A warning on stderr: something went wrong that does not stop the command."""
        self.stderr.print(f"[yellow]warning: {escape(text)}[/yellow]", soft_wrap=True)

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
            if isinstance(error, BudgetExceededError):
                self.stderr.print(f"next step: {escape(self.budget_step(error))}", soft_wrap=True)
        if isinstance(error, BudgetExceededError):
            sys.exit(EXIT_BUDGET)
        sys.exit(EXIT_USAGE if usage else EXIT_ERROR)

    def budget_step(self, error: BudgetExceededError) -> str:
        """What to do about a create ``--max-units`` refused."""
        return budget_next_step(error, raise_with="--max-units")

    def describe(self, error: BaseException) -> str:
        """``error`` in the CLI's words: flags and commands, not Python calls."""
        return Wording(
            flags=self.flags,
            endpoint=self.endpoint,
            key_given=bool(self.api_key),
            key_from_env=self.api_key_from_env,
        ).describe(error)

    def error_record(self, error: BaseException) -> dict[str, Any]:
        """``error`` as JSON-ready data, with the CLI's wording as the message
        (and, for a create a budget refused, its ``next_step``)."""
        record = error_record(error, self.describe(error))
        if isinstance(error, BudgetExceededError):
            record["next_step"] = self.budget_step(error)
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
        """The flag that finds this command's tasks (``" --multi-image"``, ...), for advice."""
        return endpoint_flag(self.endpoint)


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


def current() -> Settings:
    """The running command's settings."""
    settings = click.get_current_context().find_object(Settings)
    assert settings is not None
    return settings


def guarded(command: Callable[..., None]) -> Callable[..., None]:
    """Any failure of a command is one line (``-v`` adds the traceback), never
    a traceback: Kling's errors, file system errors, undecodable input."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except (KlingError, OSError, ValueError, CommandError) as error:
            current().fail(error)

    return run
