"""What a task cost (issue 30): typed on every result, in both result shapes, billed
by the fake as Kling's price page says, added up by batches and journals."""

from __future__ import annotations

import json
import sqlite3
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

import kling_async
from kling_async import (
    DEFAULT_PRICES,
    CallbackReceiver,
    Cost,
    EntryState,
    ExpandRequest,
    ImageGenerationRequest,
    Journal,
    MultiImageRequest,
    MultiShotRequest,
    OmniImageRequest,
    PollPolicy,
    Price,
    Task,
    TaskRequest,
    TaskStatus,
    spend_of,
)
from kling_async._wire import Envelope, parse_callback, parse_task
from kling_async.testing import FakeKlingServer, WireShapes
from tests.helpers import API_KEY, make_client

URL = "https://images.example.com/in.png"
SECRET = "callback-secret-0123456789abcdef"
CALLBACK_POLLING = PollPolicy(
    initial_delay=0.02, max_delay=0.1, timeout=10.0, callback_delay=30.0, overdue_factor=50.0
)


# --- reading what Kling deducted ------------------------------------------------------


def legacy(**fields: Any) -> Task:
    data = {"task_id": "t", "task_status": "succeed", **fields}
    return parse_task(Envelope(data=data, request_id="r"))


@pytest.mark.parametrize(
    ("task", "cost"),
    [
        (legacy(final_unit_deduction="24"), Cost(units=Decimal(24))),
        (
            legacy(
                final_unit_deduction="0",
                final_balance_deduction={"quota": "0.056", "list_price": "0.07"},
            ),
            Cost(units=Decimal(0), quota=Decimal("0.056"), list_price=Decimal("0.07")),
        ),
        (legacy(final_balance_deduction="1.5"), Cost(quota=Decimal("1.5"))),
        (legacy(), None),
        # Kling's reference pages write the placeholder "string": no number, no cost.
        (legacy(final_unit_deduction="string"), None),
        (legacy(final_unit_deduction="NaN"), None),
        (
            parse_callback(
                {
                    "id": "t",
                    "status": "succeeded",
                    "billing": [
                        {"charge_type": "unit", "amount": "16", "package_type": "image"},
                        {"charge_type": "unit", "amount": "8", "package_type": "image"},
                        {"charge_type": "cash", "amount": "0.02", "list_price": "0.028"},
                    ],
                }
            ),
            Cost(units=Decimal(24), quota=Decimal("0.02"), list_price=Decimal("0.028")),
        ),
        (parse_callback({"id": "t", "status": "processing"}), None),
    ],
)
def test_a_task_s_cost_is_typed_from_either_shape(task: Task, cost: Cost | None) -> None:
    assert task.cost == cost
    if cost is not None:
        assert all(
            value is None or isinstance(value, Decimal)
            for value in (cost.units, cost.quota, cost.list_price)
        )


# --- the fake bills as the price table says ---------------------------------------------


def priced_request(price: Price, resolution: str) -> TaskRequest:
    """A request the row ``price`` prices, of 2 images where the endpoint takes ``n``."""
    endpoint = price.endpoint
    if endpoint == "images/generations":
        return ImageGenerationRequest(
            prompt="p",
            model_name=price.model_name,
            n=2,
            resolution=resolution,  # type: ignore[arg-type]
            image=URL if price.reference_image else None,
        )
    if endpoint == "images/multi-image2image":
        return MultiImageRequest(subject_images=[URL], model_name=price.model_name, n=2)
    if endpoint == "images/omni-image":
        return OmniImageRequest(
            prompt="p",
            model_name=price.model_name,
            n=2,
            resolution=resolution,  # type: ignore[arg-type]
            aspect_ratio="1:1",
        )
    if endpoint == "images/editing/expand":
        return ExpandRequest(
            image=URL,
            up_expansion_ratio=0.1,
            down_expansion_ratio=0.1,
            left_expansion_ratio=0.1,
            right_expansion_ratio=0.1,
            n=2,
        )
    assert endpoint == "general/ai-multi-shot", endpoint
    return MultiShotRequest(element_frontal_image=URL)


#: Every row of the default table at every resolution it prices; a request
#: model without a resolution field is rendered at Kling's default, 1K.
ROWS = [
    pytest.param(price, resolution, id=f"{price.endpoint}:{price.model_name or '-'}:{resolution}"
                 + (f":ref={price.reference_image}" if price.reference_image is not None else ""))
    for price in DEFAULT_PRICES.prices
    for resolution in sorted(price.resolutions)
    if resolution == "1k" or price.endpoint in ("images/generations", "images/omni-image")
]  # fmt: skip


def test_every_row_of_the_table_is_tried() -> None:
    tried = {(p.values[0], p.values[1]) for p in ROWS}
    assert {price for price, _ in tried} == set(DEFAULT_PRICES.prices)


@pytest.mark.parametrize(("price", "resolution"), ROWS)
@pytest.mark.parametrize("shape", ["legacy", "new_design"])
async def test_the_estimate_is_what_the_fake_deducts_for_every_row(
    price: Price, resolution: str, shape: str
) -> None:
    request = priced_request(price, resolution)
    assert DEFAULT_PRICES.price_for(request) == price  # the request is this row's
    shapes = WireShapes(callback_format="new_design") if shape == "new_design" else None
    async with FakeKlingServer(
        api_key=API_KEY, task_duration=0.05, processing_delay=0.01, shapes=shapes
    ) as server:
        if shape == "legacy":  # read from a get
            async with make_client(server) as client:
                estimate = client.estimate(request)
                task = await (await client.images.submit(request)).wait(timeout=5)
        else:  # read from the new-design callback, as delivered (not confirmed by a get)
            receiver = CallbackReceiver(secret=SECRET, confirm=False)
            async with receiver.serve():
                async with make_client(
                    server, callbacks=receiver, polling=CALLBACK_POLLING
                ) as client:
                    estimate = client.estimate(request)
                    task = await (await client.images.submit(request)).wait(timeout=5)
            await receiver.close()
            assert "billing" in task.raw  # the body was the new design's
        assert task.status is TaskStatus.SUCCEED
        assert task.cost is not None
        assert task.cost.units == estimate.units == server.billed_units
        expected = price.units * (2 if price.per == "image" and price.endpoint != _SHOT else 1)
        assert estimate.units == expected


_SHOT = "general/ai-multi-shot"


async def test_a_series_is_estimated_by_its_amount_and_auto_by_the_most_it_makes() -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.05) as server:
        async with make_client(server) as client:
            three = OmniImageRequest(
                prompt="p",
                model_name="kling-v3-omni",
                result_type="series",
                series_amount=3,
                aspect_ratio="1:1",
            )
            auto = OmniImageRequest(
                prompt="p",
                model_name="kling-v3-omni",
                result_type="series",
                series_amount="auto",
                aspect_ratio="1:1",
            )
            assert client.estimate(three).units == 24
            assert client.estimate(auto).units == 72  # 9 images at most, 8 units each
            first = await client.images.run(three)
            billed = server.billed_units
            second = await client.images.run(auto)
    assert first.cost is not None
    assert first.cost.units == 24 == billed
    # The fake's auto series makes 3 images: billed for those, under the estimate.
    assert second.cost is not None
    assert second.cost.units == 8 * len(second.images) == 24
    assert server.billed_units == 48


async def test_a_failed_task_is_billed_nothing(server: FakeKlingServer) -> None:
    async with make_client(server) as client:
        handle = await client.images.generate(prompt="[fail] p", n=3)
        with pytest.raises(kling_async.TaskFailedError) as caught:
            await handle.wait(timeout=5)
    assert caught.value.task.cost == Cost(units=Decimal(0))
    assert server.billed_units == 0


async def test_the_fake_bills_by_its_own_table_when_given_one() -> None:
    table = DEFAULT_PRICES.replacing(
        Price(endpoint="images/generations", model_name="kling-v3", units="0.5")
    )
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.05, prices=table) as server:
        async with make_client(server) as client:
            task = await client.images.run(ImageGenerationRequest(prompt="p", n=3))
    assert task.cost is not None
    assert task.cost.units == Decimal("1.5") == server.billed_units


# --- totals -------------------------------------------------------------------------------


async def test_a_batch_adds_up_estimated_and_deducted(server: FakeKlingServer) -> None:
    requests = [
        ImageGenerationRequest(prompt="a", n=2),  # 16
        ImageGenerationRequest(prompt="[fail] b"),  # estimated 8, billed 0
        ImageGenerationRequest(prompt="c", model_name="kling-v2-1", n=3),  # 12
        ImageGenerationRequest(prompt="d", model_name="no-such-price"),  # unpriced
    ]
    async with make_client(server) as client:
        batch = client.batch(requests)
        results = await batch.collect()
    assert [r.estimate for r in results] == [Decimal(16), Decimal(8), Decimal(12), None]
    assert [r.cost.units if r.cost else None for r in results] == [
        Decimal(16),
        Decimal(0),
        Decimal(12),
        Decimal(1),  # the fake's stand-in for a model the page does not price
    ]
    assert batch.cost == kling_async.BatchCost(
        estimated=Decimal(36), deducted=Decimal(29), unreported=0, unpriced=1
    )
    assert server.billed_units == 29
    assert results[0].to_dict()["estimate"] == "16"
    assert results[0].to_dict()["task"]["final_unit_deduction"] == "16"


async def test_the_journal_records_estimate_cost_and_units_and_reads_spend(
    server: FakeKlingServer, tmp_path: Path
) -> None:
    path = tmp_path / "journal.db"
    async with make_client(server, journal=path) as client:
        await client.batch(
            [
                ImageGenerationRequest(prompt="a", n=2),
                OmniImageRequest(
                    prompt="o", model_name="kling-v3-omni", result_type="series",
                    series_amount="auto", aspect_ratio="1:1",
                ),
            ],
            name="first",
        ).collect()  # fmt: skip
        with pytest.raises(kling_async.TaskFailedError):
            await client.images.run(
                ImageGenerationRequest(prompt="[fail] b", model_name="kling-v2-1")
            )
    journal = Journal(path)
    try:
        entries = {e.body.get("prompt"): e for e in await journal.entries()}
        a, omni, failed = entries["a"], entries["o"], entries["[fail] b"]
        assert (a.estimate, a.cost, a.pack, a.units, a.units_used, a.batch) == (
            Decimal(16), Cost(units=Decimal(16)), "image", 2, 2, "first",
        )  # fmt: skip
        # An auto series held the most (9 units) and used what it made (3).
        assert (omni.estimate, omni.units, omni.units_used) == (Decimal(72), 9, 3)
        assert omni.cost == Cost(units=Decimal(24))
        assert (failed.estimate, failed.cost, failed.batch) == (
            Decimal(4), Cost(units=Decimal(0)), None,
        )  # fmt: skip
        [total] = await journal.spend()
        assert (total.tasks, total.estimated, total.deducted, total.running) == (
            3, Decimal(92), Decimal(40), 0,
        )  # fmt: skip
        by_batch = {s.group: s for s in await journal.spend(by="batch")}
        assert sorted(by_batch) == ["-", "first"]
        assert (by_batch["first"].estimated, by_batch["first"].deducted) == (
            Decimal(88),
            Decimal(40),
        )
        by_model = {s.group: s.deducted for s in await journal.spend(by="model")}
        assert by_model == {"kling-v2-1": 0, "kling-v3": 16, "kling-v3-omni": 24}
        by_endpoint = {s.group: s.tasks for s in await journal.spend(by="endpoint")}
        assert by_endpoint == {"images/generations": 2, "images/omni-image": 1}
        [day] = await journal.spend(by="day")
        assert day.group == time.strftime("%Y-%m-%d", time.gmtime())
        with pytest.raises(ValueError, match="by must be one of"):
            spend_of([], by="week")  # type: ignore[arg-type]
    finally:
        await journal.close()


def test_spend_counts_what_exists_and_leaves_out_what_never_was() -> None:
    def entry(state: EntryState, **fields: Any) -> kling_async.LedgerEntry:
        return kling_async.LedgerEntry(
            external_task_id=str(time.monotonic_ns()),
            endpoint=kling_async.Endpoint.GENERATIONS,
            body={"model_name": "kling-v3"},
            state=state,
            **fields,
        )

    entries = [
        entry(EntryState.TERMINAL, estimate=Decimal(8), cost=Cost(units=Decimal(8))),
        entry(EntryState.TERMINAL, estimate=Decimal(8)),  # no deduction reported
        entry(EntryState.CREATED, estimate=Decimal(16)),  # running: its bill is to come
        entry(EntryState.UNCERTAIN, estimate=Decimal(8)),  # may exist
        entry(EntryState.NOT_CREATED, estimate=Decimal(8)),  # never was
        entry(EntryState.INTENDED, estimate=Decimal(8)),  # not sent
    ]
    [total] = spend_of(entries)
    assert total == kling_async.Spend(
        group="total",
        tasks=4,
        estimated=Decimal(40),
        deducted=Decimal(8),
        running=2,
        unreported=1,
        unpriced=0,
    )
    assert spend_of([]) == [kling_async.Spend(group="total")]


async def test_a_journal_of_schema_1_gains_the_cost_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old_columns = (
        "external_task_id TEXT PRIMARY KEY, endpoint TEXT NOT NULL, body TEXT, "
        "units INTEGER NOT NULL, state TEXT NOT NULL, task_id TEXT, status TEXT, "
        "images TEXT NOT NULL, error TEXT, receiver_callback INTEGER NOT NULL, key TEXT, "
        "owner TEXT, downloaded TEXT NOT NULL, intended_at REAL NOT NULL, "
        "updated_at REAL NOT NULL"
    )
    body = json.dumps({"prompt": "p", "model_name": "kling-v3", "n": 1})
    with sqlite3.connect(path) as db:
        db.execute(f"CREATE TABLE entries ({old_columns})")
        db.execute(
            "INSERT INTO entries VALUES ('e-1', 'images/generations', ?, 1, 'terminal', 't-1', "
            "'succeed', '[]', NULL, 0, 'old#x#0', NULL, '[]', 1.0, 2.0)",
            (body,),
        )
        db.execute("PRAGMA user_version = 1")
    journal = Journal(path)
    try:
        [old] = await journal.entries()
        assert (old.external_task_id, old.estimate, old.cost, old.pack, old.batch) == (
            "e-1", None, None, "image", None,
        )  # fmt: skip
        [total] = await journal.spend()
        assert (total.tasks, total.unreported, total.unpriced) == (1, 1, 1)
        journal.record(old.moved(old.state, cost=Cost(units=Decimal(8)), estimate=Decimal(8)))
        await journal.flush()
        [again] = await journal.entries()
        assert (again.cost, again.estimate) == (Cost(units=Decimal(8)), Decimal(8))
    finally:
        await journal.close()
    with sqlite3.connect(path) as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(entries)")}
    assert {"estimate", "cost", "pack", "units_used", "batch"} <= columns


def test_an_entry_s_money_survives_plain_data_as_a_shared_ledger_stores_it() -> None:
    from kling_async._records import records

    entry = kling_async.LedgerEntry(
        external_task_id="e",
        endpoint=kling_async.Endpoint.OMNI_IMAGE,
        body={"model_name": "kling-v3-omni"},
        units=9,
        estimate=Decimal("72"),
        cost=Cost(units=Decimal("24"), quota=Decimal("0.5")),
        units_used=3,
        batch="b",
    )
    data = json.loads(json.dumps(records.unstructure(entry)))
    assert data["estimate"] == "72"
    assert data["cost"] == {"units": "24", "quota": "0.5", "list_price": None}
    assert records.structure(data, kling_async.LedgerEntry) == entry
