"""Fixtures of the fake server's tests: servers with given options, a plain aiohttp
session, a loopback endpoint that collects callbacks."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from kling_async.testing import FakeKlingServer

from .helpers import Api, Receiver


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def serve(
    session: aiohttp.ClientSession,
) -> AsyncIterator[Callable[..., Awaitable[Api]]]:
    """Start servers with given options; all are closed after the test."""
    servers: list[FakeKlingServer] = []

    async def start(**options: Any) -> Api:
        server = FakeKlingServer(**options)
        await server.start()
        servers.append(server)
        return Api(session, server)

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def api(serve: Callable[..., Awaitable[Api]]) -> Api:
    return await serve()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hook/{token}", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    receiver.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook/secret-token"
    yield receiver
    await runner.cleanup()
