"""List pages: newest first, bounded page numbers and sizes."""

from __future__ import annotations

import pytest

from .helpers import GEN, MULTI, Api, assert_envelope


async def test_list_pages_newest_first(api: Api) -> None:
    ids = [await api.task_id(external_task_id=f"t{i}") for i in range(5)]
    await api.task_id(MULTI)
    status, payload, _ = await api.list(GEN, pageNum=1, pageSize=2)
    assert status == 200
    assert_envelope(payload, 0)
    assert [task["task_id"] for task in payload["data"]] == [ids[4], ids[3]]
    _, payload, _ = await api.list(GEN, pageNum=3, pageSize=2)
    assert [task["task_id"] for task in payload["data"]] == [ids[0]]
    _, payload, _ = await api.list(GEN, pageNum=4, pageSize=2)
    assert payload["data"] == []
    _, payload, _ = await api.list(GEN)
    assert len(payload["data"]) == 5
    assert payload["data"][0]["task_info"]["external_task_id"] == "t4"
    _, payload, _ = await api.list(MULTI, pageSize=500)
    assert len(payload["data"]) == 1


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("pageNum", 0),
        ("pageNum", 1001),
        ("pageSize", 0),
        ("pageSize", 501),
        ("pageSize", "ten"),
    ],
)
async def test_list_page_bounds(api: Api, param: str, value: object) -> None:
    status, payload, _ = await api.call("GET", f"/v1/{GEN}", params={param: str(value)})
    assert (status, payload["code"]) == (400, 1201)
    assert param in payload["message"]


async def test_list_accepts_the_extreme_bounds(api: Api) -> None:
    for params in ({"pageNum": "1000", "pageSize": "1"}, {"pageNum": "1", "pageSize": "500"}):
        status, payload, _ = await api.call("GET", f"/v1/{GEN}", params=params)
        assert (status, payload["data"]) == (200, [])
