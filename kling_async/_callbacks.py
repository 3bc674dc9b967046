"""Receiving Kling's task callbacks, safely.

Kling POSTs a task to its ``callback_url`` on every status change, possibly
repeated, out of order, or never; signed only if the account has a webhook
secret. So the URL itself is the first credential: each task gets
``<public_url>/<external_task_id>/<token>``, where the token is an HMAC of the
external_task_id under the receiver's secret. A request with an unknown or
wrong token is answered 404 and never dispatched; with a webhook secret, an
unsigned or wrongly signed delivery is answered 401 and a repeated one dropped;
a terminal update is confirmed with one GET before a handle resolves or a hook
hears of it (so even a leaked URL cannot fake a result); duplicates and stale
updates are acknowledged and dropped; and polling stays on, slower, as the
safety net for callbacks that never come.

Both documented body formats are read: the legacy one (a get's ``data``, with
or without ``task_info``) and the new-design one (``{id, status, outputs, ...}``,
also what the console's "test callback" sends). A body without an external id
is matched by its task_id to the task the URL names.

The receiver is plain: ``await receiver.handle(path, body, headers)`` does all
of the above, and the aiohttp sub-app, the ASGI app and
:meth:`CallbackReceiver.serve` are thin adapters around it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import json
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import attrs
from aiohttp import web

from ._exceptions import ConfigurationError, KlingError, NotFoundError
from ._models import Endpoint, Task
from ._tracking import CallbackOutcome, Tracker, is_newer
from ._urls import is_http_url, redacted_url
from ._webhooks import SignatureError, WebhookVerifier
from ._wire import parse_callback

__all__ = ["CallbackReceiver", "UpdateHook"]

logger = logging.getLogger("kling_async")

ENV_CALLBACK_SECRET = "KLING_CALLBACK_SECRET"
ENV_WEBHOOK_SECRET = "KLING_WEBHOOK_SECRET"

UpdateHook = Callable[[Task], Awaitable[None] | None]
"""Called with tasks this process holds no handle for (sync or async)."""

#: A genuine callback carries one task: a few kilobytes even with nine images.
DEFAULT_MAX_BODY = 256 * 1024
#: How far in the future an updated_at may lie before the update is refused:
#: a forged far-future stamp would otherwise make every true update look stale.
MAX_CLOCK_SKEW = timedelta(minutes=5)
#: Unknown tasks whose last update is remembered, to drop their duplicates.
_REMEMBERED_UNKNOWN = 10_000

_Response = tuple[int, bytes]
_NOT_THIS_TASK = "the task in the body is not the task of this URL"


def _reply(status: int, message: str) -> _Response:
    return status, json.dumps({"ok": status == 200, "message": message}).encode()


class CallbackReceiver:
    """The endpoint Kling's callbacks arrive at; give it to ``Client(callbacks=...)``.

    ``public_url`` is where Kling can reach the receiver (``https://host/kling``);
    every task the client creates gets a callback URL under it. It may be
    ``None`` when the receiver is served with :meth:`serve`, which then fills it in.

    ``secret`` keys the per-task tokens. Several processes behind one load
    balancer must share it: pass it, or set ``KLING_CALLBACK_SECRET``. Without
    either a random one is made, valid for this process only.

    ``webhook_secret`` is the account's webhook secret (``whsec_...``, from
    Kling's console), or set ``KLING_WEBHOOK_SECRET``: every delivery must then
    carry a valid Standard Webhooks signature no more than 5 minutes old (401
    otherwise), and a delivery repeating a ``webhook-id`` already processed is
    acknowledged and dropped. The per-task URL token is checked as well. Needs
    the ``webhooks`` extra (``pip install '.[webhooks]'`` in the checkout).

    ``confirm`` (default on) makes a terminal callback wait for one GET of the
    task before handles resolve or hooks hear of it; for a task no handle holds,
    the GET is sent by an attached client (``Client(callbacks=receiver)``).
    ``max_body_size`` caps a callback's bytes. ``clock`` (Unix seconds) is what
    signature timestamps and ``updated_at`` are checked against; tests inject one.

    A callback URL is a credential: keep it out of access logs (aiohttp's default
    access log records full paths; :meth:`serve` turns it off).
    """

    def __init__(
        self,
        public_url: str | None = None,
        *,
        secret: str | bytes | None = None,
        webhook_secret: str | None = None,
        confirm: bool = True,
        max_body_size: int = DEFAULT_MAX_BODY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if public_url and not is_http_url(public_url):
            raise ConfigurationError(
                f"public_url must be an http(s) URL Kling can reach; got {redacted_url(public_url)}"
            )
        self.public_url = public_url.rstrip("/") if public_url else None
        if secret is None:
            secret = os.environ.get(ENV_CALLBACK_SECRET) or secrets.token_bytes(32)
        self._secret = secret.encode() if isinstance(secret, str) else secret
        if len(self._secret) < 16:
            raise ConfigurationError("the callback secret must be at least 16 bytes")
        if webhook_secret is None:
            webhook_secret = os.environ.get(ENV_WEBHOOK_SECRET) or None
        self._webhooks = None if webhook_secret is None else WebhookVerifier(webhook_secret, clock)
        self.confirm = confirm
        self.max_body_size = max_body_size
        self._clock = clock
        self._trackers: list[Tracker] = []
        self._hooks: list[UpdateHook] = []
        self._hook_runs: set[asyncio.Task[None]] = set()
        # What hooks were told of each task nobody holds, and whether Kling's API
        # (rather than a callback) said it.
        self._unknown_seen: OrderedDict[str, tuple[Task, bool]] = OrderedDict()
        self._confirming: dict[str, asyncio.Task[None]] = {}
        #: Told ``(external_task_id, body)`` of each authentic callback for a task
        #: no client here holds, so another replica's can take it (set by a
        #: fan-in such as ``kling_async.contrib.redis.CallbackFanIn``).
        self.forwarder: Callable[[str, bytes], None] | None = None

    def __repr__(self) -> str:
        return f"<CallbackReceiver {self.public_url or '(not served yet)'}>"

    @property
    def verifies_signatures(self) -> bool:
        """Whether deliveries must carry a valid webhook signature."""
        return self._webhooks is not None

    # --- URLs -------------------------------------------------------------------

    def token_for(self, external_task_id: str) -> str:
        """The unguessable token that authorises callbacks for one task."""
        digest = hmac.new(self._secret, external_task_id.encode(), hashlib.sha256)
        return digest.hexdigest()

    def url_for(self, external_task_id: str) -> str:
        """The callback URL to give Kling for the task ``external_task_id``."""
        if self.public_url is None:
            raise ConfigurationError(
                "CallbackReceiver has no public_url; pass one, or start receiver.serve() first"
            )
        token = self.token_for(external_task_id)
        return f"{self.public_url}/{quote(external_task_id, safe='')}/{token}"

    # --- wiring -----------------------------------------------------------------

    def attach(self, tracker: Tracker) -> None:
        """Route callbacks to a client's tasks (done by ``Client(callbacks=...)``)."""
        if tracker not in self._trackers:
            self._trackers.append(tracker)

    def detach(self, tracker: Tracker) -> None:
        """Stop routing callbacks to a closed client."""
        if tracker in self._trackers:
            self._trackers.remove(tracker)

    def on_update(self, hook: UpdateHook) -> UpdateHook:
        """Register ``hook(task)`` for authentic callbacks about tasks no client of
        this process holds a handle for (submitted by another process, or before a
        restart). Usable as a decorator. Duplicates are not passed on.

        A terminal update reaches hooks only once Kling's API confirms it (unless
        ``confirm=False``), and what they get is the task as the API reported it,
        not the callback's body: a leaked URL cannot feed them a forged result."""
        self._hooks.append(hook)
        return hook

    # --- the protocol -----------------------------------------------------------

    async def handle(
        self, path: str, body: bytes, headers: Mapping[str, str] | None = None
    ) -> tuple[int, bytes]:
        """Process one callback request; return the HTTP status and JSON body to send.

        ``path`` is the request path; only its last two segments
        (``<external_task_id>/<token>``) matter, so any mount point works.
        ``headers`` are the request's (names in any case); they carry the
        webhook signature, so pass them whenever a webhook secret may be set.
        """
        external_task_id = self.authorize(path)
        if external_task_id is None:
            return _reply(404, "not found")
        return self._process(external_task_id, body, headers or {})

    def authorize(self, path: str) -> str | None:
        """The external_task_id a callback path is valid for, or ``None`` (answer 404).

        Adapters call this before reading the body, so a stranger's request costs
        no more than its headers.
        """
        parts = path.rstrip("/").rsplit("/", 2)
        if len(parts) < 3:
            return None
        external_task_id, token = unquote(parts[1]), parts[2]
        expected = self.token_for(external_task_id)
        if not external_task_id or not hmac.compare_digest(token.encode(), expected.encode()):
            return None
        return external_task_id

    def _process(self, external_task_id: str, body: bytes, headers: Mapping[str, str]) -> _Response:
        if len(body) > self.max_body_size:
            return _reply(413, "callback body too large")
        webhooks, delivery = self._webhooks, None
        if webhooks is not None:
            try:
                delivery = webhooks.verify(body, headers)
            except SignatureError as error:
                logger.warning("callback refused: %s", error)
                return _reply(401, f"signature verification failed: {error}")
            if webhooks.is_repeat(delivery):
                return _reply(200, "duplicate delivery ignored")
        try:
            task = parse_callback(json.loads(body))
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            return _reply(400, "body is not a Kling task")
        if task.external_task_id is None:
            # Older copies of the schema have no task_info: the URL names the task
            # (its token says so), and the tracker matches the task_id to it.
            task = attrs.evolve(task, external_task_id=external_task_id)
        elif task.external_task_id != external_task_id:
            return _reply(400, _NOT_THIS_TASK)
        horizon = datetime.fromtimestamp(self._clock(), timezone.utc) + MAX_CLOCK_SKEW
        if task.updated_at is not None and task.updated_at > horizon:
            return _reply(400, "updated_at lies in the future")
        status, reply = self._dispatch(external_task_id, task, body)
        if webhooks is not None and delivery is not None and status == 200:
            webhooks.remember(delivery)
        return status, reply

    def _dispatch(self, external_task_id: str, task: Task, body: bytes | None = None) -> _Response:
        outcome = self._offer(external_task_id, task)
        if outcome is CallbackOutcome.MISMATCH:
            return _reply(400, _NOT_THIS_TASK)
        if outcome is CallbackOutcome.IGNORED:
            return _reply(200, "duplicate or stale update ignored")
        if outcome is CallbackOutcome.ACCEPTED:
            return _reply(200, "accepted")
        if self.forwarder is not None and body is not None:
            # Another replica may hold the task: it gets the body (the URL
            # token and the headers stay here, checked). Hooks here still hear
            # of it when there are any; without them the confirming GET of the
            # unknown path would be wasted.
            self.forwarder(external_task_id, body)
            if not self._hooks:
                return _reply(200, "accepted")
        return self._unknown(external_task_id, task)

    def _offer(self, external_task_id: str, task: Task) -> CallbackOutcome:
        """Hand a callback to the first client here that knows the task."""
        for tracker in self._trackers:
            outcome = tracker.receive_callback(external_task_id, task, confirm=self.confirm)
            if outcome is not CallbackOutcome.UNKNOWN:
                return outcome
        return CallbackOutcome.UNKNOWN

    def deliver(self, external_task_id: str, body: bytes) -> bool:
        """Take a callback that another replica received, authenticated and
        forwarded (its URL token and signature were checked there). Returns
        whether a client here knows the task. A terminal update is still
        confirmed by a GET before a handle resolves (unless ``confirm=False``),
        so a forged message cannot fake a result."""
        if len(body) > self.max_body_size:
            return False
        try:
            task = parse_callback(json.loads(body))
        except (ValueError, RecursionError):
            return False
        if task.external_task_id is None:
            task = attrs.evolve(task, external_task_id=external_task_id)
        elif task.external_task_id != external_task_id:
            return False
        return self._offer(external_task_id, task) is not CallbackOutcome.UNKNOWN

    def _unknown(self, external_task_id: str, task: Task) -> _Response:
        known = self._unknown_seen.get(external_task_id)
        if not is_newer(task, known[0] if known else None, trusted=False):
            return _reply(200, "duplicate or stale update ignored")
        if task.is_terminal and self.confirm:
            return self._confirm_unheld(external_task_id, task)
        self._tell_hooks(external_task_id, task, trusted=False)
        return _reply(200, "accepted")

    def _tell_hooks(self, external_task_id: str, task: Task, *, trusted: bool) -> None:
        self._unknown_seen[external_task_id] = (task, trusted)
        self._unknown_seen.move_to_end(external_task_id)
        while len(self._unknown_seen) > _REMEMBERED_UNKNOWN:
            self._unknown_seen.popitem(last=False)
        if not self._hooks:
            logger.info("callback for task %r, which no handle holds, dropped", task.task_id)
        for hook in self._hooks:
            self._run_hook(hook, task)

    # --- confirming terminal updates of tasks nobody holds ------------------------

    def _confirm_unheld(self, external_task_id: str, claimed: Task) -> _Response:
        """Ask Kling's API about a task whose terminal callback no handle takes.

        The callback is acknowledged at once; hooks hear of the task only if the
        API shows it ended, and then get the API's task, not the body's claims.
        """
        if external_task_id in self._confirming:
            return _reply(200, "accepted")  # the GET under way answers this one too
        if not self._trackers:
            logger.warning(
                "a terminal callback for task %r cannot be confirmed: no client uses this "
                "receiver (Client(callbacks=receiver)); pass confirm=False to take "
                "callbacks unconfirmed",
                claimed.task_id,
            )
            # Kling may deliver again, perhaps once a client is attached.
            return _reply(503, "cannot confirm the update now")
        trackers = tuple(self._trackers)
        run = asyncio.get_running_loop().create_task(
            self._confirm(trackers, external_task_id, claimed)
        )
        self._confirming[external_task_id] = run
        run.add_done_callback(lambda _: self._confirming.pop(external_task_id, None))
        return _reply(200, "accepted")

    async def _confirm(
        self, trackers: tuple[Tracker, ...], external_task_id: str, claimed: Task
    ) -> None:
        try:
            confirmed = await _look_up(trackers, external_task_id)
        except KlingError as error:
            logger.warning(
                "could not confirm the terminal callback for task %r: %s", claimed.task_id, error
            )
            return
        except Exception:  # a bug must be logged, not lost in an unawaited task
            logger.exception("confirming the terminal callback for task %r failed", claimed.task_id)
            return
        if confirmed is None or confirmed.task_id != claimed.task_id:
            logger.warning(
                "a terminal callback for task %r was not confirmed: Kling knows %s under "
                "its external id; dropped",
                claimed.task_id,
                "no task" if confirmed is None else f"task {confirmed.task_id!r}",
            )
            return
        if not confirmed.is_terminal:
            logger.warning(
                "a terminal callback for task %r was not confirmed: Kling reports it %s; dropped",
                claimed.task_id,
                confirmed.status.value,
            )
            return
        known = self._unknown_seen.get(external_task_id)
        if is_newer(
            confirmed,
            known[0] if known else None,
            trusted=True,
            known_untrusted=known is not None and not known[1],
        ):
            self._tell_hooks(external_task_id, confirmed, trusted=True)

    def _run_hook(self, hook: UpdateHook, task: Task) -> None:
        try:
            result = hook(task)
        except Exception:
            logger.exception("on_update hook failed for task %s", task.task_id)
            return
        if inspect.isawaitable(result):
            run = asyncio.get_running_loop().create_task(_logged(result, task.task_id))
            self._hook_runs.add(run)
            run.add_done_callback(self._hook_runs.discard)

    # --- adapters ---------------------------------------------------------------

    def aiohttp_app(self) -> web.Application:
        """An aiohttp application to mount with ``app.add_subapp(prefix, ...)``."""
        app = web.Application(client_max_size=self.max_body_size)
        app.router.add_post("/{external_task_id}/{token}", self._aiohttp_handler)
        return app

    async def _aiohttp_handler(self, request: web.Request) -> web.Response:
        # The raw path: an external_task_id may hold an escaped "/".
        external_task_id = self.authorize(request.rel_url.raw_path)
        if external_task_id is None:
            status, body = _reply(404, "not found")
        else:
            raw = await self._read_body(request)
            if raw is None:
                status, body = _reply(413, "callback body too large")
            else:
                status, body = self._process(external_task_id, raw, request.headers)
        return web.Response(status=status, body=body, content_type="application/json")

    async def _read_body(self, request: web.Request) -> bytes | None:
        """The body, or ``None`` once it exceeds ``max_body_size``. Read from the
        stream: a sub-app's own ``client_max_size`` is not applied by aiohttp."""
        if request.content_length is not None and request.content_length > self.max_body_size:
            return None
        if not request.can_read_body:
            # A middleware already read it (aiohttp keeps those bytes): the
            # stream is spent, and reading it again would find nothing.
            cached = await request.read()
            return None if len(cached) > self.max_body_size else cached
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > self.max_body_size:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def asgi(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
        send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ) -> None:
        """An ASGI 3 application (mount it in Starlette, FastAPI, ...)."""
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        raw_path = scope.get("raw_path")
        path = raw_path.decode("latin-1") if raw_path else quote(scope["path"])
        external_task_id = self.authorize(path)
        if scope.get("method") != "POST":
            status, body = _reply(405, "use POST")
        elif external_task_id is None:
            status, body = _reply(404, "not found")
        else:
            raw = bytearray()
            more = True
            while more and len(raw) <= self.max_body_size:
                message = await receive()
                raw += message.get("body", b"")
                more = message.get("more_body", False)
            headers = {
                name.decode("latin-1"): value.decode("latin-1")
                for name, value in scope.get("headers") or ()
            }
            status, body = self._process(external_task_id, bytes(raw), headers)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    @asynccontextmanager
    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
        """Serve the receiver on ``host:port`` for the duration of the block; yields
        the URL it listens on. With no ``public_url``, that URL becomes it."""
        app = web.Application(client_max_size=self.max_body_size)
        prefix = urlsplit(self.public_url).path.rstrip("/") if self.public_url else ""
        app.router.add_post(prefix + "/{external_task_id}/{token}", self._aiohttp_handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
            bound = runner.addresses[0][1]
            url = f"http://{host}:{bound}{prefix}"
            filled_in = self.public_url is None
            if filled_in:
                self.public_url = url
            try:
                yield url
            finally:
                if filled_in:
                    self.public_url = None  # that address is about to go away
        finally:
            await runner.cleanup()

    async def close(self) -> None:
        """Cancel hook calls and confirmations still running."""
        runs = [*self._hook_runs, *self._confirming.values()]
        for run in runs:
            run.cancel()
        await asyncio.gather(*runs, return_exceptions=True)


async def _look_up(trackers: tuple[Tracker, ...], external_task_id: str) -> Task | None:
    """The task Kling knows by ``external_task_id``, asked through the first
    client that can: a callback URL does not say which endpoint (or which of
    several accounts) the task belongs to, so each is tried in turn."""
    error: KlingError | None = None
    for tracker in trackers:
        for endpoint in Endpoint:
            try:
                return await tracker.fetch(endpoint, external_task_id)
            except NotFoundError:
                continue
            except KlingError as failure:  # e.g. this client was closed: try the next
                error = failure
                break
    if error is not None:
        raise error
    return None


async def _logged(result: Awaitable[None], task_id: str) -> None:
    try:
        await result
    except Exception:
        logger.exception("on_update hook failed for task %s", task_id)
