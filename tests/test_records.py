"""The records converter (``to_dict``, journal rows, Redis entries) is apart from Kling's wire."""

from __future__ import annotations

from datetime import datetime, timezone

from kling_async import ImageResult, LedgerEntry, Task, TaskStatus
from kling_async._models import Endpoint
from kling_async._records import records
from kling_async._wire import converter as wire_converter


def test_a_ledger_entry_round_trips_through_records() -> None:
    entry = LedgerEntry(
        external_task_id="ext-1",
        endpoint=Endpoint.GENERATIONS,
        body={"prompt": "a fox", "n": 2},
        units=2,
        task_id="t-1",
        status="succeed",
        images=(ImageResult(index=0, url="https://x/0.png"), ImageResult(index=1, url="u")),
        downloaded=("out/0.png",),
    )
    assert records.structure(records.unstructure(entry), LedgerEntry) == entry


def test_task_records_are_iso_while_the_wire_reads_milliseconds() -> None:
    raw = {"task_id": "t-1", "task_status": "succeed", "created_at": 1_700_000_000_000}
    task = wire_converter.structure(raw, Task)
    assert task.created_at == datetime(2023, 11, 14, 22, 13, 20, tzinfo=timezone.utc)
    data = task.to_dict()
    assert data["created_at"] == "2023-11-14T22:13:20+00:00"
    assert data["status"] == "succeed"
    assert "raw" not in data
    # Two converters: the wire's Task hook reads Kling's JSON, records write plain data.
    assert records is not wire_converter
    assert task.status is TaskStatus.SUCCEED
