"""Tests added after mutation testing: each pins a rule that a one-line change could
otherwise break unnoticed (see the mutation ids in the docstrings)."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

import kling_async
from kling_async import (
    APIError,
    AuthenticationError,
    ClientClosedError,
    ImageGenerationRequest,
    JWTCredentials,
    NotFoundError,
    PollPolicy,
    RetryPolicy,
    ServerError,
    Task,
    TaskStatus,
    TransportError,
    ValidationError,
)
from kling_async._exceptions import error_class_for, is_retryable
from kling_async._image_input import sniff_image
from kling_async._models import Endpoint
from kling_async._resources import read_image_files
from kling_async._tracking import TaskState
from kling_async._wire import parse_envelope
from kling_async.testing import FakeKlingServer
from tests.helpers import API_KEY, FAMILIES, TickingClock, make_client
from tests.imagedata import jpeg, png

SECRET = "sk-hardening-0123456789abcdefghijklmnop"


def envelope_body(data: Any) -> bytes:
    return json.dumps({"code": 0, "message": "SUCCEED", "request_id": "r", "data": data}).encode()


def at(millis: int) -> datetime:
    return datetime.fromtimestamp(millis / 1000, tz=timezone.utc)


def task(status: str, updated: int) -> Task:
    return Task(task_id="t", status=TaskStatus(status), updated_at=at(updated), raw={"u": updated})


# --- what counts as news (trk01-04) -------------------------------------------------------


def test_is_news_rules() -> None:
    state = TaskState(Endpoint.GENERATIONS, "t", latest=task("processing", 1000))
    assert state.is_news(task("processing", 1001))  # newer
    assert not state.is_news(task("processing", 1000))  # duplicate
    assert not state.is_news(task("submitted", 999))  # stale
    assert not state.is_news(task("submitted", 1000))  # earlier stage, same millisecond
    assert state.is_news(task("succeed", 1000))  # later stage, same millisecond
    state.latest = task("succeed", 1000)
    assert not state.is_news(task("processing", 5000))  # nothing after a terminal state
    assert not state.is_news(task("failed", 6000))


async def test_a_terminal_task_stays_terminal(
    client: kling_async.Client, server: FakeKlingServer
) -> None:
    handle = await client.images.generate(prompt="p")
    done = await handle
    later = dict(done.raw, task_status="processing", updated_at=int(time.time() * 1000) + 60_000)
    server.inject("garbage", route="get", http_status=200, body=envelope_body(later))
    await handle.refresh()
    assert handle.status is TaskStatus.SUCCEED


async def test_stale_and_same_time_earlier_updates_do_not_roll_back() -> None:
    async with (
        FakeKlingServer(api_key=API_KEY, task_duration=None, processing_delay=0.01) as server,
        make_client(server) as client,
    ):
        handle = await client.images.generate(prompt="p")
        await asyncio.sleep(0.05)
        current = await handle.refresh()
        assert current.status is TaskStatus.PROCESSING
        stamp = int(current.raw["updated_at"])
        for updated in (stamp - 1000, stamp):
            older = dict(current.raw, task_status="submitted", updated_at=updated)
            server.inject("garbage", route="get", http_status=200, body=envelope_body(older))
            await handle.refresh()
            assert handle.status is TaskStatus.PROCESSING


# --- idempotent creates (trn02, trn04) --------------------------------------------------------


async def test_duplicate_external_id_after_ambiguity_is_looked_up_again(
    client: kling_async.Client, server: FakeKlingServer
) -> None:
    server.inject("error_after", route="create", code=5000, times=1)
    server.inject("error", route="get", code=1203, times=1)  # the first lookup races
    handle = await client.images.generate(prompt="p")
    assert len(server.tasks) == 1
    assert handle.task_id in server.tasks
    assert [r.code for r in server.requests_for("create")] == [5000, 1201]


async def test_ambiguity_is_remembered_across_tries(
    client: kling_async.Client, server: FakeKlingServer
) -> None:
    server.inject("drop_after", route="create", times=1)
    server.inject("error", route="get", code=1203, times=1)
    server.inject("error", route="create", code=1302, times=1)
    handle = await client.images.generate(prompt="p")
    assert len(server.tasks) == 1
    assert handle.task_id in server.tasks


# --- auth (exc25, aut08) ---------------------------------------------------------------------


async def test_not_yet_valid_token_is_resigned_once() -> None:
    credentials = JWTCredentials("ak", SECRET, clock=TickingClock(time.time()))
    async with (
        FakeKlingServer(access_key="ak", secret_key=SECRET) as server,
        make_client(server, api_key=None, credentials=credentials) as client,
    ):
        server.inject("error", route="create", code=1003, times=1)
        await client.images.generate(prompt="p")
    first, second = server.requests_for("create")
    assert (first.code, second.code) == (1003, 0)
    assert first.authorization != second.authorization


async def test_a_static_token_is_not_resent_on_expiry(
    client: kling_async.Client, server: FakeKlingServer
) -> None:
    server.inject("error", route="create", code=1004, times=None)
    with pytest.raises(AuthenticationError):
        await client.images.generate(prompt="p")
    assert len(server.requests_for("create")) == 1


# --- errors (exc01-09, exc15, exc18) ------------------------------------------------------------


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


async def test_a_bodiless_429_is_sent_once(
    client: kling_async.Client, server: FakeKlingServer
) -> None:
    server.inject("garbage", route="get", http_status=429, times=None)
    with pytest.raises(APIError):
        await client.images.get("x")
    assert len(server.requests_for("get")) == 1


async def test_oversized_responses_are_refused(
    client: kling_async.Client, server: FakeKlingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("kling_async._transport.MAX_RESPONSE_BYTES", 1000)
    server.inject("garbage", route="get", http_status=200, body=b"x" * 5000, times=None)
    with pytest.raises(TransportError, match="limit"):
        await client.images.get("x")


# --- handles (hdl10, pol03, pol05, pol04) ----------------------------------------------------


async def test_updates_raise_errors_that_end_polling(client: kling_async.Client) -> None:
    with pytest.raises(NotFoundError):
        [task async for task in client.images.attach("nope").updates()]


async def test_updates_raise_when_the_client_closes() -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=None) as server:
        client = make_client(server)
        handle = await client.images.generate(prompt="p")

        async def drain() -> list[Task]:
            return [task async for task in handle.updates()]

        draining = asyncio.create_task(drain())
        await asyncio.sleep(0.05)
        await client.close()
        with pytest.raises(ClientClosedError):
            await draining


async def test_an_unexpected_bug_while_polling_ends_the_wait(
    client: kling_async.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = await client.images.generate(prompt="p")

    def broken(_: object) -> Task:
        raise RuntimeError("bug")

    monkeypatch.setattr("kling_async._polling.parse_task", broken)
    with pytest.raises(kling_async.KlingError, match="bug"):
        await handle.wait(timeout=5)


async def test_no_poll_before_the_first_delay_and_gaps_grow_with_age() -> None:
    policy = PollPolicy(initial_delay=0.05, multiplier=3.0, max_delay=0.4, jitter=0.0, timeout=10)
    async with (
        FakeKlingServer(api_key=API_KEY, task_duration=None) as server,
        make_client(server, polling=policy) as client,
    ):
        handle = await client.images.generate(prompt="p")
        with pytest.raises(kling_async.TaskTimeoutError):
            await handle.wait(timeout=0.03)
        assert server.requests_for("get") == []
        with pytest.raises(kling_async.TaskTimeoutError):
            await handle.wait(timeout=1.2)
        times = [r.arrived_at for r in server.requests_for("get")]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert len(gaps) >= 3
    assert gaps[-1] > gaps[0] * 1.5  # older task, longer gap
    assert max(gaps) <= 0.4 + 0.1  # never beyond max_delay


def test_poll_policy_delay_arithmetic() -> None:
    policy = PollPolicy(
        initial_delay=1.0, multiplier=1.5, max_delay=10.0, jitter=0.1, rng=random.Random(4)
    )
    for age, base in ((0, 1.0), (1, 1.0), (4, 2.0), (10, 5.0), (100, 10.0), (1e300, 10.0)):
        for _ in range(20):
            assert base * 0.9 <= policy.delay(age) <= base * 1.1
    with pytest.raises(ValueError, match="positive"):
        PollPolicy(initial_delay=0)


def test_retry_policy_waits_grow_and_honour_retry_after() -> None:
    policy = RetryPolicy(initial_delay=0.5, max_delay=4.0, rng=random.Random(1))
    waits = policy.waits()
    next(waits)
    plain = ServerError("boom", code=5000, http_status=500)
    seen = [waits.send(plain) for _ in range(6)]
    for attempt, wait in enumerate(seen):
        ceiling = min(4.0, 0.5 * 2**attempt)
        assert ceiling / 2 <= wait <= ceiling
    hinted = kling_async.RateLimitError("slow", code=1302, http_status=429, retry_after=7.5)
    assert waits.send(hinted) == 7.5  # exact: neither jittered nor capped


# --- images (img24 and the JPEG parser) -----------------------------------------------------------


def test_images_given_as_paths_are_checked(tmp_path: Path) -> None:
    small = tmp_path / "small.png"
    small.write_bytes(png(100, 100))
    with pytest.raises(ValidationError) as caught:
        read_image_files(ImageGenerationRequest(prompt="p", image=small))
    assert caught.value.field == "image"
    assert "300" in caught.value.rule


def test_jpeg_parser_branches() -> None:
    # A DHT table (FFC4) and fill bytes (FF FF) before the frame header.
    dht = b"\xff\xc4" + (6).to_bytes(2, "big") + bytes(4)
    frame = b"\xff\xc0" + (17).to_bytes(2, "big") + b"\x08" + (500).to_bytes(2, "big")
    frame += (700).to_bytes(2, "big") + b"\x03" + bytes(9)
    info = sniff_image(b"\xff\xd8" + dht + b"\xff" + frame)
    assert info is not None
    assert (info.format, info.width, info.height) == ("jpeg", 700, 500)
    assert sniff_image(b"\xff\xd8\xff\xd0" + frame) is not None  # a marker without a length
    assert sniff_image(b"\xff\xd8" + frame[:6]) is None  # cut off inside the frame header
    assert sniff_image(b"\xff\xd8\x00\x00") is None  # not a marker
    assert sniff_image(b"\x89PNG\r\n\x1a\n" + bytes(4) + b"IDAT" + bytes(8)) is None
    assert sniff_image(jpeg(640, 480)) is not None


def test_exactly_ten_megabytes_is_accepted() -> None:
    data = png(400, 400)
    data += bytes(10 * 1024 * 1024 - len(data))
    ImageGenerationRequest(prompt="p", image=data)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"watermark": 1}, "watermark"),
        ({"callback_url": "https:///x"}, "callback_url"),
        ({"element_ids": [-1]}, "element_ids[0]"),
        ({"element_ids": [True]}, "element_ids[0]"),
        ({"image": "aGVsbG8!"}, "image"),
    ],
)
def test_more_field_rules(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        read_image_files(ImageGenerationRequest(prompt="p", **fields))
    assert caught.value.field == field


def test_subject_images_must_be_a_list() -> None:
    with pytest.raises(ValidationError, match="list"):
        kling_async.MultiImageRequest(subject_images="a.png")


# --- downloads (dl02, dl07) ---------------------------------------------------------------------


async def test_a_failed_overwrite_keeps_the_old_file(
    client: kling_async.Client, server: FakeKlingServer, tmp_path: Path
) -> None:
    task_done = await (await client.images.generate(prompt="p"))
    [path] = await client.download(task_done, tmp_path)
    before = path.read_bytes()
    server.inject("garbage", route="download", http_status=404, times=None)
    with pytest.raises(NotFoundError):
        await client.download(task_done, tmp_path, overwrite=True)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


async def test_file_extension_follows_the_url(
    client: kling_async.Client, server: FakeKlingServer, tmp_path: Path
) -> None:
    task_done = await (await client.images.generate(prompt="p"))
    url = task_done.images[0].url
    renamed = [kling_async.ImageResult(index=0, url=url + "?as=photo.jpg")]
    assert (await client.download(renamed, tmp_path))[0].suffix == ".png"  # path, not query
    cdn = [kling_async.ImageResult(index=3, url=f"{server.origin}/results/x/3.jpeg")]
    with pytest.raises(NotFoundError):
        await client.download(cdn, tmp_path)
    assert not (tmp_path / "3.jpg").exists()


def test_retry_after_date_without_timezone_is_read_as_utc() -> None:
    from kling_async._wire import parse_retry_after

    now = datetime(2026, 12, 1, 12, 0, 0, tzinfo=timezone.utc)
    soon = now + timedelta(seconds=20)
    assert parse_retry_after(soon.strftime("%a, %d %b %Y %H:%M:%S"), now) == 20.0
