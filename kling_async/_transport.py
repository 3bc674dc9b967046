"""The HTTP layer: one aiohttp session, the auth header, timeouts and retries.

It moves :class:`~kling_async._wire.WireRequest` values over the network and
hands the bytes to ``_wire`` to interpret. It decides nothing about Kling's
protocol: :meth:`Transport.send` retries what ``_exceptions.is_retryable``
calls safe (queries only), and :meth:`Transport.exchange` makes exactly one
try, for the create's owner (``_submissions``), whose pure rules
(``_create_rules``) decide what follows a failed create.

Every failure leaves as a :class:`~kling_async.KlingError`: a credentials
provider that raises, a closed session, aiohttp refusing a header. aiohttp's
own exceptions are never chained, since they hold the request headers and with
them the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import platform
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Any, NoReturn, TypeVar

import aiohttp
import backoff
from backoff.types import Details

from ._auth import MISSING_CREDENTIALS, Credentials
from ._config import RetryPolicy
from ._exceptions import (
    RESIGN_CODES,
    APIError,
    AuthenticationError,
    ClientClosedError,
    ConfigurationError,
    EventLoopError,
    KlingError,
    TransportError,
    is_retryable,
)
from ._proxies import DIRECT, EnvironmentProxies, ProxyRoute
from ._version import __version__
from ._wire import Envelope, WireRequest, parse_envelope

logger = logging.getLogger("kling_async")

T = TypeVar("T")

#: Kling's largest legitimate answer is a 500-task list page; anything far beyond
#: that is a broken proxy, and reading it whole would only exhaust memory.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024

USER_AGENT = (
    f"kling-async/{__version__} aiohttp/{aiohttp.__version__} "
    f"{platform.python_implementation()}/{platform.python_version()}"
)


class Transport:
    """Sends requests to one Kling API root with one lazily created session.

    The session is made on first use, on the running loop, so constructing a
    client does no I/O and a client built outside a loop still works inside one.
    A session passed in by the caller is used as is and left open on close.
    """

    def __init__(
        self,
        *,
        base_url: str,
        credentials: Credentials | None,
        timeout: aiohttp.ClientTimeout,
        max_connections: int,
        retry: RetryPolicy,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.base_url = base_url
        self.retry = retry
        self._credentials = credentials
        self._timeout = timeout
        self._max_connections = max_connections
        self._session = session
        self._owns_session = session is None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        # A view made by derived(): it borrows this transport's session.
        self._parent: Transport | None = None
        self._proxies: EnvironmentProxies | None = None  # read when the session starts
        self._retries = self._retry_loop()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called (on this transport or, for a view,
        on the one it borrows its session from)."""
        return self._closed or (self._parent is not None and self._parent.closed)

    def derived(
        self, *, timeout: aiohttp.ClientTimeout | None = None, retry: RetryPolicy | None = None
    ) -> Transport:
        """A view with its own timeout and retry policy on this transport's session
        and credentials (``client.with_options``); closing it closes nothing."""
        view = Transport(
            base_url=self.base_url,
            credentials=self._credentials,
            timeout=timeout or self._timeout,
            max_connections=self._max_connections,
            retry=retry or self.retry,
        )
        view._owns_session = False
        view._parent = self._parent or self
        return view

    def _retry_loop(self) -> Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]]:
        """``backoff``'s retry loop for this transport's policy, made once."""
        retried: Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]] = backoff.on_exception(
            self.retry.waits,
            KlingError,
            max_tries=self.retry.max_attempts,
            max_time=self.retry.max_elapsed,
            giveup=_not_retryable,
            jitter=None,  # the policy jitters its own waits; a Retry-After must not be
            logger=None,
            on_backoff=_log_backoff,
        )(_call)
        return retried

    @property
    def request_timeout(self) -> float | None:
        """The longest one exchange may take (the session timeout's total)."""
        return self._timeout.total

    @property
    def holds_session(self) -> bool:
        """True while a session this transport made is open: :meth:`close` is owed."""
        return self._owns_session and self._session is not None and not self._session.closed

    def abandon(self) -> None:
        """Close the session's connections without awaiting, for a client being
        garbage collected unclosed: its own ResourceWarning has said so, and
        aiohttp's "Unclosed client session" / "Unclosed connector" would say it
        again, less usefully."""
        if not self._owns_session or self._session is None:
            return
        session, self._session = self._session, None
        loop = self._session_loop
        if loop is None or loop.is_closed():
            _discard_stranded(session)
            return
        # The loop lives on: aiohttp closes the connections through it, and
        # marked closed, neither the session nor the connector warns.
        connector = session.connector
        with contextlib.suppress(Exception):
            if connector is not None:
                connector._close()
            session.detach()

    def session(self) -> aiohttp.ClientSession:
        """The session, created on first use on the running event loop.

        A session is bound to its event loop. Used again after that loop ended
        (a second ``asyncio.run()``), the client starts a new one: the old one's
        connections are closed on the spot, as its loop can no longer do it.
        """
        if self._parent is not None:
            return self._parent.session()
        if self._closed:
            raise ClientClosedError("the client is closed; create a new Client")
        loop = asyncio.get_running_loop()
        if self._owns_session and self._session is not None and self._session_loop is not loop:
            assert self._session_loop is not None
            if not self._session_loop.is_closed():
                raise EventLoopError(
                    "this Client is in use on another event loop that is still running; "
                    "a Client serves one event loop at a time: make one per loop (thread)"
                )
            _discard_stranded(self._session)
            self._session = None
        if self._session is None:
            self._session_loop = loop
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self._max_connections, limit_per_host=self._max_connections
                ),
                timeout=self._timeout,
                headers={"User-Agent": USER_AGENT},
            )
            # HTTP(S)_PROXY and NO_PROXY, as requests and httpx honour them: read
            # once here, not per request as aiohttp's trust_env would (_proxies).
            self._proxies = EnvironmentProxies()
        return self._session

    def _route(self, url: str) -> ProxyRoute:
        """The proxy for a request to ``url`` on :meth:`session`: the environment's
        for a session of our own; a caller's session keeps its own settings."""
        if self._parent is not None:
            return self._parent._route(url)
        if self._proxies is None:
            return DIRECT
        return self._proxies.route(url)

    async def close(self) -> None:
        """Close the session if this transport made it. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        session, self._session = self._session, None
        if session is None or not self._owns_session:
            return
        if self._session_loop is not None and self._session_loop.is_closed():
            _discard_stranded(session)  # its loop ended: aiohttp could not close it
        else:
            await session.close()

    # --- requests ---------------------------------------------------------------

    async def send(self, request: WireRequest) -> Envelope:
        """Send ``request`` and return Kling's envelope, retrying what is safe.

        Raises the :class:`~kling_async.APIError` subclass for Kling's code, or
        :class:`~kling_async.TransportError` when no answer came.
        """
        return await self._retrying_resigned(functools.partial(self.exchange, request))

    async def _retrying_resigned(self, attempt: Callable[[], Awaitable[Envelope]]) -> Envelope:
        """:meth:`retrying`, and all of it once more after re-signing a rejected JWT."""
        try:
            return await self.retrying(attempt)
        except AuthenticationError as error:
            if not self._worth_resigning(error):
                raise
        return await self.retrying(attempt)

    def _worth_resigning(self, error: AuthenticationError) -> bool:
        """An expired or not-yet-valid JWT is worth one fresh signature; any other
        auth failure, or a static token, would fail the same way again."""
        return error.code in RESIGN_CODES and self.resign()

    def resign(self) -> bool:
        """Drop the current token so the next request signs a new one; whether
        that can help (a static token cannot be renewed)."""
        if self._require_credentials().resign():
            logger.info("Kling rejected the token; signing a new one")
            return True
        return False

    async def retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run ``attempt()`` under the retry policy, in ``backoff``'s loop: a
        retryable failure waits what the policy's wait generator says (a
        ``Retry-After`` the error carries, else jittered exponential backoff) and
        tries again, within ``max_attempts`` tries and ``max_elapsed`` seconds."""
        result: T = await self._retries(attempt)
        return result

    def _require_credentials(self) -> Credentials:
        if self._credentials is None:
            raise ConfigurationError(MISSING_CREDENTIALS)
        return self._credentials

    def _authorization(self) -> str:
        credentials = self._require_credentials()
        try:
            return credentials.authorization()
        except KlingError:
            raise
        except Exception as error:  # a custom provider's failure, before anything is sent
            # Its message may quote a key: the type is named, the error chained.
            raise ConfigurationError(
                f"the credentials provider {type(credentials).__name__} failed "
                f"({type(error).__name__}); nothing was sent"
            ) from error

    async def exchange(self, request: WireRequest) -> Envelope:
        """One HTTP exchange, no retries: Kling's envelope, or a :class:`KlingError`."""
        authorization = self._authorization()
        session = self.session()
        if session.closed:  # a caller's own session, closed under us
            raise ClientClosedError(
                "the aiohttp session given as Client(session=...) is closed; nothing was sent"
            )
        url = self.base_url + request.path
        route = self._route(self.base_url)
        started = time.perf_counter()
        failure: KlingError | None = None
        unexpected: Exception | None = None
        try:
            async with session.request(
                request.method,
                url,
                params=request.params,
                json=request.body,
                headers={"Authorization": authorization},
                timeout=self._timeout,  # a with_options() view's own, on a shared session
                proxy=route.proxy,
                proxy_headers=route.headers,
                # A caller's session may raise for every 4xx: Kling's error
                # bodies are what tells a 1303 from a 1201, so read them.
                raise_for_status=False,
            ) as response:
                body = await _read_capped(response)
                status, headers = response.status, response.headers
        except aiohttp.ClientConnectorError as error:
            failure = TransportError(
                f"cannot connect to {self.base_url}: {error.os_error.strerror or error}; "
                "check base_url and the network",
                may_have_reached_server=False,
            )
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            reason = type(error).__name__ if not str(error) else f"{type(error).__name__}: {error}"
            failure = TransportError(f"{request.method} {request.path} got no answer ({reason})")
        except KlingError:
            raise
        except (ValueError, TypeError) as error:
            # aiohttp refusing an argument (a header value with a newline, a URL it
            # cannot use) before writing anything: a setting to fix, not a blip.
            unexpected = error
            failure = ConfigurationError(
                f"{request.method} {request.path} could not be sent: "
                f"{type(error).__name__}: {error}; check the credentials and base_url"
            )
        except Exception as error:  # anything else: maybe after sending, so ambiguous
            unexpected = error
            failure = TransportError(
                f"{request.method} {request.path} failed: {type(error).__name__}: {error}"
            )
        elapsed = time.perf_counter() - started
        if failure is not None:
            logger.debug(
                "%s %s -> no answer in %.3fs: %s", request.method, request.path, elapsed, failure
            )
            # aiohttp's exception holds the request headers, token included.
            # Anything else is chained, for its traceback.
            _raise_without_context(failure, cause=unexpected)
        try:
            # The wire layer reads no clock: a Retry-After date needs the time.
            now = datetime.now(timezone.utc) if "Retry-After" in headers else None
            envelope = parse_envelope(status, body, headers, now=now)
        except APIError as error:
            logger.debug(
                "%s %s -> HTTP %s, code %s, request_id %s in %.3fs",
                request.method,
                request.path,
                status,
                error.code,
                error.request_id,
                elapsed,
            )
            raise
        logger.debug(
            "%s %s -> HTTP %s, request_id %s in %.3fs",
            request.method,
            request.path,
            status,
            envelope.request_id,
            elapsed,
        )
        return envelope

    @asynccontextmanager
    async def stream(
        self, url: str, *, headers: dict[str, str] | None = None
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """GET an absolute URL (a result image) without Kling credentials.

        Result URLs live on a CDN: sending the API token there would leak it.
        """
        session = self.session()
        route = self._route(url)
        failure: TransportError | None = None
        try:
            async with session.get(
                url, headers=headers, proxy=route.proxy, proxy_headers=route.headers
            ) as response:
                yield response
        except aiohttp.ClientConnectorError as error:
            failure = TransportError(
                f"cannot connect for {url}: {error}", may_have_reached_server=False
            )
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            failure = TransportError(f"GET {url} failed ({type(error).__name__}: {error})")
        if failure is not None:
            _raise_without_context(failure)  # aiohttp's exception may carry headers


def _discard_stranded(session: aiohttp.ClientSession) -> None:
    """Close the connections of a session whose event loop has ended.

    aiohttp closes connections through their loop, which is gone, so they would
    stay open until garbage collection (with a ResourceWarning each). Each
    transport is aborted and its socket closed directly; aiohttp's own
    bookkeeping is then marked closed so that it does not warn either. Any step
    that fails falls back to the garbage collector.
    """
    connector = session.connector
    if connector is not None:
        idle = getattr(connector, "_conns", {})
        protocols = [proto for connections in idle.values() for proto, _ in connections]
        protocols += list(getattr(connector, "_acquired", ()))
        for protocol in protocols:
            transport = getattr(protocol, "transport", None)
            if transport is None:
                continue
            with contextlib.suppress(Exception):
                transport.abort()  # unregisters it, then fails to schedule the rest
            with contextlib.suppress(Exception):
                transport._call_connection_lost(None)  # ... which closes the socket now
        with contextlib.suppress(Exception):
            connector._close()
    with contextlib.suppress(Exception):
        session.detach()


def _raise_without_context(failure: KlingError, cause: BaseException | None = None) -> NoReturn:
    """Raise ``failure`` chained to nothing but ``cause`` (an exception that is not
    aiohttp's), so no aiohttp exception (holding the request, its Authorization
    header included) travels with it.

    Raising outside the ``except`` block is not enough on Python 3.10: a
    coroutine that the event loop resumed from inside its own ``except`` (the
    task wakeup re-raising a failed future) still sees that exception as being
    handled, and ``raise`` chains it as ``__context__``.
    """
    failure.__cause__ = cause
    failure.__suppress_context__ = True
    try:
        raise failure
    finally:
        failure.__context__ = None


async def _call(attempt: Callable[[], Awaitable[T]]) -> T:
    return await attempt()


def _not_retryable(error: Exception) -> bool:
    return not is_retryable(error)


def _log_backoff(details: Details) -> None:
    logger.info(
        "retrying in %.2fs after try %d: %s",
        details["wait"],
        details["tries"],
        details.get("exception"),
    )


async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
    length = response.content_length
    if length is not None:
        if length > MAX_RESPONSE_BYTES:
            raise TransportError(
                f"response of {length:,} bytes exceeds the {MAX_RESPONSE_BYTES:,}-byte limit"
            )
        return await response.read()  # the size is known and bounded: one read
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise TransportError(f"response exceeds the {MAX_RESPONSE_BYTES:,}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)
