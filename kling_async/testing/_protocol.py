"""Kling's wire conventions as the fake server speaks them: codes, statuses, envelopes.

Kept apart from the SDK's own ``_wire`` on purpose: the fake is the other side of
the conversation, so a bug in the SDK's reading of the protocol must not be
mirrored here and go unnoticed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from typing import Final

# The paths the fake's own checks name; which endpoints it serves comes from
# the SDK's declarations (``_endpoints.endpoints()``), so no list is kept here.
GENERATIONS: Final = "images/generations"
MULTI_IMAGE: Final = "images/multi-image2image"
OMNI_IMAGE: Final = "images/omni-image"
EXPAND: Final = "images/editing/expand"
MULTI_SHOT: Final = "general/ai-multi-shot"
VIRTUAL_TRY_ON: Final = "images/kolors-virtual-try-on"

SUCCESS_MESSAGE: Final = "SUCCEED"

_STATUS_BY_CODE: Final = {
    0: 200,
    **dict.fromkeys(range(1000, 1005), 401),
    **dict.fromkeys((1100, 1101, 1102), 429),
    1103: 403,
    1200: 400,
    1201: 400,
    1202: 404,
    1203: 404,
    1300: 400,
    1301: 400,
    1302: 429,
    1303: 429,
    1304: 429,
    5000: 500,
    5001: 503,
    5002: 504,
}


def http_status_for(code: int) -> int:
    """The HTTP status Kling pairs with business ``code`` (its error table)."""
    status = _STATUS_BY_CODE.get(code)
    if status is not None:
        return status
    # Codes the table does not list: keep the family's class of failure.
    if code >= 5000:
        return 500
    if 1000 <= code < 1100:
        return 401
    return 400


def envelope(code: int, message: str, data_json: str = "null") -> bytes:
    """Encode ``{code, message, request_id, data}`` with ``data`` already serialised.

    Taking ``data`` pre-encoded lets list pages splice cached task JSON instead of
    re-encoding hundreds of task objects on every poll.
    """
    return (
        f'{{"code":{code},"message":{json.dumps(message)},'
        f'"request_id":"{uuid.uuid4()}","data":{data_json}}}'
    ).encode()


def webhook_signature(
    secrets: tuple[str, ...], message_id: str, timestamp: int, body: bytes
) -> str:
    """The ``webhook-signature`` header Kling sends under each webhook secret
    (``whsec_`` + base64 key): ``v1,<base64 HMAC-SHA256 of "id.timestamp.body">``,
    space-separated when there are several (a rotation)."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    signatures = []
    for secret in secrets:
        key = base64.b64decode(secret.removeprefix("whsec_"))
        digest = hmac.new(key, signed, hashlib.sha256).digest()
        signatures.append("v1," + base64.b64encode(digest).decode())
    return " ".join(signatures)
