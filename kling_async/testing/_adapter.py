"""The fake's aiohttp side, kept thin: one catch-all route that hands plain data
to :class:`FakeApi` and writes back what it answers."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

from aiohttp import web

from ._handlers import FakeApi
from ._http import Request, parse_body

# Six base64 images of 10 MB each fit; anything larger is refused by aiohttp (413).
MAX_BODY: Final = 96 * 1024 * 1024


def make_app(api: FakeApi, closing: asyncio.Event) -> web.Application:
    """An application serving ``api``; setting ``closing`` cuts short the wait of
    every slow-response fault, so none delays a shutdown."""

    async def handle(request: web.Request) -> web.StreamResponse:
        # Counted as it arrives, before its body is read: a body aiohttp refuses
        # as too large (413) still shows in the stats.
        routing = api.route(request.method, request.rel_url.raw_path)
        raw = await request.read() if request.body_exists else None
        call = api.receive(
            routing,
            Request(
                method=request.method,
                raw_path=request.rel_url.raw_path,
                path=request.path,
                query=request.query,
                headers=request.headers,
                body=parse_body(raw),
            ),
        )
        if call.fault is not None and call.fault.delay > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(closing.wait(), timeout=call.fault.delay)
        reply = api.answer(call)
        if reply is None:
            return _drop(request)
        return web.Response(
            body=reply.body,
            status=reply.status,
            content_type=reply.content_type,
            headers=reply.headers,
        )

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_route("*", "/{path:.*}", handle)
    return app


def _drop(request: web.Request) -> web.StreamResponse:
    transport = request.transport
    if transport is not None:
        transport.close()
    # Never written: aiohttp finds the transport closing, takes it for a client
    # that went away, and drops the response without logging.
    return web.Response(status=500)
