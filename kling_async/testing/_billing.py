"""What the fake deducts for a task, as Kling's pricing page says.

A task that succeeds is billed when it ends: the price table's row for its
endpoint, model, resolution and reference image, times the images it produced
(once for a price per call); a failed task is billed nothing. The rows are the
SDK's :data:`~kling_async.DEFAULT_PRICES` unless the server is given a table of
its own; the matching here reads the create's JSON body as Kling would (its
defaults for what the body leaves out), not the SDK's request models, so a
test that compares the two compares two readings of the same page. A request
no row prices (a model the page does not list) is billed one unit per image,
a stand-in the tests of budgets never rely on.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import attrs

from kling_async._pricing import DEFAULT_RESOLUTION, PriceTable

from ._endpoints import declaration_at

__all__ = ["deduction"]


def _default_model(endpoint: str) -> str:
    """The model Kling uses when a create names none: the declared request
    model's default (the documented one), ``""`` for an endpoint without models."""
    field = attrs.fields_dict(declaration_at(endpoint).request_type).get("model_name")
    default = None if field is None else field.default
    return default if isinstance(default, str) else ""


def deduction(table: PriceTable, endpoint: str, body: Mapping[str, Any], images: int) -> Decimal:
    """The units a task of ``endpoint`` created with ``body`` that produced
    ``images`` images is billed."""
    model = body.get("model_name")
    if not isinstance(model, str) or not model:
        model = _default_model(endpoint)
    resolution = body.get("resolution")
    if not isinstance(resolution, str) or not resolution:
        resolution = DEFAULT_RESOLUTION
    price = table.row(endpoint, model, resolution.lower(), body.get("image") is not None)
    if price is None:
        return Decimal(images)
    return price.units if price.per == "call" else price.units * images
