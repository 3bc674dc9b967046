"""An endpoint Kling does not have, declared the way the next real one will be:
a request model and a declaration, nothing else. tests/test_declarations.py
shows every part of the SDK serving it; a subprocess declares it with
:func:`declare` before the CLI or MCP server is imported."""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import ClassVar, cast

import attrs

from kling_async._endpoints import (
    EndpointDeclaration,
    QuotaUnits,
    ResultKind,
    UnitsRule,
    _registered,
)
from kling_async._exceptions import ValidationError
from kling_async._models import Endpoint, TaskRequest

MAX_SKETCH_PROMPT = 40


class _Path(str, enum.Enum):
    # Not a member of Endpoint (an enum cannot grow): a declared path is enough.
    SKETCH = "images/synthetic-sketch"


def _prompt(_instance: object, attribute: attrs.Attribute[str], value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(attribute.name, "must be a non-empty string")
    if len(value) > MAX_SKETCH_PROMPT:
        raise ValidationError(
            attribute.name, f"must be at most {MAX_SKETCH_PROMPT} characters, got {len(value)}"
        )


def _count(_instance: object, attribute: attrs.Attribute[int], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 3:
        raise ValidationError(attribute.name, f"must be an integer from 1 to 3, got {value!r}")


@attrs.frozen(kw_only=True)
class SketchRequest(TaskRequest):
    """A synthetic sketch task: ``POST /v1/images/synthetic-sketch``."""

    endpoint: ClassVar[Endpoint] = cast(Endpoint, _Path.SKETCH)

    prompt: str = attrs.field(validator=_prompt)
    n: int = attrs.field(default=1, validator=_count)


SKETCH = EndpointDeclaration(
    endpoint=SketchRequest.endpoint,
    request_type=SketchRequest,
    result=ResultKind.IMAGES,
    units=QuotaUnits(rule=UnitsRule.N_WEIGHTED),
    method="sketch",
    cli_name="sketch",
    mcp_name="sketch_image",
    title="Sketch a prompt (a synthetic endpoint)",
    duration_key="images/synthetic-sketch",
)


@contextmanager
def declared() -> Iterator[EndpointDeclaration]:
    """The synthetic endpoint, declared for the block."""
    with _registered(SKETCH) as declaration:
        yield declaration


_FOR_GOOD: list[AbstractContextManager[EndpointDeclaration]] = []


def declare() -> None:
    """Declare the synthetic endpoint for the rest of the process (a subprocess's)."""
    # Kept referenced: a collected context manager would close and undeclare it.
    _FOR_GOOD.append(declared())
    _FOR_GOOD[-1].__enter__()
