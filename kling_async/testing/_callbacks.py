"""Delivery of task callbacks, with the misbehaviour Kling's docs warn receivers about."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import secrets
import time
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

import aiohttp
import attrs

from ._options import CallbackFaults, CallbackFormat, CallbackRecord
from ._protocol import webhook_signature
from ._tasks import FakeTask

_TIMEOUT = aiohttp.ClientTimeout(total=5.0)
_HEADERS = {"Content-Type": "application/json"}


def is_loopback_url(url: str) -> bool:
    """Whether ``url`` names this machine by a loopback address or ``localhost``.

    Decided from the text alone, with no DNS lookup, so a test can never make
    the fake reach out to another machine.
    """
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return False
    if host is None:
        return False
    if host in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@attrs.frozen
class _Update:
    task_id: str
    status: str
    url: str
    payload: bytes
    updated_at: int
    # One id per update, kept by its repeats (a duplicate is the same message).
    message_id: str = attrs.field(factory=lambda: "msg_" + secrets.token_hex(12))


#: Headers to add to a delivery: called with the message id and the body.
Signer = Callable[[str, bytes], Mapping[str, str]]


def callback_body(task: FakeTask, style: CallbackFormat) -> bytes:
    """The body a callback of ``task`` carries in format ``style`` (see :class:`WireShapes`)."""
    if style == "legacy":
        return task.to_json().encode()
    if style == "new_design":
        data = task.to_new_design()
    else:
        data = task.to_data()
        del data["task_info"]
    return json.dumps(data, separators=(",", ":")).encode()


def webhook_signer(secrets_: tuple[str, ...], clock: Callable[[], float]) -> Signer:
    """Standard Webhooks headers under ``secrets_``, timestamped by ``clock`` (Unix
    seconds), as Kling signs callbacks for an account with a webhook secret."""

    def sign(message_id: str, body: bytes) -> dict[str, str]:
        timestamp = int(clock())
        return {
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": webhook_signature(secrets_, message_id, timestamp, body),
        }

    return sign


class CallbackDispatcher:
    """Posts task updates to their ``callback_url``: one shared session, each
    task's updates in order, failures recorded and never raised."""

    def __init__(
        self,
        faults: CallbackFaults,
        rng: random.Random,
        records: list[CallbackRecord],
        *,
        encode: Callable[[FakeTask], bytes] | None = None,
        signer: Signer | None = None,
    ) -> None:
        self._faults = faults
        self._encode = encode or (lambda task: task.to_json().encode())
        self._signer = signer
        self._rng = rng
        #: Every delivery attempt, in attempt order.
        self.records = records
        self._session: aiohttp.ClientSession | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        # Last delivery of each task still under way: the next one waits for it,
        # so a task's updates leave in the order they happened.
        self._tails: dict[str, asyncio.Task[None]] = {}
        self._held: dict[str, _Update] = {}
        self._closed = False

    def _roll(self, probability: float) -> bool:
        return probability > 0 and self._rng.random() < probability

    def notify(self, task: FakeTask) -> None:
        """Queue the delivery of ``task``'s current state, if it has a callback URL."""
        if task.callback_url is None or self._closed:
            return
        update = _Update(
            task.task_id,
            task.status,
            task.callback_url,
            self._encode(task),
            task.updated_at_ms,
        )
        held = self._held.pop(task.task_id, None)
        outgoing: list[_Update] = []
        if self._roll(self._faults.drop):
            self._record(update, delivered=False, error="dropped (simulated callback fault)")
        elif not task.is_terminal and held is None and self._roll(self._faults.reorder):
            self._held[task.task_id] = update
        else:
            outgoing.append(update)
            if self._roll(self._faults.duplicate):
                outgoing.append(update)
        if held is not None:
            outgoing.append(held)
        if not outgoing:
            return
        delay = self._rng.uniform(0, self._faults.delay) if self._faults.delay > 0 else 0.0
        previous = self._tails.get(task.task_id)
        delivery = asyncio.get_running_loop().create_task(
            self._deliver(task.task_id, outgoing, delay, previous)
        )
        self._tails[task.task_id] = delivery
        self._inflight.add(delivery)
        delivery.add_done_callback(self._inflight.discard)

    async def _deliver(
        self,
        task_id: str,
        updates: list[_Update],
        delay: float,
        previous: asyncio.Task[None] | None,
    ) -> None:
        try:
            if previous is not None and not previous.done():
                await asyncio.wait((previous,))
            if delay:
                await asyncio.sleep(delay)
            for update in updates:
                await self._post(update)
        finally:
            if self._tails.get(task_id) is asyncio.current_task():
                del self._tails[task_id]

    async def _post(self, update: _Update) -> None:
        if not is_loopback_url(update.url):
            self._record(
                update,
                delivered=False,
                error="refused: the fake server only delivers callbacks to loopback hosts",
            )
            return
        if self._session is None:
            # trust_env=False: no proxy from the environment may carry a callback
            # off this machine.
            self._session = aiohttp.ClientSession(timeout=_TIMEOUT, trust_env=False)
        attempted_at = time.monotonic()
        headers = _HEADERS
        if self._signer is not None:
            headers = {**_HEADERS, **self._signer(update.message_id, update.payload)}
        try:
            async with self._session.post(
                update.url, data=update.payload, headers=headers
            ) as response:
                await response.read()
                status = response.status
        except Exception as error:  # a delivery failure is data for the test, never a crash
            self._record(
                update,
                delivered=False,
                error=f"{type(error).__name__}: {error}",
                attempted_at=attempted_at,
            )
            return
        ok = 200 <= status < 300
        self._record(
            update,
            delivered=ok,
            http_status=status,
            error=None if ok else f"receiver answered HTTP {status}",
            attempted_at=attempted_at,
        )

    def _record(
        self,
        update: _Update,
        *,
        delivered: bool,
        error: str | None,
        http_status: int | None = None,
        attempted_at: float | None = None,
    ) -> None:
        self.records.append(
            CallbackRecord(
                task_id=update.task_id,
                status=update.status,
                url=update.url,
                delivered=delivered,
                http_status=http_status,
                attempted_at=time.monotonic() if attempted_at is None else attempted_at,
                error=error,
                updated_at=update.updated_at,
            )
        )

    async def flush(self) -> None:
        """Wait until every queued delivery has been attempted (held ones excepted)."""
        while self._inflight:
            await asyncio.wait(set(self._inflight))

    async def close(self) -> None:
        """Abandon pending deliveries and close the session; idempotent."""
        self._closed = True
        pending = list(self._inflight)
        for delivery in pending:
            delivery.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self._held.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None
