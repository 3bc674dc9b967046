"""Callback fan-in: a callback any replica receives reaches the one that holds
the task."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from ._account import stop_tasks, text

if TYPE_CHECKING:
    from kling_async._callbacks import CallbackReceiver

    from ._account import RedisAccount

__all__ = ["CallbackFanIn"]

logger = logging.getLogger("kling_async")

_RETRY_FIRST, _RETRY_MAX = 0.05, 2.0
_QUEUE_LIMIT = 10_000


class CallbackFanIn:
    """Share Kling's callbacks between the replicas of a service.

    Point Kling's callbacks at one public URL behind a load balancer; every
    replica serves a :class:`~kling_async.CallbackReceiver` with the same
    secret (``KLING_CALLBACK_SECRET``) and calls ``account.fan_in(receiver)``.
    A replica that receives a callback for a task none of its clients holds
    checks it as usual (URL token, webhook signature, body), then publishes
    the body, and only the body, on the account's channel; every other replica
    offers it to its clients, and the one holding the task takes it. A
    terminal update is confirmed with a GET there before the handle resolves,
    as for any callback.

    Publish/subscribe is at most once: a replica briefly disconnected from
    Redis misses what was published meanwhile, and its handles resolve by
    polling, which stays on as the safety net.
    """

    def __init__(self, account: RedisAccount, receiver: CallbackReceiver) -> None:
        self.account = account
        self.receiver = receiver
        self._channel = account.key("callbacks")
        self._outbox: asyncio.Queue[str] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._subscribed: asyncio.Event | None = None
        #: Callbacks this replica passed on, and those it took from another.
        self.forwarded = 0
        self.delivered = 0

    def __repr__(self) -> str:
        return (
            f"<CallbackFanIn {self.account.name!r} forwarded={self.forwarded} "
            f"delivered={self.delivered}>"
        )

    def start(self) -> None:
        """Start forwarding and listening (on the running loop)."""
        if self._tasks:
            return
        loop = asyncio.get_running_loop()
        self._outbox = asyncio.Queue(_QUEUE_LIMIT)
        self._subscribed = asyncio.Event()
        self._tasks = [
            loop.create_task(self._publish_forever(), name="kling-fan-in-publish"),
            loop.create_task(self._listen_forever(), name="kling-fan-in-listen"),
        ]
        self.receiver.forwarder = self._forward

    async def ready(self) -> None:
        """Return once this replica listens for forwarded callbacks."""
        assert self._subscribed is not None, "start() first"
        await self._subscribed.wait()

    def _forward(self, external_task_id: str, body: bytes) -> None:
        assert self._outbox is not None
        message = json.dumps(
            {
                "from": self.account.member,
                "id": external_task_id,
                "body": body.decode("utf-8", "replace"),
            },
            separators=(",", ":"),
        )
        try:
            self._outbox.put_nowait(message)
        except asyncio.QueueFull:  # Redis down for long: polling still resolves them
            logger.warning(
                "callback fan-in: outbox full, callback for %s dropped", external_task_id
            )

    async def _publish_forever(self) -> None:
        assert self._outbox is not None
        retry = _RETRY_FIRST
        while True:
            message = await self._outbox.get()
            while True:
                try:
                    await self.account.redis.publish(self._channel, message)
                except RedisError as error:
                    logger.warning("callback fan-in: cannot publish (%s); retrying", error)
                    await asyncio.sleep(retry)
                    retry = min(_RETRY_MAX, retry * 2)
                    continue
                retry = _RETRY_FIRST
                self.forwarded += 1
                break

    async def _listen_forever(self) -> None:
        assert self._subscribed is not None
        retry = _RETRY_FIRST
        while True:
            pubsub = self.account.redis.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                self._subscribed.set()
                retry = _RETRY_FIRST
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        self._take(message["data"])
            except RedisError as error:
                self._subscribed.clear()
                logger.warning("callback fan-in: not listening (%s); retrying", error)
                await asyncio.sleep(retry)
                retry = min(_RETRY_MAX, retry * 2)
            finally:
                with contextlib.suppress(RedisError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _take(self, data: object) -> None:
        try:
            message = json.loads(text(data))
            sender, external_task_id, body = message["from"], message["id"], message["body"]
        except (ValueError, KeyError, TypeError):
            logger.warning("callback fan-in: a malformed message was dropped")
            return
        if sender == self.account.member:
            return
        if self.receiver.deliver(str(external_task_id), str(body).encode()):
            self.delivered += 1

    async def close(self) -> None:
        """Stop forwarding and listening. Idempotent."""
        if self.receiver.forwarder == self._forward:
            self.receiver.forwarder = None
        tasks, self._tasks = self._tasks, []
        await stop_tasks(*tasks)
