"""The price table is data; an estimate is its row times the images asked for,
and never a guess."""

from __future__ import annotations

import datetime
from decimal import Decimal

import pytest

import kling_async
from kling_async import DEFAULT_PRICES, Price, UnknownPriceError
from kling_async.testing import FakeKlingServer
from tests.helpers import API_KEY, make_client
from tests.imagedata import png

URL = "https://images.example.com/in.png"


@pytest.mark.parametrize(
    ("request_", "units"),
    [
        (kling_async.ImageGenerationRequest(prompt="p"), "8"),
        (kling_async.ImageGenerationRequest(prompt="p", n=4, resolution="2k"), "32"),
        (kling_async.ImageGenerationRequest(prompt="p", n=3, model_name="kling-v2-1"), "12"),
        (
            kling_async.ImageGenerationRequest(prompt="p", n=3, model_name="kling-v2-1", image=URL),
            "24",
        ),
        (kling_async.MultiImageRequest(subject_images=[URL], n=2), "32"),
        (
            kling_async.MultiImageRequest(subject_images=[png(400, 400)], model_name="kling-v2-1"),
            "16",
        ),
    ],
)
def test_an_estimate_is_the_row_s_price_times_the_images(
    request_: kling_async.TaskRequest, units: str
) -> None:
    estimate = DEFAULT_PRICES.estimate(request_)
    assert estimate.units == Decimal(units)
    assert estimate.money == Decimal(units) * Decimal("0.0035")
    assert estimate.currency == "USD"
    assert estimate.images == request_.n


def test_a_request_the_table_cannot_price_says_so_and_never_guesses() -> None:
    with pytest.raises(UnknownPriceError) as caught:
        DEFAULT_PRICES.estimate(kling_async.ImageGenerationRequest(prompt="p", model_name="v9"))
    error = caught.value
    assert (error.endpoint, error.model_name, error.resolution) == (
        "images/generations",
        "v9",
        "1k",
    )
    assert "2026-09-20" in str(error)
    assert "PriceTable.replacing" in str(error)
    assert isinstance(error, LookupError)
    assert isinstance(error, kling_async.KlingError)


def test_a_batch_total_adds_up_and_stops_at_an_unknown_price() -> None:
    requests = [kling_async.ImageGenerationRequest(prompt=str(i), n=i) for i in range(1, 4)]
    total = DEFAULT_PRICES.total(requests)
    assert (total.units, total.images) == (Decimal(48), 6)
    assert total.money == Decimal("0.1680")
    unknown = kling_async.ImageGenerationRequest(prompt="p", model_name="v9")
    with pytest.raises(UnknownPriceError):
        DEFAULT_PRICES.total([*requests, unknown])


def test_a_user_s_own_prices_win_and_say_where_they_come_from() -> None:
    contract = DEFAULT_PRICES.replacing(
        Price(endpoint="images/generations", model_name="kling-v3", units=6),
        Price(endpoint="images/generations", model_name="my-model", units="1.5", per="call"),
        source="our contract",
        as_of=datetime.date(2026, 12, 1),
        unit_price="0.003",
    )
    assert contract.estimate(kling_async.ImageGenerationRequest(prompt="p", n=2)).units == 12
    per_call = contract.estimate(
        kling_async.ImageGenerationRequest(prompt="p", n=9, model_name="my-model")
    )
    assert (per_call.units, per_call.money) == (Decimal("1.5"), Decimal("0.0045"))
    assert (contract.source, contract.as_of) == ("our contract", datetime.date(2026, 12, 1))
    assert DEFAULT_PRICES.estimate(kling_async.ImageGenerationRequest(prompt="p")).units == 8


def test_the_default_table_knows_its_source_and_date() -> None:
    assert DEFAULT_PRICES.source.startswith("https://kling.ai/")
    assert DEFAULT_PRICES.as_of == datetime.date(2026, 9, 20)
    keys = [
        (p.endpoint, p.model_name, p.resolutions, p.reference_image) for p in DEFAULT_PRICES.prices
    ]
    assert len(keys) == len(set(keys))  # no row shadows another


async def test_the_client_estimates_with_its_own_table_and_sends_nothing() -> None:
    async with FakeKlingServer(api_key=API_KEY) as server:
        async with make_client(server) as client:
            request = kling_async.ImageGenerationRequest(prompt="p", n=4)
            assert client.estimate(request).units == 32
            assert client.estimate([request, request]).units == 64
        table = DEFAULT_PRICES.replacing(
            Price(endpoint="images/generations", model_name="kling-v3", units=1)
        )
        async with make_client(server, prices=table) as client:
            assert client.estimate(request).units == 4
        assert server.requests == []
