"""Docs are code: every Python snippet in README.md and docs/ runs as pasted.

Each ```python block is written to a file of its own and run with a fresh
interpreter in an empty folder, the way a reader pastes it, with the
environment the docs tell a reader to set for trying things locally: a fake
Kling server run as its own process (``python -m kling_async.testing``) in
``KLING_BASE_URL`` with a key in ``KLING_API_KEY``, and ``REDIS_URL`` for the
scale-out pages. A snippet that rots fails here.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kling_async.testing import RedisServer, find_redis_server
from tests.helpers import API_KEY, FakeServerProcess, clean_env, fake_server_process

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def snippets() -> list[Any]:
    """Every ```python block of the pages, named by its page and line."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            name = f"{page.relative_to(ROOT)}:{line}"
            found.append(pytest.param(match.group(1), id=name))
    return found


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeServerProcess]:
    with fake_server_process("--task-duration", "0.3", "--processing-delay", "0.05") as server:
        yield server


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str | None]:
    if find_redis_server() is None:
        yield None
        return
    with RedisServer() as server:
        yield server.url


def test_the_docs_have_snippets() -> None:
    assert len(snippets()) >= 10


@pytest.mark.parametrize("snippet", snippets())
def test_snippet_runs_as_pasted(
    snippet: str, fake: FakeServerProcess, redis_url: str | None, tmp_path: Path
) -> None:
    if "redis" in snippet and redis_url is None:
        pytest.skip("no redis-server on this machine: apt-get install redis-server")
    script = tmp_path / "snippet.py"
    script.write_text(snippet, encoding="utf-8")
    env = clean_env(KLING_API_KEY=API_KEY, KLING_BASE_URL=fake.url)
    if redis_url is not None:
        env["REDIS_URL"] = redis_url
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
