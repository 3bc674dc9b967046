"""Learned durations kept between runs (issue 26): a first round polled on the
learned schedule, a cache that is bounded, private to its API root, safe to
delete or corrupt, and never written where tests or users did not say."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from pathlib import Path

import pytest

from kling_async import PollPolicy, TaskStatus
from kling_async._durations import (
    MAX_CACHED_KINDS,
    WINDOW,
    DurationCache,
    DurationLearner,
    default_cache_path,
    scope_of,
)
from kling_async._journal import Journal, JournalDurations
from kling_async._models import Endpoint
from kling_async._schedule import PRIOR_STRETCH, Durations
from kling_async.testing import FakeKlingServer
from tests.helpers import API_KEY, make_client

#: The cold schedule polls every 0.05 s from the start; learning on, as by default.
POLICY = PollPolicy(initial_delay=0.05, max_delay=1.0, timeout=10.0)


async def learn_and_close(server: FakeKlingServer, cache: Path | bool, tasks: int = 4) -> None:
    async with make_client(server, polling=POLICY, durations_cache=cache) as client:
        for index in range(tasks):
            await (await client.images.generate(prompt=f"learn {index}"))


async def first_poll_after(server: FakeKlingServer, cache: Path | bool) -> float:
    """Seconds from a new client's first create to the first poll of its task."""
    async with make_client(server, polling=POLICY, durations_cache=cache) as client:
        before = len(server.requests_for("get"))
        handle = await client.images.generate(prompt="the first of a new run")
        created = time.monotonic()
        task = await handle
    assert task.status is TaskStatus.SUCCEED
    return server.requests_for("get")[before].arrived_at - created


async def test_a_new_client_polls_its_first_round_on_what_the_last_run_learned(
    tmp_path: Path,
) -> None:
    cache = tmp_path / "durations.json"
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.4, processing_delay=0.01) as server:
        await learn_and_close(server, cache)
        assert cache.exists()
        warm = await first_poll_after(server, cache)
        cold = await first_poll_after(server, False)
    # Nothing while it surely runs (its window opens ~0.35 s), where a client
    # with no history polls at once on the cold schedule.
    assert warm >= 0.3
    assert cold < 0.2


async def test_the_default_cache_is_in_the_user_cache_dir_and_can_be_turned_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    default = tmp_path / "xdg" / "kling-async" / "durations.json"
    assert default_cache_path() == default
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.1, processing_delay=0.01) as server:
        monkeypatch.setenv("KLING_DURATIONS_CACHE", "off")
        await learn_and_close(server, True, tasks=1)
        assert not default.exists()
        monkeypatch.delenv("KLING_DURATIONS_CACHE")
        await learn_and_close(server, False, tasks=1)
        assert not default.exists()
        await learn_and_close(server, True, tasks=1)
    assert default.exists()


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b"[1, 2]",
        b'{"format": 1, "kinds": []}',
        b"\xff\xfe\x00",
        b'{"format": 1, "kinds": {"[1]": {"seconds": ["x"]}, "nonsense": 3}}',
    ],
)
async def test_a_corrupt_cache_is_no_history_and_is_replaced(
    tmp_path: Path, content: bytes
) -> None:
    cache = tmp_path / "durations.json"
    cache.write_bytes(content)
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.1, processing_delay=0.01) as server:
        await learn_and_close(server, cache, tasks=1)
    recorded = json.loads(cache.read_text())
    assert recorded["format"] == 1
    assert len(recorded["kinds"]) == 1


async def test_an_unwritable_cache_breaks_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.1, processing_delay=0.01) as server:
        await learn_and_close(server, blocker / "durations.json", tasks=1)  # parent not a dir


def test_the_cache_is_bounded_and_private_to_its_api_root(tmp_path: Path) -> None:
    path = tmp_path / "durations.json"
    ours = DurationCache.for_base_url(path, "http://user:secret@127.0.0.1:8080/kling")
    theirs = DurationCache.for_base_url(path, "https://api.example.com")
    kind = ("images/generations", "kling-v3", 1, None, 0)
    theirs.save({kind: [5.0]})
    ours.save({("images/generations", f"model-{i}", 1, None, 0): [1.0] * 100 for i in range(250)})
    assert "secret" not in path.read_text()
    recorded = json.loads(path.read_text())["kinds"]
    assert len(recorded) == MAX_CACHED_KINDS
    assert all(len(entry["seconds"]) == WINDOW for entry in recorded.values())
    assert theirs.load() == {}  # the least recently written went first
    theirs.save({kind: [5.0, 6.0]})
    assert theirs.load() == {kind: [5.0, 6.0]}
    assert kind not in ours.load()
    assert os.listdir(tmp_path) == ["durations.json"]  # no temporary left behind


def test_a_file_written_before_duration_keys_reads_the_same(tmp_path: Path) -> None:
    # Kinds then began with the Endpoint member; the file held its path, which
    # is the endpoint's duration key: the learned history survives the change.
    cache = DurationCache(tmp_path / "durations.json", "http://127.0.0.1")
    cache.save({(Endpoint.OMNI_IMAGE, "kling-image-o1", 1, "2k", 1): [12.0, 14.0]})
    assert cache.load() == {("images/omni-image", "kling-image-o1", 1, "2k", 1): [12.0, 14.0]}
    learner = DurationLearner(cache)
    learned = learner.durations(Endpoint.OMNI_IMAGE, None)  # e.g. a task attached by id
    assert isinstance(learned, Durations)
    assert 12.0 < learned.median < 14.0


async def test_with_no_history_the_prior_defers_the_first_poll_not_the_end(
    tmp_path: Path,
) -> None:
    """Issue 26: a cold start uses the endpoint's prior. The first poll waits for
    the earliest end it allows (here PRIOR_STRETCH initial delays: a policy of
    0.1 s says tasks are short), where the cold schedule alone polled at 0.1 s;
    the task is still found as soon as the cold schedule would have found it."""
    policy = PollPolicy(initial_delay=0.1, max_delay=1.0, jitter=0.0, timeout=10.0)
    async with FakeKlingServer(
        api_key=API_KEY, task_duration=0.35, processing_delay=0.01
    ) as server:
        async with make_client(server, polling=policy, durations_cache=False) as client:
            handle = await client.images.generate(prompt="a first task, no history")
            created = time.monotonic()
            task = await handle
            found = time.monotonic()
        polls = [request.arrived_at - created for request in server.requests_for("get")]
    assert task.status is TaskStatus.SUCCEED
    assert polls[0] >= PRIOR_STRETCH * 0.1 - 0.01  # not at 0.1 s: no task can have ended
    # Cold polls were due at 0.1, 0.2, 0.3, 0.45: the prior drops the first only.
    assert len(polls) <= 3
    assert found - created < 0.6


# --- in the journal, when there is one ------------------------------------------------------


async def learn_in_journal(server: FakeKlingServer, journal: Path, tasks: int = 4) -> None:
    async with make_client(server, polling=POLICY, journal=journal) as client:
        for index in range(tasks):
            await (await client.images.generate(prompt=f"learn {index}"))


async def test_with_a_journal_the_durations_are_kept_in_it_not_in_the_user_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    journal = tmp_path / "run.db"
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.4, processing_delay=0.01) as server:
        await learn_in_journal(server, journal)
        async with make_client(server, polling=POLICY, journal=journal) as client:
            handle = await client.images.generate(prompt="the first of a new run")
            # Before any task of this run ended, the schedule is the learned one.
            learned = client._tracker.durations_for(handle._state)
            assert isinstance(learned, Durations)
            assert learned.samples == 4
            assert 0.3 < learned.median < 0.6
            await handle
    assert not (tmp_path / "xdg" / "kling-async" / "durations.json").exists()
    with sqlite3.connect(journal) as connection:
        (rows,) = connection.execute("SELECT count(*) FROM durations").fetchone()
    assert rows == 1  # one kind of task


async def test_journal_durations_follow_the_settings_that_turn_them_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = tmp_path / "run.db"
    cache = tmp_path / "durations.json"
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.1, processing_delay=0.01) as server:
        async with make_client(server, polling=POLICY, journal=journal, durations_cache=False) as c:
            await (await c.images.generate(prompt="not kept"))
        monkeypatch.setenv("KLING_DURATIONS_CACHE", "off")
        await learn_in_journal(server, journal, tasks=1)
        monkeypatch.delenv("KLING_DURATIONS_CACHE")
        # A path of the user's own is where they are kept, journal or not.
        async with make_client(server, polling=POLICY, journal=journal, durations_cache=cache) as c:
            await (await c.images.generate(prompt="kept in the file"))
    with sqlite3.connect(journal) as connection:
        assert connection.execute("SELECT count(*) FROM durations").fetchone() == (0,)
    assert cache.exists()


def test_the_journal_table_is_bounded_private_to_its_api_root_and_safe_to_empty(
    tmp_path: Path,
) -> None:
    path = tmp_path / "run.db"

    async def scenario() -> None:
        journal = Journal(path)
        ours = JournalDurations(journal, scope_of("http://user:secret@127.0.0.1:8080/kling"))
        theirs = JournalDurations(journal, scope_of("https://api.example.com"))
        kind = ("images/generations", "kling-v3", 1, None, 0)
        assert ours.load() == {}  # no journal file yet: no history
        theirs.save({kind: [5.0]})
        await journal.flush()
        ours.save({("images/generations", f"m-{i}", 1, None, 0): [1.0] * 100 for i in range(250)})
        await journal.flush()
        assert kind not in ours.load()
        assert theirs.load() == {}  # the least recently written went first
        with sqlite3.connect(path) as connection:
            seconds = [
                json.loads(text) for (text,) in connection.execute("SELECT seconds FROM durations")
            ]
            assert len(seconds) == MAX_CACHED_KINDS
            assert all(len(entry) == WINDOW for entry in seconds)
            assert "secret" not in str(connection.execute("SELECT key FROM durations").fetchall())
            connection.execute("DELETE FROM durations")  # safe: no history, nothing else
        assert ours.load() == {}
        await journal.close()

    asyncio.run(scenario())
