"""Standard Webhooks signatures on Kling's callbacks.

With a webhook secret (``whsec_...``) on the account, Kling signs every callback
the Standard Webhooks way: headers ``webhook-id``, ``webhook-timestamp`` (Unix
seconds) and ``webhook-signature`` (``v1,<base64>``; several, space-separated,
while a secret is being rotated), the signature being HMAC-SHA256 over
``{webhook-id}.{webhook-timestamp}.{raw body}``. A delivery is genuine when any
``v1`` signature matches and its timestamp is within five minutes of now.

The HMAC is the reference implementation's (``standardwebhooks``, the
``webhooks`` extra). Its ``verify()`` is not used as a whole: it reads the clock
itself (no test could check the five-minute window without waiting, nor Kling's
published example, stamped months ago) and lets malformed headers escape as
``ValueError`` or ``binascii.Error``. So this module parses the headers, bounds
the skew by an injectable clock and compares signatures in constant time, and
remembers message ids to drop repeated deliveries.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import attrs

from ._exceptions import ConfigurationError

if TYPE_CHECKING:
    from standardwebhooks import Webhook


#: How far a delivery's timestamp may be from now, either way (Kling's docs: ±5 min).
TOLERANCE_SECONDS = 300
#: Message ids remembered at most; older ones have expired anyway (see remember()).
MAX_REMEMBERED = 100_000
# A Unix timestamp in seconds has 10 digits until the year 2286.
_MAX_TIMESTAMP_DIGITS = 12

MISSING_EXTRA = (
    "verifying Kling's webhook signatures needs the standardwebhooks package: "
    "pip install '.[webhooks]' in the kling-async checkout, or pip install standardwebhooks"
)


class SignatureError(Exception):
    """A delivery's signature headers are missing, malformed, stale or wrong.

    The message says which, and never holds the secret or a signature.
    """


@attrs.frozen
class Delivery:
    """A verified delivery: its ``webhook-id`` and timestamp (Unix seconds)."""

    message_id: str
    timestamp: int


class WebhookVerifier:
    """Checks the signatures of deliveries under one webhook secret."""

    def __init__(self, secret: str, clock: Callable[[], float]) -> None:
        try:
            from standardwebhooks import Webhook
        except ImportError:
            raise ConfigurationError(MISSING_EXTRA) from None
        if not secret.strip():
            raise ConfigurationError("the webhook secret is empty")
        try:
            self._webhook: Webhook = Webhook(secret.strip())
        except Exception:  # binascii.Error, the package's EmptyWebhookSecretError, ...
            # The message names the rule only: the secret stays out of it.
            raise ConfigurationError(
                "the webhook secret is not a Standard Webhooks secret: 'whsec_' followed by "
                "base64, as Kling's console shows it"
            ) from None
        self._clock = clock
        self._seen: OrderedDict[str, int] = OrderedDict()

    def __repr__(self) -> str:
        return "<WebhookVerifier>"

    def verify(self, body: bytes, headers: Mapping[str, str]) -> Delivery:
        """Check one delivery; raise :class:`SignatureError` unless it is genuine."""
        lowered = {name.lower(): value for name, value in headers.items()}
        message_id = lowered.get("webhook-id", "").strip()
        stamp = lowered.get("webhook-timestamp", "").strip()
        signatures = lowered.get("webhook-signature", "")
        if not (message_id and stamp and signatures.strip()):
            raise SignatureError(
                "the delivery is not signed (webhook-id, webhook-timestamp and "
                "webhook-signature headers are required when a webhook secret is set)"
            )
        if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= _MAX_TIMESTAMP_DIGITS):
            raise SignatureError("webhook-timestamp is not a Unix time in seconds")
        timestamp = int(stamp)
        if abs(self._clock() - timestamp) > TOLERANCE_SECONDS:
            raise SignatureError(
                "webhook-timestamp is more than 5 minutes from this machine's clock "
                "(a replayed delivery, or a clock out of sync)"
            )
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise SignatureError("the body is not UTF-8 text") from None
        signed = self._webhook.sign(
            message_id, datetime.fromtimestamp(timestamp, tz=timezone.utc), text
        )
        expected = base64.b64decode(signed.partition(",")[2])
        for candidate in signatures.split():
            version, _, encoded = candidate.partition(",")
            if version != "v1":
                continue  # a scheme this receiver does not know; another may match
            try:
                given = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                continue
            if hmac.compare_digest(expected, given):
                return Delivery(message_id, timestamp)
        raise SignatureError("no signature matches the webhook secret")

    def is_repeat(self, delivery: Delivery) -> bool:
        """Whether a delivery with this ``webhook-id`` was already processed."""
        return delivery.message_id in self._seen

    def remember(self, delivery: Delivery) -> None:
        """Note a processed delivery so that its repeats are dropped.

        An id is forgotten once its timestamp leaves the window: a repeat of it
        would then fail :meth:`verify` anyway, so memory stays bounded by the
        deliveries of about ten minutes.
        """
        self._seen[delivery.message_id] = delivery.timestamp
        self._seen.move_to_end(delivery.message_id)
        horizon = self._clock() - TOLERANCE_SECONDS
        while self._seen:
            oldest_id, oldest_stamp = next(iter(self._seen.items()))
            if oldest_stamp >= horizon and len(self._seen) <= MAX_REMEMBERED:
                break
            del self._seen[oldest_id]
