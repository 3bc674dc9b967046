"""The shapes real Kling answers and callbacks take, read by the wire layer alone (#16).

Both callback formats, images without an index, billing fields, creates answered
with little more than a task_id, error bodies without ``data`` or ``request_id``,
and request fields sent only when set. tests/conformance/ drives recorded and
documented payloads through the public API over HTTP; these are the table tests.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import pytest

from kling_async import (
    APIError,
    BalanceDeduction,
    ConcurrencyLimitError,
    ImageGenerationRequest,
    InvalidRequestError,
    MultiImageRequest,
    QuotaExceededError,
    TaskStatus,
    ValidationError,
)
from kling_async._wire import (
    Envelope,
    parse_callback,
    parse_created,
    parse_envelope,
    parse_task,
    request_body,
)

URL = "https://cdn.example/x.png"
SUBJECT = "https://example.com/subject.png"


def envelope(data: Any) -> Envelope:
    return Envelope(data=data, request_id="req-3")


def task(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "task_id": "t-1",
        "task_status": "succeed",
        "created_at": 1_700_000_000_000,
        "updated_at": 1_700_000_004_500,
    }
    data.update(changes)
    return data


# --- images -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("images", "indexes"),
    [
        ([{"index": 0, "url": URL}, {"index": 1, "url": URL}], [0, 1]),
        ([{"id": "", "url": URL}, {"id": "", "url": URL}], [0, 1]),  # recorded from the API
        ([{"url": URL}, {"url": URL}, {"url": URL}], [0, 1, 2]),
        ([{"index": None, "url": URL}, {"index": "", "url": URL}], [0, 1]),
        ([{"index": "3", "url": URL}, {"url": URL}], [3, 1]),
        ([{"index": 5, "url": URL}], [5]),
    ],
)
def test_an_image_without_an_index_takes_its_position(
    images: list[dict[str, Any]], indexes: list[int]
) -> None:
    parsed = parse_task(envelope(task(task_result={"images": images})))
    assert [image.index for image in parsed.images] == indexes


# --- billing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "units", "balance"),
    [
        (
            {"final_unit_deduction": "2", "final_balance_deduction": {"quota": "0.8"}},
            "2",
            BalanceDeduction(quota="0.8"),
        ),
        (
            {"final_balance_deduction": {"quota": "0.56", "list_price": "0.7"}},
            None,
            BalanceDeduction(quota="0.56", list_price="0.7"),
        ),
        ({"final_balance_deduction": "1.5"}, None, BalanceDeduction(quota="1.5")),
        ({"final_balance_deduction": 3}, None, BalanceDeduction(quota="3")),
        # Malformed billing details are dropped; the finished task stays readable.
        ({"final_balance_deduction": ["x"], "final_unit_deduction": {"a": 1}}, None, None),
        ({"final_balance_deduction": {"quota": None, "list_price": None}}, None, None),
        ({"final_balance_deduction": True}, None, None),
        ({}, None, None),
    ],
)
def test_billing_fields(
    fields: dict[str, Any], units: str | None, balance: BalanceDeduction | None
) -> None:
    parsed = parse_task(envelope(task(**fields)))
    assert (parsed.final_unit_deduction, parsed.final_balance_deduction) == (units, balance)
    assert parsed.status is TaskStatus.SUCCEED


# --- creates answered with little more than a task_id -----------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {
                "task_id": "t-9",
                "task_status": "submitted",
                "task_info": {"external_task_id": "e-9"},
                "created_at": 1_700_000_000_000,
                "updated_at": 1_700_000_000_000,
            },
            ("t-9", "submitted", "e-9", True),
        ),
        ({"task_id": "t-9"}, ("t-9", "submitted", None, False)),
        ({"task_id": 867283741759111202}, ("867283741759111202", "submitted", None, False)),
        ({"task_id": "t-9", "task_status": "processing"}, ("t-9", "processing", None, False)),
        ({"task_id": "t-9", "task_status": None}, ("t-9", "submitted", None, False)),
        ({"task_id": "t-9", "task_status": 7}, ("t-9", "submitted", None, False)),
        (
            {"task_id": "t-9", "task_info": ["odd"], "created_at": "yesterday"},
            ("t-9", "submitted", None, False),
        ),
        (
            {"task_id": "t-9", "task_info": {"external_task_id": "e"}, "created_at": 10**30},
            ("t-9", "submitted", "e", False),
        ),
        (
            {"task_id": "t-9", "task_status": "submitted", "task_result": {"images": "x"}},
            ("t-9", "submitted", None, False),
        ),
    ],
)
def test_a_create_answer_with_a_task_id_is_a_task(
    data: dict[str, Any], expected: tuple[str, str, str | None, bool]
) -> None:
    created = parse_created(envelope(data))
    task_id, status, external_task_id, has_times = expected
    assert (created.task_id, created.status.value, created.external_task_id) == (
        task_id,
        status,
        external_task_id,
    )
    assert (created.created_at is not None) is has_times
    assert created.raw == data


@pytest.mark.parametrize(
    "data",
    [None, [], "t-9", {}, {"task_id": ""}, {"task_id": "  "}, {"task_id": None},
     {"task_id": {"id": 1}}, {"task_id": True}, {"task_status": "submitted"}],
)  # fmt: skip
def test_a_create_answer_without_a_usable_task_id_is_an_api_error(data: Any) -> None:
    with pytest.raises(APIError) as caught:
        parse_created(envelope(data))
    assert caught.value.request_id == "req-3"
    assert "external_task_id" in str(caught.value)


# --- callbacks --------------------------------------------------------------------------------


def test_a_legacy_callback_with_or_without_task_info() -> None:
    with_info = parse_callback(task(task_info={"external_task_id": "e-1"}))
    without = parse_callback(task())
    assert with_info.external_task_id == "e-1"
    assert without.external_task_id is None
    assert with_info.task_id == without.task_id == "t-1"


def test_a_new_design_callback_maps_onto_the_task_model() -> None:
    body = {
        "id": "913827032734642185",
        "status": "succeeded",
        "message": "",
        "create_time": 1_700_000_000_000,
        "update_time": 1_700_000_004_500,
        "external_id": "order-42",
        "outputs": [
            {"type": "image", "url": "https://cdn/a.png", "watermark_url": "https://cdn/aw.png"},
            {"type": "video", "id": "v", "url": "https://cdn/v.mp4", "duration": "5"},
            {"type": "image", "url": "https://cdn/b.png", "group_id": "g"},
        ],
        "billing": [
            {"charge_type": "unit", "amount": "2", "package_type": "image"},
            {"charge_type": "cash", "cash_type": "balance", "amount": "0.5", "currency": "USD",
             "list_price": "0.7"},
        ],
    }  # fmt: skip
    parsed = parse_callback(body)
    assert parsed.task_id == "913827032734642185"
    assert parsed.status is TaskStatus.SUCCEED
    assert parsed.is_terminal
    assert parsed.status_message is None
    assert parsed.external_task_id == "order-42"
    assert parsed.created_at == datetime(2023, 11, 14, 22, 13, 20, tzinfo=timezone.utc)
    assert [(i.index, i.url, i.watermark_url) for i in parsed.images] == [
        (0, "https://cdn/a.png", "https://cdn/aw.png"),
        (1, "https://cdn/b.png", None),
    ]
    assert parsed.final_unit_deduction == "2"
    assert parsed.final_balance_deduction == BalanceDeduction(quota="0.5", list_price="0.7")
    assert parsed.raw is body


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("submitted", TaskStatus.SUBMITTED),
        ("processing", TaskStatus.PROCESSING),
        ("succeeded", TaskStatus.SUCCEED),
        ("failed", TaskStatus.FAILED),
    ],
)
def test_new_design_statuses(status: str, expected: TaskStatus) -> None:
    parsed = parse_callback({"id": "1", "status": status, "outputs": []})
    assert parsed.status is expected
    assert parsed.is_terminal is expected.is_terminal


def test_new_design_odds_and_ends() -> None:
    failed = parse_callback({"id": 7, "status": "failed", "message": "risk control"})
    assert (failed.task_id, failed.status_message, failed.images) == ("7", "risk control", ())
    odd = parse_callback({"id": "1", "status": "review", "billing": "n/a", "outputs": None})
    assert odd.status == "review"
    assert not odd.is_terminal
    assert (odd.final_unit_deduction, odd.final_balance_deduction) == (None, None)
    several = parse_callback(
        {"id": "1", "status": "succeeded",
         "billing": [{"charge_type": "unit", "amount": "1.5"}, {"charge_type": "unit",
                                                                 "amount": "2"}]}
    )  # fmt: skip
    assert several.final_unit_deduction == "3.5"
    garbled = parse_callback(
        {"id": "1", "status": "succeeded", "billing": [{"charge_type": "unit", "amount": "x"}]}
    )
    assert garbled.final_unit_deduction is None


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        "succeeded",
        {},
        {"id": "1"},
        {"status": "succeeded"},
        {"id": "", "status": "succeeded"},
        {"id": "1", "status": 3},
        {"id": "1", "status": "succeeded", "outputs": "many"},
        {"id": "1", "status": "succeeded", "outputs": [{"type": "image"}]},
        {"id": "1", "status": "succeeded", "outputs": [7]},
        {"id": "1", "status": "succeeded", "create_time": float("inf")},
        {"task_id": "t", "task_status": "succeed", "created_at": 10**30},
        {"task_status": "succeed"},
    ],
)
def test_a_body_in_neither_format_is_a_value_error(body: Any) -> None:
    with pytest.raises(ValueError, match="Kling task"):
        parse_callback(body)


# --- error answers (point 7 of #16: keep them under test) --------------------------------------


@pytest.mark.parametrize(
    ("status", "payload", "cls", "code"),
    [
        (200, {"code": 1303, "message": "over the limit"}, ConcurrencyLimitError, 1303),
        (200, {"code": 1201, "message": "bad", "data": None}, InvalidRequestError, 1201),
        (429, {"code": 1102, "message": "used up"}, QuotaExceededError, 1102),
        (400, {"code": 1201, "message": "bad", "request_id": ""}, InvalidRequestError, 1201),
    ],
)
def test_error_bodies_without_data_or_request_id_and_with_http_200(
    status: int, payload: dict[str, Any], cls: type[APIError], code: int
) -> None:
    with pytest.raises(APIError) as caught:
        parse_envelope(status, json.dumps(payload).encode(), {})
    error = caught.value
    assert type(error) is cls
    assert (error.code, error.request_id, error.http_status) == (code, None, status)
    assert error.message == payload["message"]


def test_a_success_without_request_id_or_data() -> None:
    answer = parse_envelope(200, b'{"code": 0, "message": "SUCCEED"}', {})
    assert (answer.data, answer.request_id) == (None, None)


# --- requests: fields sent only when set --------------------------------------------------------


def test_model_name_none_is_the_default_and_never_sent_as_null() -> None:
    """Review r14b: an explicit ``model_name=None`` went out as ``"model_name": null``."""
    generation = ImageGenerationRequest(prompt="p", model_name=None)
    multi = MultiImageRequest(subject_images=[SUBJECT], model_name=None)
    assert (generation.model_name, multi.model_name) == ("kling-v3", "kling-v2")
    assert request_body(generation)["model_name"] == "kling-v3"
    assert request_body(multi)["model_name"] == "kling-v2"
    for bad in ("", "  ", 3):
        with pytest.raises(ValidationError, match="model_name"):
            ImageGenerationRequest(prompt="p", model_name=bad)  # type: ignore[arg-type]


def test_fidelity_fields_are_sent_only_when_set() -> None:
    # The gateway and the official API document different defaults: Kling applies its own.
    plain = request_body(ImageGenerationRequest(prompt="p", image=SUBJECT))
    assert "image_fidelity" not in plain
    assert "human_fidelity" not in plain
    assert "null" not in json.dumps(plain)
    set_ = request_body(
        ImageGenerationRequest(
            prompt="p",
            image=SUBJECT,
            image_reference="subject",
            image_fidelity=0.0,
            human_fidelity=0.45,
        )
    )
    assert (set_["image_fidelity"], set_["human_fidelity"]) == (0.0, 0.45)
