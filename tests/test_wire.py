"""The protocol layer alone: envelopes, the error tree, Retry-After, task parsing."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any

import pytest

import kling_async
from kling_async import (
    APIError,
    AuthenticationError,
    ImageGenerationRequest,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    TaskStatus,
    TransportError,
)
from kling_async._exceptions import error_class_for, is_ambiguous, is_retryable
from kling_async._models import Endpoint
from kling_async._wire import (
    Envelope,
    create_request,
    download_error,
    get_request,
    list_items,
    list_request,
    parse_envelope,
    parse_retry_after,
    parse_task,
    parse_task_list,
    same_version,
    task_id_of,
)
from tests.helpers import FAMILIES
from tests.imagedata import png


def body(code: int, message: str = "m", **extra: Any) -> bytes:
    return json.dumps({"code": code, "message": message, "request_id": "req-1", **extra}).encode()


RETRYABLE = {1302, 5000, 5001, 5002}


@pytest.mark.parametrize(("code", "status", "cls"), FAMILIES)
def test_every_code_maps_to_its_family(code: int, status: int, cls: type[APIError]) -> None:
    with pytest.raises(cls) as caught:
        parse_envelope(status, body(code, "what Kling said"), {})
    error = caught.value
    assert type(error) is cls
    assert (error.code, error.message, error.request_id, error.http_status) == (
        code,
        "what Kling said",
        "req-1",
        status,
    )
    assert f"[{code}] what Kling said" in str(error)
    assert "request_id=req-1" in str(error)
    assert error.hint
    assert error.hint in str(error)
    assert is_retryable(error) is (code in RETRYABLE)


def test_every_family_is_an_api_error_and_a_kling_error() -> None:
    for _, _, cls in FAMILIES:
        assert issubclass(cls, APIError)
        assert issubclass(cls, kling_async.KlingError)


def test_unknown_codes_fall_back_on_the_http_status() -> None:
    cases = [
        (400, InvalidRequestError),
        (401, AuthenticationError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (500, ServerError),
        (429, APIError),  # a 429 may be a quota problem: never assume a throttle
        (418, APIError),
    ]
    for status, cls in cases:
        with pytest.raises(APIError) as caught:
            parse_envelope(status, body(9999), {})
        assert type(caught.value) is cls
        assert caught.value.code == 9999
        assert not is_retryable(caught.value)


@pytest.mark.parametrize(
    ("status", "raw", "cls", "retryable"),
    [
        (502, b"<html>Bad Gateway</html>", ServerError, True),
        (503, b"", ServerError, True),
        (504, b"upstream timeout", ServerError, True),
        (500, b"oops", ServerError, False),  # only Kling's 5000 says an HTTP 500 is transient
        (200, b"not json", APIError, False),
        (200, b"[]", APIError, False),
        (200, b'{"message": "no code"}', APIError, False),
        (200, b'{"code": "0"}', APIError, False),
        (200, b'{"code": true}', APIError, False),
        (404, b"\xff\xfe\x00garbage", NotFoundError, False),
    ],
)
def test_malformed_bodies_become_api_errors_with_a_snippet(
    status: int, raw: bytes, cls: type[APIError], retryable: bool
) -> None:
    with pytest.raises(APIError) as caught:
        parse_envelope(status, raw, {})
    assert type(caught.value) is cls
    assert caught.value.http_status == status
    assert caught.value.code is None
    assert is_retryable(caught.value) is retryable
    assert "body:" in str(caught.value)


def test_snippet_is_bounded() -> None:
    with pytest.raises(APIError) as caught:
        parse_envelope(502, b"x" * 100_000, {})
    assert len(str(caught.value)) < 400


def test_code_zero_with_an_error_status_is_still_an_error() -> None:
    with pytest.raises(ServerError):
        parse_envelope(503, body(0), {})


def test_success_envelope() -> None:
    envelope = parse_envelope(200, body(0, "SUCCEED", data={"x": 1}), {})
    assert envelope == Envelope(data={"x": 1}, request_id="req-1", message="SUCCEED")


def test_retry_after_is_attached_to_the_error() -> None:
    with pytest.raises(RateLimitError) as caught:
        parse_envelope(429, body(1302), {"Retry-After": "3"})
    assert caught.value.retry_after == 3.0


def test_retry_after_forms() -> None:
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("0.25") == 0.25
    assert parse_retry_after("-4") == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("nan") is None
    now = datetime(2026, 12, 1, 12, 0, 0, tzinfo=timezone.utc)
    future = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(future, now) == 30.0
    past = now - timedelta(seconds=30)
    assert parse_retry_after(format_datetime(past, usegmt=True), now) == 0.0
    assert parse_retry_after(future) is None  # a date, and no time to count from


def test_transport_errors_are_retryable_and_ambiguity_depends_on_reaching_the_server() -> None:
    lost = TransportError("reset after send")
    refused = TransportError("refused", may_have_reached_server=False)
    assert is_retryable(lost)
    assert is_retryable(refused)
    assert is_ambiguous(lost)
    assert not is_ambiguous(refused)
    assert is_ambiguous(ServerError("boom", code=5000, http_status=500))
    assert not is_ambiguous(RateLimitError("slow", code=1302, http_status=429))


# --- tasks ------------------------------------------------------------------------

TASK = {
    "task_id": "t-1",
    "task_status": "succeed",
    "task_status_msg": "",
    "task_info": {"external_task_id": "ext-1"},
    "created_at": 1_700_000_000_000,
    "updated_at": 1_700_000_004_500,
    "final_unit_deduction": "2",
    "watermark_info": {"enabled": True},
    "task_result": {
        "images": [
            {"index": 0, "url": "https://cdn/0.png", "watermark_url": "https://cdn/0w.png"},
            {"index": 1, "url": "https://cdn/1.png"},
        ]
    },
}


def envelope(data: Any) -> Envelope:
    return Envelope(data=data, request_id="req-2")


def test_task_fields() -> None:
    task = parse_task(envelope(TASK))
    assert task.task_id == "t-1"
    assert task.status is TaskStatus.SUCCEED
    assert task.is_terminal
    assert task.status_message is None
    assert task.external_task_id == "ext-1"
    assert task.created_at == datetime(2023, 11, 14, 22, 13, 20, tzinfo=timezone.utc)
    assert task.updated_at is not None
    assert task.updated_at.tzinfo is not None
    assert (task.updated_at - task.created_at).total_seconds() == 4.5
    assert task.final_unit_deduction == "2"
    assert [(i.index, i.url, i.watermark_url) for i in task.images] == [
        (0, "https://cdn/0.png", "https://cdn/0w.png"),
        (1, "https://cdn/1.png", None),
    ]
    assert task.raw["watermark_info"] == {"enabled": True}
    assert "raw" not in repr(task)


def test_a_task_becomes_plain_json_ready_data() -> None:
    task = parse_task(envelope(TASK))
    data = task.to_dict()
    assert data == {
        "task_id": "t-1",
        "status": "succeed",
        "status_message": None,
        "images": [
            {"index": 0, "url": "https://cdn/0.png", "watermark_url": "https://cdn/0w.png"},
            {"index": 1, "url": "https://cdn/1.png", "watermark_url": None},
        ],
        "external_task_id": "ext-1",
        "created_at": "2023-11-14T22:13:20+00:00",
        "updated_at": "2023-11-14T22:13:24.500000+00:00",
        "final_unit_deduction": "2",
        "final_balance_deduction": None,
    }
    assert type(data["status"]) is str
    assert json.loads(task.to_json()) == data
    assert datetime.fromisoformat(data["created_at"]) == task.created_at
    unknown = parse_task(envelope({**TASK, "task_status": "queued_for_review"}))
    assert unknown.to_dict()["status"] == "queued_for_review"


def test_a_status_prints_as_kling_s_word() -> None:
    assert str(TaskStatus.SUCCEED) == "succeed"
    assert f"{TaskStatus.PROCESSING}|{TaskStatus.FAILED:>7}" == "processing| failed"
    assert str(TaskStatus("queued_for_review")) == "queued_for_review"
    assert TaskStatus.SUCCEED == "succeed"  # type: ignore[comparison-overlap]  # a str enum: the rule


def test_a_request_repr_abbreviates_base64_images() -> None:
    from tests.imagedata import png

    image = png(1200, 1200)
    request = kling_async.MultiImageRequest(
        subject_images=[image, "https://cdn.example.com/a.png"], style_image=image
    )
    text = repr(request)
    assert len(text) < 500
    assert "chars of base64" in text
    assert "'https://cdn.example.com/a.png'" in text
    assert len(str(request.subject_images[0])) > 1000  # the value itself is whole
    assert len(repr(kling_async.ImageGenerationRequest(prompt="p", image=image))) < 400


def test_unknown_fields_and_statuses_are_kept_and_not_terminal() -> None:
    data = {**TASK, "task_status": "queued_for_review", "brand_new": {"nested": [1]}}
    data["task_result"] = {"images": [{"index": 0, "url": "u", "extra": True}], "videos": []}
    task = parse_task(envelope(data))
    assert task.status == "queued_for_review"
    assert task.status.value == "queued_for_review"
    assert not task.is_terminal
    assert task.raw["brand_new"] == {"nested": [1]}
    assert task.images[0].url == "u"


def test_create_response_shape() -> None:
    data = {
        "task_id": "t-9",
        "task_status": "submitted",
        "task_info": {"external_task_id": "e-9"},
        "created_at": 1,
        "updated_at": 1,
    }
    task = parse_task(envelope(data))
    assert (task.status, task.images, task.external_task_id) == (TaskStatus.SUBMITTED, (), "e-9")


def test_tolerated_variations() -> None:
    data = {
        "task_id": 12345,
        "task_status": "failed",
        "task_status_msg": "nsfw",
        "created_at": "1700000000000",
        "updated_at": None,
        "final_unit_deduction": 0,
        "task_info": None,
        "task_result": None,
    }
    task = parse_task(envelope(data))
    assert task.task_id == "12345"
    assert task.status_message == "nsfw"
    assert task.updated_at is None
    assert task.final_unit_deduction == "0"


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        "task",
        {"task_status": "succeed"},
        {"task_id": "t", "task_status": 3},
        {"task_id": "t", "task_status": "succeed", "created_at": "yesterday"},
        {"task_id": "t", "task_status": "succeed", "created_at": float("inf")},
        {"task_id": "t", "task_status": "succeed", "task_result": {"images": "many"}},
        {"task_id": "t", "task_status": "succeed", "task_result": {"images": [{"index": 0}]}},
        {"task_id": "t", "task_status": "succeed", "task_result": {"images": [7]}},
        {"task_id": "t", "task_status": "succeed", "task_info": ["x"]},
        {"task_id": {"a": 1}, "task_status": "succeed"},
        {"task_id": "t", "task_status": "succeed", "created_at": 10**30},
    ],
)
def test_malformed_tasks_raise_api_error(data: Any) -> None:
    with pytest.raises(APIError) as caught:
        parse_task(envelope(data))
    assert caught.value.request_id == "req-2"


def test_task_list() -> None:
    tasks = parse_task_list(envelope([TASK, {**TASK, "task_id": "t-2"}]))
    assert [t.task_id for t in tasks] == ["t-1", "t-2"]
    with pytest.raises(APIError):
        parse_task_list(envelope({"not": "a list"}))


def test_request_paths_work_under_any_root() -> None:
    assert get_request(Endpoint.MULTI_IMAGE, "abc").path == "/v1/images/multi-image2image/abc"
    listing = list_request(Endpoint.GENERATIONS, 2, 500)
    assert (listing.path, listing.params) == (
        "/v1/images/generations",
        {"pageNum": "2", "pageSize": "500"},
    )
    for page, size in ((0, 10), (1001, 10), (1, 0), (1, 501)):
        with pytest.raises(ValueError, match="must be between"):
            list_request(Endpoint.GENERATIONS, page, size)


def test_a_wire_request_s_repr_holds_neither_the_callback_token_nor_the_images() -> None:
    # r14: the repr printed the callback URL's token and whole base64 images.
    image = base64.b64encode(png(400, 400)).decode()
    token = "tok" + "0" * 40
    request = ImageGenerationRequest(
        prompt="p", image=image, callback_url=f"https://hooks.example.com/kling/ext/{token}"
    )
    text = repr(create_request(request))
    assert token not in text
    assert image[:100] not in text
    assert "callback_url" in text  # the fields are named
    assert len(text) < 300


def test_a_list_item_s_task_id_and_version_are_read_without_decoding_it() -> None:
    assert task_id_of({"task_id": "t-1", "task_status": "x"}) == "t-1"
    assert task_id_of({"task_id": 7}) is None
    assert task_id_of(["t-1"]) is None
    known = {"task_id": "t", "task_status": "processing", "updated_at": 5}
    assert same_version(known, {**known, "task_result": {"images": []}})
    assert not same_version(known, {**known, "updated_at": 6})
    assert not same_version(known, {**known, "task_status": "succeed"})
    assert not same_version(known, "not a task")


def test_a_list_page_that_is_not_an_array_is_an_api_error() -> None:
    with pytest.raises(APIError, match="not an array"):
        list_items(Envelope(data={"task_id": "t"}, request_id="r"))
    assert list_items(Envelope(data=[1, 2], request_id="r")) == [1, 2]


@pytest.mark.parametrize(
    ("status", "cls", "expired"),
    [(404, NotFoundError, True), (410, APIError, True), (500, ServerError, False)],
)
def test_a_failed_download_is_a_typed_error(
    status: int, cls: type[APIError], expired: bool
) -> None:
    assert download_error(200, "https://cdn/x.png") is None
    error = download_error(status, "https://cdn/x.png")
    assert isinstance(error, cls)
    assert error.http_status == status
    assert ("30 days" in str(error)) is expired


# --- error codes decide alone; Retry-After without a zone (exc01-09, exc15, exc18) ---------


@pytest.mark.parametrize(("code", "status", "cls"), FAMILIES)
def test_codes_map_by_themselves_even_with_http_200(
    code: int, status: int, cls: type[APIError]
) -> None:
    """Some gateways answer every error with HTTP 200: the code alone must decide."""
    del status
    body = json.dumps({"code": code, "message": "m", "request_id": "r"}).encode()
    with pytest.raises(cls) as caught:
        parse_envelope(200, body, {})
    assert type(caught.value) is cls


def test_bodiless_429_and_unknown_codes_on_503_are_not_retried() -> None:
    with pytest.raises(APIError) as caught:
        parse_envelope(429, b"<html>slow down</html>", {})
    assert type(caught.value) is APIError
    assert not is_retryable(caught.value)
    unknown = json.dumps({"code": 7777, "message": "?"}).encode()
    with pytest.raises(ServerError) as caught_server:
        parse_envelope(503, unknown, {})
    assert not is_retryable(caught_server.value)  # an unknown code is not assumed transient
    assert error_class_for(None, None) is APIError


def test_retry_after_date_without_timezone_is_read_as_utc() -> None:
    from kling_async._wire import parse_retry_after

    now = datetime(2026, 12, 1, 12, 0, 0, tzinfo=timezone.utc)
    soon = now + timedelta(seconds=20)
    assert parse_retry_after(soon.strftime("%a, %d %b %Y %H:%M:%S"), now) == 20.0
