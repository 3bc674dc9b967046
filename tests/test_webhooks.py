"""Webhook signatures (#16): Standard Webhooks, as Kling signs callbacks when the
account has a webhook secret. Signatures here are made with hmac/hashlib, apart
from the SDK's code, from the rule Kling's callback page states."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import sys
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from kling_async import CallbackReceiver, ConfigurationError, Task, TaskStatus

SECRET = "callback-secret-0123456789abcdef"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"webhook-key-0123456789abcdefghij").decode()
NOW = 1_781_080_794  # Unix seconds; the receivers here read this clock

# Kling's callback page gives this example to check an implementation against.
DOC_SECRET = "whsec_dGVzdHNlY3JldHRlc3RzZWNyZXR0ZXN0c2VjcmV0MTI="
DOC_ID = "9876543210"
DOC_TIMESTAMP = "1781080794"
DOC_BODY = (
    b'{"id":"1234567890","status":"succeeded","message":"",'
    b'"create_time":1781080778802,"update_time":1781080794151}'
)
DOC_SIGNATURE = "v1,UsKlJP00XoQyOn410NM9xv34sP+Gl0jnOO9Lcpr7NJ4="


def sign(body: bytes, *, message_id: str = "msg-1", timestamp: int = NOW,
         secret: str = WEBHOOK_SECRET) -> str:  # fmt: skip
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(digest.digest()).decode()


def headers(body: bytes, *, message_id: str = "msg-1", timestamp: int = NOW,
            signature: str | None = None) -> dict[str, str]:  # fmt: skip
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature or sign(body, message_id=message_id, timestamp=timestamp),
    }


def body_for(external_task_id: str, *, status: str = "processing", task_id: str = "t-1") -> bytes:
    return json.dumps(
        {
            "task_id": task_id,
            "task_status": status,
            "task_info": {"external_task_id": external_task_id},
            "updated_at": NOW * 1000,
        }
    ).encode()


def make_receiver(**options: Any) -> CallbackReceiver:
    settings: dict[str, Any] = {
        "public_url": "http://h/cb",
        "secret": SECRET,
        "webhook_secret": WEBHOOK_SECRET,
        "clock": lambda: NOW,
    }
    settings.update(options)
    return CallbackReceiver(**settings)


def path_of(receiver: CallbackReceiver, external_task_id: str) -> str:
    return receiver.url_for(external_task_id).removeprefix("http://h")


def hook(receiver: CallbackReceiver) -> list[Task]:
    seen: list[Task] = []
    receiver.on_update(seen.append)
    return seen


async def handle(
    receiver: CallbackReceiver, external_task_id: str, body: bytes, sent: Mapping[str, str]
) -> tuple[int, str]:
    status, reply = await receiver.handle(path_of(receiver, external_task_id), body, sent)
    return status, json.loads(reply)["message"]


# --- the signature --------------------------------------------------------------------------


async def test_klings_published_example_verifies() -> None:
    receiver = make_receiver(
        webhook_secret=DOC_SECRET, clock=lambda: int(DOC_TIMESTAMP), confirm=False
    )
    seen = hook(receiver)
    sent = {"webhook-id": DOC_ID, "webhook-timestamp": DOC_TIMESTAMP,
            "webhook-signature": DOC_SIGNATURE}  # fmt: skip
    assert await handle(receiver, "doc", DOC_BODY, sent) == (200, "accepted")
    assert [(t.task_id, t.status) for t in seen] == [("1234567890", TaskStatus.SUCCEED)]
    # Any change to what was signed breaks it.
    for changed_body, changed in [
        (DOC_BODY.replace(b"1234567890", b"1234567891"), sent),
        (DOC_BODY, {**sent, "webhook-id": "9876543211"}),
        (DOC_BODY, {**sent, "webhook-timestamp": str(int(DOC_TIMESTAMP) + 1)}),
        (DOC_BODY + b" ", sent),
    ]:
        status, message = await handle(receiver, "doc2", changed_body, changed)
        assert (status, message) == (401, "signature verification failed: no signature "
                                     "matches the webhook secret")  # fmt: skip
    assert len(seen) == 1


async def test_during_a_rotation_any_one_of_several_signatures_will_do() -> None:
    receiver = make_receiver()
    body = body_for("x")
    old_secret = "whsec_" + base64.b64encode(b"an old key, rotated out 0123").decode()
    cases = [
        ("{old} {good}", 200),
        ("{good} {old}", 200),
        ("v2,{good_b64} {good}", 200),  # an unknown version is skipped, not fatal
        ("  {good}  ", 200),
        ("{old}", 401),
        ("v2,{good_b64}", 401),
        ("v1,not-base64!!", 401),
        ("v1", 401),
        ("{good_b64}", 401),  # no version
        ("v1," + base64.b64encode(b"x" * 32).decode(), 401),
    ]
    for number, (template, expected) in enumerate(cases):
        message_id = f"m-{number}"
        good = sign(body, message_id=message_id)
        signature = template.format(
            good=good,
            good_b64=good.removeprefix("v1,"),
            old=sign(body, message_id=message_id, secret=old_secret),
        )
        sent = headers(body, message_id=message_id, signature=signature)
        status, message = await handle(receiver, "x", body, sent)
        assert status == expected, template
        assert ("no signature matches" in message) is (expected == 401)


async def test_the_five_minute_window() -> None:
    receiver = make_receiver()
    body = body_for("x")
    for offset, expected in [(-301, 401), (-300, 200), (0, 200), (300, 200), (301, 401)]:
        sent = headers(body, message_id=f"m{offset}", timestamp=NOW + offset)
        status, message = await handle(receiver, "x", body, sent)
        assert status == expected, offset
        if status == 401:
            assert "5 minutes" in message


@pytest.mark.parametrize(
    "change",
    [
        {"webhook-id": ""},
        {"webhook-timestamp": ""},
        {"webhook-signature": ""},
        {"webhook-timestamp": "1781080794.5"},
        {"webhook-timestamp": "-1781080794"},
        {"webhook-timestamp": "9" * 5000},
        {"webhook-timestamp": "soon"},
    ],
)
async def test_missing_or_malformed_headers_are_401(change: dict[str, str]) -> None:
    receiver = make_receiver()
    seen = hook(receiver)
    body = body_for("x")
    sent = {**headers(body), **change}
    sent = {name: value for name, value in sent.items() if value}
    assert (await handle(receiver, "x", body, sent))[0] == 401
    assert seen == []


async def test_an_unsigned_delivery_is_401_once_a_secret_is_set() -> None:
    receiver = make_receiver()
    assert receiver.verifies_signatures
    assert (await receiver.handle(path_of(receiver, "x"), body_for("x")))[0] == 401
    assert not make_receiver(webhook_secret=None).verifies_signatures


async def test_header_names_in_any_case() -> None:
    receiver = make_receiver()
    body = body_for("x")
    sent = {name.title(): value for name, value in headers(body).items()}
    assert "Webhook-Signature" in sent
    assert (await handle(receiver, "x", body, sent))[0] == 200


async def test_a_non_utf8_body_is_401_not_a_crash() -> None:
    receiver = make_receiver()
    body = b"\xff\xfe" + body_for("x")
    assert (await handle(receiver, "x", body, headers(body)))[0] == 401


async def test_the_url_token_is_still_required() -> None:
    receiver = make_receiver()
    seen = hook(receiver)
    body = body_for("x")
    wrong = path_of(receiver, "x")[:-1] + "0"
    status, _ = await receiver.handle(wrong, body, headers(body))
    assert status == 404
    assert seen == []


async def test_signatures_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    compare_digest = hmac.compare_digest

    def watched(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return compare_digest(a, b)

    receiver = make_receiver()
    body = body_for("x")
    monkeypatch.setattr(hmac, "compare_digest", watched)
    assert (await handle(receiver, "x", body, headers(body)))[0] == 200
    signature_comparisons = [pair for pair in compared if len(pair[0]) == 32]
    assert len(signature_comparisons) == 1


# --- repeated deliveries --------------------------------------------------------------------


async def test_a_repeated_webhook_id_is_acknowledged_and_dropped() -> None:
    receiver = make_receiver()
    seen = hook(receiver)
    first = body_for("x", status="processing")
    assert await handle(receiver, "x", first, headers(first)) == (200, "accepted")
    assert await handle(receiver, "x", first, headers(first)) == (
        200,
        "duplicate delivery ignored",
    )
    # Even a different body under the same id: a message id names one message.
    other = body_for("x", status="failed")
    assert await handle(receiver, "x", other, headers(other)) == (
        200,
        "duplicate delivery ignored",
    )
    assert [task.status for task in seen] == [TaskStatus.PROCESSING]


async def test_a_delivery_that_was_not_processed_is_not_remembered() -> None:
    receiver = make_receiver()  # confirm on, no client attached: a terminal one is 503
    body = body_for("x", status="succeed")
    assert (await handle(receiver, "x", body, headers(body)))[0] == 503
    assert (await handle(receiver, "x", body, headers(body)))[0] == 503  # not a "duplicate"


async def test_remembered_ids_are_forgotten_once_their_window_has_passed() -> None:
    now = [float(NOW)]
    receiver = make_receiver(clock=lambda: now[0])
    body = body_for("x")
    assert (await handle(receiver, "x", body, headers(body)))[0] == 200
    verifier = receiver._webhooks
    assert verifier is not None
    assert len(verifier._seen) == 1
    now[0] += 400  # the first delivery's replay would now fail on its timestamp anyway
    later = body_for("y")
    sent = headers(later, message_id="msg-2", timestamp=int(now[0]))
    assert (await handle(receiver, "y", later, sent))[0] == 200
    assert list(verifier._seen) == ["msg-2"]
    assert (await handle(receiver, "x", body, headers(body)))[0] == 401  # stale, not replayed


# --- configuration ------------------------------------------------------------------------


async def test_the_secret_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KLING_WEBHOOK_SECRET", WEBHOOK_SECRET)
    receiver = CallbackReceiver("http://h/cb", secret=SECRET, clock=lambda: NOW)
    assert receiver.verifies_signatures
    body = body_for("x")
    assert (await handle(receiver, "x", body, headers(body)))[0] == 200
    assert (await handle(receiver, "x", body, {}))[0] == 401
    monkeypatch.setenv("KLING_WEBHOOK_SECRET", "")
    assert not CallbackReceiver("http://h/cb", secret=SECRET).verifies_signatures


def test_a_missing_extra_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "standardwebhooks", None)  # import now fails
    with pytest.raises(ConfigurationError, match=r"pip install '\.\[webhooks\]'"):
        CallbackReceiver("http://h/cb", secret=SECRET, webhook_secret=WEBHOOK_SECRET)
    monkeypatch.setenv("KLING_WEBHOOK_SECRET", WEBHOOK_SECRET)
    with pytest.raises(ConfigurationError, match="standardwebhooks"):
        CallbackReceiver("http://h/cb", secret=SECRET)
    monkeypatch.delenv("KLING_WEBHOOK_SECRET")
    assert not CallbackReceiver("http://h/cb", secret=SECRET).verifies_signatures


@pytest.mark.parametrize("secret", ["", "   ", "whsec_", "whsec_!!!!"])
def test_an_unusable_secret_is_a_configuration_error(secret: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        CallbackReceiver("http://h/cb", secret=SECRET, webhook_secret=secret)
    if secret == "whsec_!!!!":
        assert secret not in str(caught.value)


async def test_webhook_secrets_and_signatures_stay_out_of_reprs_and_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver = make_receiver()
    key = WEBHOOK_SECRET.removeprefix("whsec_")
    assert key not in repr(receiver)
    assert key not in repr(receiver._webhooks)
    body = body_for("x")
    wrong = sign(body, secret=WEBHOOK_SECRET[:-4] + "AAA=")
    with caplog.at_level(logging.DEBUG, logger="kling_async"):
        status, message = await handle(receiver, "x", body, headers(body, signature=wrong))
    assert status == 401
    assert "callback refused" in caplog.text
    for secret_text in (key, wrong, sign(body)):
        assert secret_text not in caplog.text
        assert secret_text not in message


# --- the adapters pass the headers ----------------------------------------------------------


@pytest.fixture
async def served() -> AsyncIterator[tuple[CallbackReceiver, list[Task]]]:
    receiver = make_receiver(public_url=None)
    seen = hook(receiver)
    async with receiver.serve():
        yield receiver, seen
    await receiver.close()


async def post(url: str, body: bytes, sent: Mapping[str, str]) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers=dict(sent)) as response,
    ):
        return response.status


async def test_serve_and_the_aiohttp_sub_app_pass_the_headers(
    served: tuple[CallbackReceiver, list[Task]],
) -> None:
    receiver, seen = served
    body = body_for("x")
    assert await post(receiver.url_for("x"), body, {}) == 401
    assert await post(receiver.url_for("x"), body, headers(body)) == 200
    app = web.Application()
    app.add_subapp("/hooks", receiver.aiohttp_app())
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        base = f"http://127.0.0.1:{runner.addresses[0][1]}/hooks"
        url = f"{base}/y/{receiver.token_for('y')}"
        other = body_for("y")
        assert await post(url, other, headers(other, message_id="m-y")) == 200
        assert await post(url, other, {**headers(other, message_id="m-z"), "webhook-id": "z"}) == (
            401
        )
    finally:
        await runner.cleanup()
    assert [task.external_task_id for task in seen] == ["x", "y"]


async def test_the_asgi_app_passes_the_headers() -> None:
    receiver = make_receiver()
    seen = hook(receiver)
    body = body_for("x")

    async def call(sent: Mapping[str, str]) -> int:
        messages: list[Any] = []

        async def receive() -> Any:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: Any) -> None:
            messages.append(message)

        raw_path = path_of(receiver, "x").encode()
        scope = {
            "type": "http",
            "method": "POST",
            "path": raw_path.decode(),
            "raw_path": raw_path,
            "headers": [(k.lower().encode(), v.encode()) for k, v in sent.items()],
        }
        await receiver.asgi(scope, receive, send)
        status: int = messages[0]["status"]
        return status

    assert await call({}) == 401
    assert await call(headers(body)) == 200
    assert await call(headers(body)) == 200  # acknowledged as a duplicate
    assert [task.status for task in seen] == [TaskStatus.PROCESSING]
