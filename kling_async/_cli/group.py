"""The ``kling-async`` group: its global options, and the decorator that makes a
command of it (global flags accepted after the command too, failures as one line)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from kling_async._auth import ENV_API_KEY
from kling_async._config import ENV_BASE_URL

from .session import Settings, guarded

__all__: list[str] = []

F = TypeVar("F", bound=Callable[..., Any])


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


def command(
    name: str | None = None, **attributes: Any
) -> Callable[[Callable[..., None]], click.Command]:
    """``main.command``, with the global flags accepted after it and failures
    reported as one line."""

    def decorate(function: Callable[..., None]) -> click.Command:
        function = guarded(function)
        for names, attribute, text in reversed(_GLOBAL_FLAGS):
            function = _late_flag(*names, attribute=attribute, help=text)(function)
        made: click.Command = main.command(name, **attributes)(function)
        return made

    return decorate
