"""What a task will cost: Kling's published prices as data, and the estimate of a request.

Kling deducts resource-pack units per image produced (per call for a few
functions), at a price that depends on the endpoint, the model, the resolution
and, for Image 2.1, on whether a reference image is given. The table below is
Kling's image pricing page as fetched on its ``as_of`` date; a user whose
contract differs passes a table of their own (:meth:`PriceTable.replacing`).

An estimate never guesses: a request the table has no row for (an unknown model,
a resolution the page does not price) raises :class:`UnknownPriceError` naming
what is missing and how to add it.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from decimal import Decimal
from typing import Literal

import attrs

from ._exceptions import UnknownPriceError
from ._models import MAX_SERIES_IMAGES, TaskRequest

__all__ = ["DEFAULT_PRICES", "Estimate", "Price", "PriceTable"]

#: When a request does not say its resolution, Kling renders 1K.
DEFAULT_RESOLUTION = "1k"


def _decimal(value: Decimal | int | str) -> Decimal:
    return Decimal(value)


def _resolutions(values: Iterable[str]) -> frozenset[str]:
    return frozenset(value.lower() for value in values)


@attrs.frozen(kw_only=True)
class Price:
    """One row of a price table: what one image (``per="image"``) or one call
    (``per="call"``) of an endpoint and model costs, in resource-pack units.

    ``resolutions`` limits the row to those (empty: any); ``reference_image``
    tells Image 2.1's text-to-image (``False``) from its image-to-image
    (``True``) price (``None``: either).
    """

    endpoint: str
    model_name: str
    units: Decimal = attrs.field(converter=_decimal)
    per: Literal["image", "call"] = "image"
    resolutions: frozenset[str] = attrs.field(default=frozenset(), converter=_resolutions)
    reference_image: bool | None = None
    note: str = ""

    def matches(self, endpoint: str, model_name: str, resolution: str, reference: bool) -> bool:
        """Whether this row prices such a request."""
        return (
            self.endpoint == endpoint
            and self.model_name == model_name
            and (not self.resolutions or resolution in self.resolutions)
            and (self.reference_image is None or self.reference_image == reference)
        )


@attrs.frozen(kw_only=True)
class Estimate:
    """What a request (or, added up, a batch) will cost at most: ``units`` of
    the resource pack, worth ``money`` in ``currency`` at the table's unit
    price, for ``images`` images. ``prices`` are the rows it was made from."""

    units: Decimal
    money: Decimal
    currency: str
    images: int
    prices: tuple[Price, ...] = ()

    def __add__(self, other: Estimate) -> Estimate:
        if other.currency != self.currency:
            raise ValueError(f"cannot add estimates in {self.currency} and {other.currency}")
        return Estimate(
            units=self.units + other.units,
            money=self.money + other.money,
            currency=self.currency,
            images=self.images + other.images,
            prices=tuple(dict.fromkeys(self.prices + other.prices)),
        )


@attrs.frozen(kw_only=True)
class PriceTable:
    """Prices per endpoint, model and resolution, with where and when they were read.

    ``unit_price`` is what one unit of the image resource pack costs in
    ``currency`` (Kling's packs: 0.0035 USD).
    """

    prices: tuple[Price, ...]
    source: str
    as_of: datetime.date
    unit_price: Decimal = attrs.field(converter=_decimal)
    currency: str = "USD"

    def row(self, endpoint: str, model_name: str, resolution: str, reference: bool) -> Price | None:
        """The first row pricing such a request, or ``None``."""
        for price in self.prices:
            if price.matches(endpoint, model_name, resolution, reference):
                return price
        return None

    def price_for(self, request: TaskRequest) -> Price:
        """The row that prices ``request``; :class:`UnknownPriceError` when none does."""
        endpoint = request.endpoint.value
        model_name = request.model_name
        resolution = str(getattr(request, "resolution", None) or DEFAULT_RESOLUTION).lower()
        reference = getattr(request, "image", None) is not None
        price = self.row(endpoint, model_name, resolution, reference)
        if price is not None:
            return price
        raise UnknownPriceError(
            endpoint,
            model_name,
            resolution,
            f"the price table of {self.as_of.isoformat()} ({self.source})",
        )

    def estimate(self, request: TaskRequest) -> Estimate:
        """The most ``request`` will cost: its row's price times the images it
        asks for (``n``, or a series' ``series_amount``; for ``"auto"`` the most
        a series makes, 9), or once for a price per call."""
        price = self.price_for(request)
        expected = getattr(request, "expected_images", request.n)
        images = MAX_SERIES_IMAGES if expected is None else int(expected)
        units = price.units * (images if price.per == "image" else 1)
        return Estimate(
            units=units,
            money=units * self.unit_price,
            currency=self.currency,
            images=images,
            prices=(price,),
        )

    def total(self, requests: Iterable[TaskRequest]) -> Estimate:
        """The estimates of ``requests`` added up (a batch's); raises
        :class:`UnknownPriceError` at the first request the table cannot price."""
        total = Estimate(units=Decimal(0), money=Decimal(0), currency=self.currency, images=0)
        for request in requests:
            total += self.estimate(request)
        return total

    def replacing(
        self,
        *prices: Price,
        source: str | None = None,
        as_of: datetime.date | None = None,
        unit_price: Decimal | str | None = None,
        currency: str | None = None,
    ) -> PriceTable:
        """This table with ``prices`` put first (so they win over the rows they
        overlap), and a contract's own ``unit_price`` and ``currency``, or the
        ``source`` and ``as_of`` of a newer page, where given."""
        return PriceTable(
            prices=(*prices, *self.prices),
            source=self.source if source is None else source,
            as_of=self.as_of if as_of is None else as_of,
            unit_price=self.unit_price if unit_price is None else unit_price,
            currency=self.currency if currency is None else currency,
        )


_GENERATIONS = "images/generations"
_MULTI_IMAGE = "images/multi-image2image"
_OMNI_IMAGE = "images/omni-image"
_EXPAND = "images/editing/expand"
_MULTI_SHOT = "general/ai-multi-shot"

#: Kling's image pricing page, as fetched on 2026-09-20 (the page prints no date
#: of its own). 1K and 2K cost the same; 4K is priced for Image 3.0 Omni only.
#: Outpainting and AI multi-shot name no model (``model_name`` is ``""``), and
#: the page prices them at 1K, the only resolution they make. Virtual try-on has
#: no row: the page lists it among the functions it covers but prices none, so
#: its estimate raises UnknownPriceError until a contract's row is added.
DEFAULT_PRICES = PriceTable(
    source="https://kling.ai/document-api/pricing/base/image",
    as_of=datetime.date(2026, 9, 20),
    unit_price=Decimal("0.0035"),
    prices=(
        Price(endpoint=_GENERATIONS, model_name="kling-v3", units=8, resolutions={"1k", "2k"}),
        Price(
            endpoint=_GENERATIONS,
            model_name="kling-v2-1",
            units=4,
            resolutions={"1k", "2k"},
            reference_image=False,
            note="Image 2.1 text-to-image",
        ),
        Price(
            endpoint=_GENERATIONS,
            model_name="kling-v2-1",
            units=8,
            resolutions={"1k", "2k"},
            reference_image=True,
            note="Image 2.1 image-to-image",
        ),
        Price(endpoint=_MULTI_IMAGE, model_name="kling-v2-1", units=16, resolutions={"1k", "2k"}),
        Price(
            endpoint=_MULTI_IMAGE,
            model_name="kling-v2",
            units=16,
            resolutions={"1k", "2k"},
            note="the gateway's name of the multi-image model; Kling's changelog of "
            "2025-07-30 prices multi-image at 16 units an image",
        ),
        Price(endpoint=_OMNI_IMAGE, model_name="kling-v3-omni", units=8, resolutions={"1k", "2k"}),
        Price(endpoint=_OMNI_IMAGE, model_name="kling-v3-omni", units=16, resolutions={"4k"}),
        Price(endpoint=_OMNI_IMAGE, model_name="kling-image-o1", units=8, resolutions={"1k", "2k"}),
        Price(endpoint=_EXPAND, model_name="", units=8, resolutions={"1k"}, note="Outpainting"),
        Price(
            endpoint=_MULTI_SHOT,
            model_name="",
            units=20,
            per="call",
            resolutions={"1k"},
            note="AI multi-shot: three sets of three images per call",
        ),
    ),
)
