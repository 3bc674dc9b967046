"""The options of FakeKlingServer, checked when it is built."""

from __future__ import annotations

import base64
import re

import attrs
import pytest

from kling_async.testing import CallbackFaults, FakeKlingServer, WireShapes
from kling_async.testing._options import ServerOptions
from kling_async.testing._tasks import default_outcome

from .helpers import SECRET, Json

WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"k" * 24).decode()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"access_key": "ak"}, "access_key and secret_key must be given together"),
        ({"secret_key": SECRET}, "access_key and secret_key must be given together"),
        ({"processing_delay": -0.01}, "processing_delay must not be negative"),
        ({"concurrency_limit": 0}, "concurrency_limit must be at least 1"),
        ({"path_prefix": "kling"}, "path_prefix must start with '/' and not end with one"),
        ({"path_prefix": "/kling/"}, "path_prefix must start with '/' and not end with one"),
        ({"webhook_secret": "whsec_"}, "'whsec_' followed by non-empty base64"),
        ({"webhook_secret": [WEBHOOK_SECRET, "whsec_n0t-base64!"]}, "non-empty base64"),
    ],
    ids=[
        "access-without-secret",
        "secret-without-access",
        "negative-delay",
        "zero-limit",
        "prefix-without-slash",
        "prefix-with-trailing-slash",
        "empty-webhook-secret",
        "bad-second-webhook-secret",
    ],
)
def test_invalid_options_are_refused_when_built(options: Json, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        FakeKlingServer(**options)
    assert "n0t-base64" not in str(caught.value)  # never the secret itself


def test_options_are_frozen_and_none_asks_for_the_default() -> None:
    options = ServerOptions(
        models=["kling-v3"],
        outcome=None,
        callback_faults=None,
        shapes=None,
        webhook_secrets=WEBHOOK_SECRET,
        path_prefix="/kling",
    )
    assert options.models == frozenset({"kling-v3"})
    assert options.outcome is default_outcome
    assert (options.callback_faults, options.shapes) == (CallbackFaults(), WireShapes())
    assert options.webhook_secrets == (WEBHOOK_SECRET,)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        options.port = 8080  # type: ignore[misc]
