"""A real redis-server on a free loopback port for the scale-out tests, started
once per session and stopped after it. The tests skip, saying why, only when no
redis-server can be had (``apt-get install redis-server``; ``.ci/run`` installs it)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from kling_async.testing import RedisServer, find_redis_server

pytest.importorskip("redis", reason="the scale-out tests need the redis extra")

from redis.asyncio import Redis


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    if find_redis_server() is None:
        pytest.skip("no redis-server on this machine: apt-get install redis-server")
    with RedisServer() as server:
        yield server


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
def account_name() -> str:
    """A fresh account per test: tests share one server, never its keys."""
    return f"test-{uuid.uuid4().hex[:12]}"
