"""Shared fixtures (a fake Kling server on loopback and a client pointed at it) and the
hypothesis profiles. Plain helpers are in ``tests/helpers.py``."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
from hypothesis import settings

from kling_async import Client
from kling_async.testing import FakeKlingServer
from tests.helpers import API_KEY, make_client

# Hypothesis profiles: "ci" for every run of the suite, "fuzz" for the dedicated
# run of 10,000 examples per property (HYPOTHESIS_PROFILE=fuzz; see tests/test_fuzz.py).
settings.register_profile("ci", max_examples=200, deadline=None)
settings.register_profile("fuzz", max_examples=10_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


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


@pytest.fixture
async def client(server: FakeKlingServer) -> AsyncIterator[Client]:
    async with make_client(server) as kling:
        yield kling
