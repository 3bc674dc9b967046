"""Options several commands take, and the options of a task command, derived
from its request model's fields: one place to add the next option to."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TypeVar

import click

from kling_async._endpoints import EndpointDeclaration, by_cli_name, declarations
from kling_async._frontend import RequestField, request_fields
from kling_async._models import Endpoint

from .session import CommandError, current

__all__: list[str] = []

F = TypeVar("F", bound=Callable[..., Any])

#: Where a field's flag is not ``--`` and its name in kebab case.
FLAG_NAMES: Mapping[str, str] = {
    "prompt": "PROMPT",
    "n": "-n",
    "model_name": "--model",
    "element_ids": "--element-id",
    "subject_images": "--subject",
    "scene_image": "--scene",
    "style_image": "--style",
    "images": "--image",
}
#: How the CLI takes an image.
IMAGE_FORMS = "a path, an http(s) URL or base64 data"
#: The commands that find a task by its external task id.
LOOKUPS = "status and download"


def flag_of(name: str) -> str:
    """The option (or ``PROMPT``, the argument) that sets request field ``name``."""
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def _finite(_context: click.Context, _parameter: click.Parameter, value: float) -> float:
    if not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a number of seconds")
    return value


finite = _finite

timeout_option = click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    callback=_finite,
    default=1800.0,
    show_default=True,
    help="Give up waiting after this many seconds (the task keeps running).",
)

dry_run_option = click.option(
    "--dry-run",
    is_flag=True,
    help="Print what it would cost (Kling's published prices) and send nothing.",
)


def units_value(
    _context: click.Context, _parameter: click.Parameter, value: str | None
) -> Decimal | None:
    """A number of resource-pack units given as text (``"12.5"``), exactly."""
    if value is None:
        return None
    try:
        units = Decimal(value)
    except InvalidOperation:
        raise click.BadParameter(f"{value!r} is not a number of units") from None
    if not units.is_finite() or units < 0:
        raise click.BadParameter(f"must be a number of units, 0 or more; got {value!r}")
    return units


def max_units_option(help: str) -> Callable[[F], F]:
    """``--max-units N``: a budget in resource-pack units (a Decimal)."""
    return click.option(
        "--max-units", type=str, default=None, metavar="UNITS", callback=units_value, help=help
    )


def out_option(help: str) -> Callable[[F], F]:
    """``--out DIR``, default the current directory."""
    return click.option(
        "--out",
        "out",
        type=click.Path(file_okay=False, path_type=Path),
        default=Path("."),
        show_default=True,
        help=help,
    )


def out_for(out: Path, no_download: bool) -> Path | None:
    """The directory to save in, or ``None`` with ``--no-download``; an ``--out``
    given together with ``--no-download`` would be silently unused: refused."""
    context = click.get_current_context()
    given = context.get_parameter_source("out") is not click.core.ParameterSource.DEFAULT
    if no_download:
        if given:
            raise click.UsageError("--out has no effect with --no-download: give one or the other")
        return None
    return out


def writable_directory(out: Path) -> None:
    """Make ``out`` and check that a file can be written in it, before anything
    is submitted: a task Kling ran (and billed) must not end in "cannot save"."""
    _writable(out, f"cannot save images in {out}")


def writable_results(path: Path) -> None:
    """Check that the results file can be written (it is rewritten through a
    temporary file beside it, then appended to) before anything is sent: a run
    must not create tasks whose records it cannot keep."""
    _writable(path.parent, f"cannot write results to {path}", append_to=path)


def _writable(folder: Path, failure: str, *, append_to: Path | None = None) -> None:
    """Make ``folder``, write a file in it, and open ``append_to`` (if it exists)
    for appending; a failure is a usage error that says ``failure`` and why."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".kling-async-check-"):
            pass
        if append_to is not None and append_to.exists():
            with append_to.open("a", encoding="utf-8"):
                pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise CommandError(f"{failure}: {reason}; nothing was sent", usage=True) from None


def endpoint_options(function: F) -> F:
    """``--multi-image`` and ``--endpoint NAME``: which endpoint's tasks a lookup
    means (Kling keeps them apart); text-to-image without either."""
    names = [declaration.cli_name for declaration in declarations()]
    function = click.option(
        "--endpoint",
        "endpoint_name",
        type=click.Choice(names),
        default=None,
        help="The command that created the task, when not generate (Kling keeps each "
        "endpoint's tasks apart).",
    )(function)
    return click.option(
        "--multi-image",
        "multi",
        is_flag=True,
        help="The task is a multi-image task (the same as --endpoint multi-image).",
    )(function)


def chosen_endpoint(multi: bool, endpoint_name: str | None) -> Endpoint:
    """The endpoint ``--multi-image``/``--endpoint`` name, noted for the command's advice."""
    endpoint = (
        Endpoint.GENERATIONS if endpoint_name is None else by_cli_name(endpoint_name).endpoint
    )
    if multi:
        if endpoint not in (Endpoint.GENERATIONS, Endpoint.MULTI_IMAGE):
            raise click.UsageError("--multi-image and --endpoint name different endpoints")
        endpoint = Endpoint.MULTI_IMAGE
    current().endpoint = endpoint
    return endpoint


class _IntOrAuto(click.IntRange):
    """An integer in a range, or ``auto`` (``--series-amount``)."""

    name = "integer|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value == "auto":
            return value
        return super().convert(value, param, ctx)


def _click_type(field: RequestField) -> Any:
    if field.choices is not None:
        return click.Choice(field.choices)
    limits = field.item_limits if field.many else field.limits
    low, high = limits.get("minimum"), limits.get("maximum")
    if field.scalar == "integer":
        return (_IntOrAuto if field.auto else click.IntRange)(low, high)
    if field.scalar == "number":
        return click.FloatRange(low, high)
    return click.STRING


def _parameter(field: RequestField, declaration: EndpointDeclaration) -> Callable[[F], F]:
    if field.name == "prompt":
        return click.argument("prompt", required=field.required)
    help = field.describe(declaration, spell=flag_of, forms=IMAGE_FORMS, lookups=LOOKUPS)
    options: dict[str, Any] = {"help": help, "required": field.required}
    if field.scalar == "boolean":
        options["is_flag"] = True
    else:
        options["type"] = _click_type(field)
        options["multiple"] = field.many
        if field.many:
            help += " Repeatable."
            options["help"] = help
    if field.default is not None and field.name != "model_name":
        options.update(default=field.default, show_default=True)
    return click.option(flag_of(field.name), field.name, **options)


def request_options(declaration: EndpointDeclaration) -> Callable[[F], F]:
    """The argument and options that set the fields of ``declaration``'s request."""
    parameters = [
        _parameter(field, declaration) for field in request_fields(declaration.request_type)
    ]

    def decorate(function: F) -> F:
        for parameter in reversed(parameters):
            function = parameter(function)
        return function

    return decorate


def request_values(declaration: EndpointDeclaration, values: dict[str, Any]) -> dict[str, Any]:
    """The request fields among a task command's parsed values (taken out of
    ``values``): a flag not given and an empty repeatable option mean the
    model's default."""
    fields: dict[str, Any] = {}
    for field in request_fields(declaration.request_type):
        value = values.pop(field.name)
        if field.many:
            value = list(value) or None
        elif field.scalar == "boolean":
            value = value or None
        fields[field.name] = value
    return fields


def request_flags(declaration: EndpointDeclaration) -> dict[str, str]:
    """How the command of ``declaration`` spells each request field."""
    return {field.name: flag_of(field.name) for field in request_fields(declaration.request_type)}
