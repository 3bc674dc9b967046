"""Retries, idempotent creates and failure typing, driven by the fake server's faults."""

from __future__ import annotations

import json
import random
import socket
import time

import pytest

import kling_async
from kling_async import (
    APIError,
    ConcurrencyLimitError,
    ContentPolicyError,
    InvalidRequestError,
    PermissionDeniedError,
    QuotaExceededError,
    RateLimitError,
    RetryPolicy,
    ServerError,
    TaskStatus,
    TransportError,
)
from kling_async.testing import FakeKlingServer, FaultKind, RateLimit
from tests.helpers import API_KEY, make_client

# --- retried ---------------------------------------------------------------------


@pytest.mark.parametrize("code", [1302, 5000, 5001, 5002])
async def test_retryable_codes_are_retried(
    code: int, client: kling_async.Client, server: FakeKlingServer
) -> None:
    server.inject("error", route="create", code=code, times=2)
    handle = await client.images.generate(prompt="p")
    assert (await handle).status is TaskStatus.SUCCEED
    creates = server.requests_for("create")
    assert [request.code for request in creates] == [code, code, 0]
    assert len(server.tasks) == 1


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_gateway_errors_without_a_kling_body_are_retried(
    status: int, client: kling_async.Client, server: FakeKlingServer
) -> None:
    server.inject("garbage", route="get", http_status=status, times=1)
    task = await client.images.get((await client.images.generate(prompt="p")).task_id)
    assert task.task_id in server.tasks
    assert [r.http_status for r in server.requests_for("get")] == [status, 200]


async def test_retries_give_up_after_max_attempts_with_the_last_error(
    server: FakeKlingServer,
) -> None:
    server.inject("error", route="get", code=5001, times=None)
    policy = RetryPolicy(max_attempts=3, initial_delay=0.01, max_delay=0.02)
    async with make_client(server, retry=policy) as client:
        with pytest.raises(ServerError) as caught:
            await client.images.get("anything")
    assert caught.value.code == 5001
    assert caught.value.http_status == 503
    assert caught.value.request_id
    assert len(server.requests_for("get")) == 3


async def test_retries_give_up_after_max_elapsed(server: FakeKlingServer) -> None:
    server.inject("error", route="get", code=5000, times=None)
    policy = RetryPolicy(max_attempts=1000, initial_delay=0.05, max_delay=0.05, max_elapsed=0.3)
    async with make_client(server, retry=policy) as client:
        started = time.monotonic()
        with pytest.raises(ServerError):
            await client.images.get("anything")
    assert time.monotonic() - started < 2
    assert 2 <= len(server.requests_for("get")) < 20


async def test_retry_after_is_honoured(server: FakeKlingServer) -> None:
    server.inject("error", route="create", code=1302, retry_after=0.4, times=1)
    async with make_client(server) as client:
        await client.images.generate(prompt="p")
    first, second = server.requests_for("create")
    assert first.code == 1302
    assert second.code == 0
    # The policy alone would wait at most 0.05 s here.
    assert second.arrived_at - first.arrived_at >= 0.39


async def test_rate_limit_from_the_server_bucket_is_ridden_out() -> None:
    async with (
        FakeKlingServer(api_key=API_KEY, rate_limit=RateLimit(3, 0.5, 0.2)) as server,
        make_client(server, retry=RetryPolicy(max_attempts=10, initial_delay=0.01)) as client,
    ):
        handles = [await client.images.generate(prompt=f"p{i}") for i in range(6)]
    assert len({handle.task_id for handle in handles}) == 6
    codes = [r.code for r in server.requests_for("create")]
    assert 1302 in codes
    assert codes.count(0) == 6


# --- not retried ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (1000, kling_async.AuthenticationError),
        (1100, QuotaExceededError),
        (1101, QuotaExceededError),
        (1102, QuotaExceededError),
        (1103, PermissionDeniedError),
        (1200, InvalidRequestError),
        (1201, InvalidRequestError),
        (1300, ContentPolicyError),
        (1301, ContentPolicyError),
        (1303, ConcurrencyLimitError),
        (1304, PermissionDeniedError),
    ],
)
async def test_final_codes_are_not_retried(
    code: int, cls: type[APIError], client: kling_async.Client, server: FakeKlingServer
) -> None:
    server.inject("error", route="create", code=code, message="nope", times=None)
    with pytest.raises(cls) as caught:
        await client.images.generate(prompt="p")
    assert caught.value.code == code
    assert caught.value.message == "nope"
    assert caught.value.request_id
    assert len(server.requests_for("create")) == 1
    assert server.tasks == {}


async def test_a_plain_http_500_is_not_retried(
    client: kling_async.Client, server: FakeKlingServer
) -> None:
    server.inject("garbage", route="get", http_status=500, body=b"<h1>oops</h1>", times=1)
    with pytest.raises(ServerError) as caught:
        await client.images.get("x")
    assert caught.value.code is None
    assert "<h1>oops</h1>" in str(caught.value)
    assert len(server.requests_for("get")) == 1


async def test_a_duplicate_external_task_id_returns_the_task_it_names(
    client: kling_async.Client, server: FakeKlingServer
) -> None:
    # "external_task_id already exists" is Kling saying it has the task: the id
    # is an idempotency key, so the create is looked up, never believed refused
    # (issue 24: it may be our own create that landed before a crash).
    async with make_client(server) as other:
        first = await other.images.generate(prompt="p", external_task_id="dup")
    again = await client.images.generate(prompt="p", external_task_id="dup")
    assert again.task_id == first.task_id
    assert [r.code for r in server.requests_for("create")] == [0, 1201]
    assert len(server.tasks) == 1


# --- creates are never doubled ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["drop_after", "error_after"])
async def test_ambiguous_create_failure_finds_the_task_instead_of_recreating(
    kind: FaultKind, client: kling_async.Client, server: FakeKlingServer
) -> None:
    server.inject(kind, route="create", code=5000, times=1)
    handle = await client.images.generate(prompt="p")
    assert len(server.tasks) == 1
    assert handle.task_id in server.tasks
    creates = server.requests_for("create")
    assert len(creates) == 1
    lookups = server.requests_for("get")
    assert [r.path.rsplit("/", 1)[-1] for r in lookups] == [handle.external_task_id]
    assert (await handle).status is TaskStatus.SUCCEED


async def test_create_lost_before_the_server_acted_is_sent_again(
    client: kling_async.Client, server: FakeKlingServer
) -> None:
    server.inject("drop", route="create", times=1)
    handle = await client.images.generate(prompt="p")
    assert len(server.tasks) == 1
    creates = server.requests_for("create")
    assert len(creates) == 2
    assert creates[0].external_task_id == creates[1].external_task_id == handle.external_task_id
    # The lookup in between found nothing, so the second create was safe.
    assert [r.code for r in server.requests_for("get")] == [1203]


async def test_slow_create_that_times_out_is_not_duplicated(server: FakeKlingServer) -> None:
    server.inject("delay", route="create", delay=0.5, times=1)
    async with make_client(server, timeout=0.2) as client:
        handle = await client.images.generate(prompt="p")
    assert len(server.tasks) == 1
    assert handle.task_id in server.tasks


async def test_lookup_failures_are_retried_too(
    client: kling_async.Client, server: FakeKlingServer
) -> None:
    server.inject("error_after", route="create", code=5002, times=1)
    server.inject("error", route="get", code=5000, times=1)
    handle = await client.images.generate(prompt="p")
    assert len(server.tasks) == 1
    assert handle.task_id in server.tasks


async def test_repeated_ambiguity_still_creates_once(server: FakeKlingServer) -> None:
    server.inject("drop_after", route="create", times=None, probability=0.5)
    async with make_client(
        server, retry=RetryPolicy(max_attempts=8, initial_delay=0.01, max_delay=0.02)
    ) as client:
        handles = [await client.images.generate(prompt=f"p{i}") for i in range(10)]
    assert len(server.tasks) == 10
    assert {h.task_id for h in handles} == set(server.tasks)


# --- transport failures ------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_connection_refused_is_a_transport_error_after_retries() -> None:
    client = kling_async.Client(
        API_KEY,
        base_url=f"http://127.0.0.1:{_closed_port()}",
        retry=RetryPolicy(max_attempts=2, initial_delay=0.01),
    )
    async with client:
        with pytest.raises(TransportError) as caught:
            await client.images.generate(prompt="p")
    assert not caught.value.may_have_reached_server
    assert "cannot connect" in str(caught.value)


async def test_slow_responses_time_out(server: FakeKlingServer) -> None:
    server.inject("delay", route="get", delay=1.0, times=None)
    async with make_client(
        server, timeout=0.1, retry=RetryPolicy(max_attempts=2, initial_delay=0.01)
    ) as client:
        started = time.monotonic()
        with pytest.raises(TransportError, match="no answer"):
            await client.images.get("x")
    assert time.monotonic() - started < 0.9


async def test_dropped_polls_are_retried(
    client: kling_async.Client, server: FakeKlingServer
) -> None:
    handle = await client.images.generate(prompt="p")
    server.inject("drop", route="get", times=3)
    assert (await handle).status is TaskStatus.SUCCEED


async def test_transient_poll_failures_do_not_end_the_wait(server: FakeKlingServer) -> None:
    async with make_client(server, retry=RetryPolicy(max_attempts=1, initial_delay=0.01)) as client:
        handle = await client.images.generate(prompt="p")
        server.inject("error", route="get", code=5000, times=3)
        assert (await handle).status is TaskStatus.SUCCEED
    assert [r.code for r in server.requests_for("get")][:3] == [5000, 5000, 5000]


async def test_unknown_fields_and_statuses_from_the_server_are_tolerated(
    client: kling_async.Client, server: FakeKlingServer
) -> None:
    handle = await client.images.generate(prompt="p")
    odd = {
        "code": 0,
        "message": "SUCCEED",
        "request_id": "r",
        "data": {
            "task_id": handle.task_id,
            "task_status": "moderating",
            "task_status_msg": "",
            "created_at": 1,
            "updated_at": 2**41,
            "task_info": {"external_task_id": handle.external_task_id, "trace": "x"},
            "task_result": {"images": [], "videos": [{"id": 1}]},
            "brand_new_field": {"a": [1, 2]},
        },
        "debug": True,
    }
    server.inject("garbage", route="get", http_status=200, body=json.dumps(odd).encode())
    task = await handle.refresh()
    assert task.status == "moderating"
    assert not task.is_terminal
    assert task.raw["brand_new_field"] == {"a": [1, 2]}
    assert not handle.done()


async def test_base_url_with_a_gateway_prefix_and_trailing_v1() -> None:
    async with FakeKlingServer(api_key=API_KEY, path_prefix="/kling") as server:
        for base_url in (server.url, server.url + "/", server.url + "/v1"):
            async with make_client(server, base_url=base_url) as client:
                assert (await (await client.images.generate(prompt="p"))).images
        assert all(r.path.startswith("/kling/v1/") for r in server.requests)


async def test_base_url_from_the_environment(
    server: FakeKlingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KLING_BASE_URL", server.url)
    monkeypatch.setenv("KLING_API_KEY", API_KEY)
    async with kling_async.Client() as client:
        assert client.base_url == server.url
        await client.images.generate(prompt="p")
    assert server.requests_for("create")[0].authorization == f"Bearer {API_KEY}"


async def test_rate_limit_error_is_raised_when_retries_run_out(server: FakeKlingServer) -> None:
    server.inject("error", route="create", code=1302, times=None)
    async with make_client(server, retry=RetryPolicy(max_attempts=2, initial_delay=0.01)) as c:
        with pytest.raises(RateLimitError):
            await c.images.generate(prompt="p")
    assert len(server.requests_for("create")) == 2


# --- idempotent creates, bodiless and oversized answers, retry waits (trn02, trn04, exc) -------


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
