"""Shared fixtures: a fake Kling server on loopback and a client pointed at it."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
from hypothesis import settings

from kling_async import Client, PollPolicy, RetryPolicy
from kling_async.testing import FakeKlingServer

# Hypothesis profiles: "ci" for every run of the suite, "fuzz" for the dedicated
# run of 10,000 examples per property (HYPOTHESIS_PROFILE=fuzz; see tests/test_fuzz.py).
settings.register_profile("ci", max_examples=200, deadline=None)
settings.register_profile("fuzz", max_examples=10_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

API_KEY = "sk-test-0123456789"
FAST_POLL = PollPolicy(initial_delay=0.02, max_delay=0.1, timeout=10.0)
FAST_RETRY = RetryPolicy(initial_delay=0.01, max_delay=0.05, max_attempts=4, max_elapsed=10.0)


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never pick up a developer's real keys or base URL from the environment."""
    for name in (
        "KLING_API_KEY",
        "KLING_ACCESS_KEY",
        "KLING_SECRET_KEY",
        "KLING_BASE_URL",
        "KLING_CALLBACK_SECRET",
        "KLING_WEBHOOK_SECRET",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _private_cache_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The CLI's offline simulation keeps its tasks in the user's cache directory:
    each test gets its own (subprocesses inherit it), never the real one."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
async def server() -> AsyncIterator[FakeKlingServer]:
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.15, processing_delay=0.03) as fake:
        yield fake


def make_client(server: FakeKlingServer, **options: object) -> Client:
    """A client for ``server`` with fast polling and retries unless overridden."""
    settings: dict[str, object] = {
        "api_key": API_KEY,
        "base_url": server.url,
        "polling": FAST_POLL,
        "retry": FAST_RETRY,
    }
    settings.update(options)
    return Client(**settings)  # type: ignore[arg-type]


@pytest.fixture
async def client(server: FakeKlingServer) -> AsyncIterator[Client]:
    async with make_client(server) as kling:
        yield kling
