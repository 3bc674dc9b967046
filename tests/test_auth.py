"""Credentials: static tokens, JWT signing and re-signing, missing keys, no leaks."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import jwt
import pytest

import kling_async
from kling_async import (
    AuthenticationError,
    ConfigurationError,
    JWTCredentials,
    StaticToken,
)
from kling_async._auth import resolve_credentials
from kling_async.testing import FakeKlingServer
from tests.helpers import API_KEY, FAST_POLL, FAST_RETRY, Clock, TickingClock, make_client

ACCESS, SECRET = "ak-visible-id-123", "sk-very-secret-0123456789abcdefghijklmnop"


def claims(token: str, secret: str = SECRET) -> dict[str, object]:
    decoded: dict[str, object] = jwt.decode(
        token, secret, algorithms=["HS256"], options={"verify_exp": False, "verify_nbf": False}
    )
    return decoded


def test_jwt_claims_follow_kling() -> None:
    clock = Clock()
    credentials = JWTCredentials(ACCESS, SECRET, clock=clock)
    header = credentials.authorization()
    assert header.startswith("Bearer ")
    token = header.removeprefix("Bearer ")
    assert jwt.get_unverified_header(token) == {"alg": "HS256", "typ": "JWT"}
    assert claims(token) == {"iss": ACCESS, "exp": int(clock.now) + 1800, "nbf": int(clock.now) - 5}


def test_jwt_is_cached_then_renewed_before_expiry() -> None:
    clock = Clock()
    credentials = JWTCredentials(ACCESS, SECRET, clock=clock)
    first = credentials.authorization()
    clock.now += 1400  # still more than renew_before (300 s) from expiry
    assert credentials.authorization() == first
    clock.now += 150  # now within 300 s of expiry
    renewed = credentials.authorization()
    assert renewed != first
    assert claims(renewed.removeprefix("Bearer "))["exp"] == int(clock.now) + 1800


async def test_a_long_running_client_keeps_working_past_token_lifetime() -> None:
    clock = Clock()
    async with FakeKlingServer(access_key=ACCESS, secret_key=SECRET, clock=clock) as server:
        credentials = JWTCredentials(ACCESS, SECRET, clock=clock)
        async with make_client(server, api_key=None, credentials=credentials) as client:
            await client.images.generate(prompt="p")
            clock.now += 3600  # two token lifetimes later
            await client.images.generate(prompt="q")
    first, second = (r.authorization for r in server.requests_for("create"))
    assert first != second
    assert [r.code for r in server.requests_for("create")] == [0, 0]


async def test_official_key_pair_from_arguments_and_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with FakeKlingServer(access_key=ACCESS, secret_key=SECRET) as server:
        async with kling_async.Client(
            access_key=ACCESS, secret_key=SECRET, base_url=server.url, polling=FAST_POLL
        ) as client:
            assert (await (await client.images.generate(prompt="p"))).images
        monkeypatch.setenv("KLING_ACCESS_KEY", ACCESS)
        monkeypatch.setenv("KLING_SECRET_KEY", SECRET)
        async with kling_async.Client(base_url=server.url) as client:
            await client.images.generate(prompt="p")
    assert all(r.code == 0 for r in server.requests)


async def test_expired_token_is_resigned_once_then_succeeds() -> None:
    credentials = JWTCredentials(ACCESS, SECRET, clock=TickingClock(time.time()))
    async with (
        FakeKlingServer(access_key=ACCESS, secret_key=SECRET) as server,
        make_client(server, api_key=None, credentials=credentials) as c,
    ):
        server.inject("error", route="create", code=1004, times=1)
        handle = await c.images.generate(prompt="p")
    first, second = server.requests_for("create")
    assert (first.code, second.code) == (1004, 0)
    assert first.authorization != second.authorization  # a fresh signature
    assert len(server.tasks) == 1
    assert handle.task_id in server.tasks


async def test_clock_skew_fails_after_exactly_one_resign() -> None:
    skewed = Clock()
    async with FakeKlingServer(access_key=ACCESS, secret_key=SECRET, clock=skewed) as server:
        skewed.now = 4_000_000_000  # the server's clock is years ahead: every token expired
        async with make_client(server, api_key=None, access_key=ACCESS, secret_key=SECRET) as c:
            with pytest.raises(AuthenticationError) as caught:
                await c.images.generate(prompt="p")
    assert caught.value.code == 1004
    assert "clock" in str(caught.value)
    assert len(server.requests_for("create")) == 2


async def test_static_token_is_not_retried_on_auth_failure(server: FakeKlingServer) -> None:
    async with make_client(server, api_key="wrong") as client:
        with pytest.raises(AuthenticationError) as caught:
            await client.images.generate(prompt="p")
    assert caught.value.code == 1002
    assert len(server.requests) == 1


async def test_missing_credentials_are_reported_at_first_use_naming_the_env_vars(
    server: FakeKlingServer,
) -> None:
    client = kling_async.Client(base_url=server.url)  # building it is fine
    async with client:
        with pytest.raises(ConfigurationError) as caught:
            await client.images.generate(prompt="p")
    for name in ("KLING_API_KEY", "KLING_ACCESS_KEY", "KLING_SECRET_KEY"):
        assert name in str(caught.value)
    assert server.requests == []


def test_inconsistent_credentials_are_refused_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigurationError):
        kling_async.Client("k", access_key=ACCESS, secret_key=SECRET)
    with pytest.raises(ConfigurationError):
        kling_async.Client(access_key=ACCESS)
    with pytest.raises(ConfigurationError):
        kling_async.Client("k", credentials=StaticToken("t"))
    monkeypatch.setenv("KLING_ACCESS_KEY", ACCESS)
    with pytest.raises(ConfigurationError, match="KLING_SECRET_KEY"):
        kling_async.Client()


def test_precedence_arguments_then_token_then_key_pair() -> None:
    env = {"KLING_API_KEY": "from-env", "KLING_ACCESS_KEY": "a", "KLING_SECRET_KEY": "s"}
    assert resolve_credentials("explicit", None, None, env) == StaticToken("explicit")
    assert resolve_credentials(None, None, None, env) == StaticToken("from-env")
    pair = resolve_credentials(None, None, None, {"KLING_ACCESS_KEY": "a", "KLING_SECRET_KEY": "s"})
    assert isinstance(pair, JWTCredentials)
    assert pair.access_key == "a"
    assert resolve_credentials(None, None, None, {}) is None


async def test_secrets_never_appear_in_reprs_errors_logs_or_the_journal(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG)
    journal = tmp_path / "journal.db"
    async with FakeKlingServer(access_key=ACCESS, secret_key=SECRET) as server:
        credentials = JWTCredentials(ACCESS, SECRET)
        token = credentials.authorization().removeprefix("Bearer ")
        async with kling_async.Client(
            access_key=ACCESS,
            secret_key=SECRET,
            base_url=server.url,
            retry=FAST_RETRY,
            journal=journal,
        ) as client:
            server.inject("error", route="create", code=5000, times=1)
            handle = await client.images.generate(prompt="p")
            task = await handle.refresh()
            server.inject("error", route="create", code=1201, times=1)
            with pytest.raises(kling_async.APIError) as caught:
                await client.images.generate(prompt="q")
            texts = [repr(client), repr(handle), repr(task), repr(credentials)]
            texts += [str(caught.value), repr(caught.value), caught.value.message]
            used_tokens = {(r.authorization or "").removeprefix("Bearer ") for r in server.requests}
    texts += [record.getMessage() for record in caplog.records]
    texts.append(repr(StaticToken(API_KEY)))
    journal_bytes = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert handle.task_id.encode() in journal_bytes  # the journal was written and is read whole
    texts.append(journal_bytes.decode("latin-1"))
    secrets = [SECRET, ACCESS, API_KEY, token, *used_tokens]
    for text in texts:
        for secret in secrets:
            assert secret not in text, f"{secret[:6]}… leaked in {text[:80]!r}"
    assert any("retrying" in record.getMessage() for record in caplog.records)


async def test_transport_errors_carry_no_aiohttp_exception_with_the_request_headers() -> None:
    # aiohttp's exceptions keep the request (Authorization header included);
    # a TransportError must not hold one as its cause or context.
    async with FakeKlingServer(api_key=API_KEY) as server:
        server.inject("drop", route="get", times=None)
        no_retry = kling_async.RetryPolicy(max_attempts=1)
        async with kling_async.Client(API_KEY, base_url=server.url, retry=no_retry) as client:
            with pytest.raises(kling_async.TransportError) as dropped:
                await client.images.get("some-task")
        url = server.url
    async with kling_async.Client(API_KEY, base_url=url, retry=no_retry) as client:
        with pytest.raises(kling_async.TransportError) as refused:
            await client.images.get("some-task")  # the server is gone: connection refused
    for caught in (dropped, refused):
        assert caught.value.__cause__ is None
        assert caught.value.__context__ is None


# --- re-signing (mutation tests exc25, aut08) -----------------------------------------------------


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
