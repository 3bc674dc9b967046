"""The SQLite journal, client.resume() and batches that resume."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sqlite3
import stat
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import kling_async
from kling_async import (
    CallbackReceiver,
    ConcurrencyLimiter,
    EntryState,
    ImageGenerationRequest,
    Journal,
    LedgerEntry,
)
from kling_async import _journal as journal_module
from kling_async._models import Endpoint
from kling_async.testing import FakeKlingServer
from tests.helpers import API_KEY, as_generator, eventually, make_client


def entry(
    external_task_id: str, state: EntryState = EntryState.INTENDED, **fields: object
) -> LedgerEntry:
    return LedgerEntry(
        external_task_id=external_task_id,
        endpoint=Endpoint.GENERATIONS,
        body={
            "prompt": f"prompt of {external_task_id}",
            "model_name": "kling-v3",
            "n": 1,
            "aspect_ratio": "16:9",
            "external_task_id": external_task_id,
        },
        state=state,
        **fields,  # type: ignore[arg-type]
    )


async def create_on_server(server: FakeKlingServer, external_task_id: str) -> str:
    """A create that reached Kling from a process that then died."""
    body = {
        "prompt": f"prompt of {external_task_id}",
        "model_name": "kling-v3",
        "external_task_id": external_task_id,
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{server.url}/v1/images/generations",
            json=body,
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as response,
    ):
        data = await response.json()
    return str(data["data"]["task_id"])


# --- the journal itself -----------------------------------------------------------------


async def test_entries_survive_closing_and_reopening(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    journal = Journal(path)
    journal.record(entry("a"))
    journal.record(entry("b", EntryState.CREATED, task_id="t-b", key="batch#0#x"))
    journal.record(entry("a", EntryState.UNCERTAIN, error="no answer"))
    journal.record(entry("c", EntryState.TERMINAL, task_id="t-c", status="succeed"))
    await journal.flush()
    await journal.close()

    again = Journal(path)
    try:
        a = await again.get("a")
        assert a is not None
        assert a.state is EntryState.UNCERTAIN  # the later record replaced the earlier
        assert a.error == "no answer"
        assert a.body["prompt"] == "prompt of a"
        by_key = await again.by_key("batch#0#x")
        assert by_key is not None
        assert by_key.task_id == "t-b"
        assert {e.external_task_id for e in await again.unsettled()} == {"a", "b"}
        assert len(await again.entries()) == 3
        assert await again.get("missing") is None
    finally:
        await again.close()


def key_indexes(path: Path) -> dict[str, str]:
    with contextlib.closing(sqlite3.connect(path)) as connection:
        return dict(
            connection.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql LIKE '%(key)%'"
            ).fetchall()
        )


async def test_only_entries_with_a_key_are_indexed_by_key_in_old_journals_too(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.db"
    journal = Journal(path)
    journal.record(entry("a", key="batch#0#x"))
    journal.record(entry("b"))
    await journal.close()
    [(name, sql)] = key_indexes(path).items()
    assert "WHERE key IS NOT NULL" in sql
    with contextlib.closing(sqlite3.connect(path)) as connection:
        # As a journal made before (or opened since by a version before) has it:
        # the index of every entry.
        connection.execute(f"DROP INDEX {name}")
        connection.execute("CREATE INDEX IF NOT EXISTS entries_by_key ON entries (key)")
        connection.commit()
        [used] = connection.execute(
            f"EXPLAIN QUERY PLAN {journal_module._SELECT} WHERE key = 'x'"
        ).fetchall()
        assert "entries_by_key" in used[-1]
    assert list(key_indexes(path)) == ["entries_by_key"]
    again = Journal(path)
    try:
        found = await again.by_key("batch#0#x")
        assert found is not None
        assert found.external_task_id == "a"
        again.record(entry("c", key="batch#1#y"))
        assert (await again.by_key("batch#1#y")) is not None
        assert len(await again.entries()) == 3
    finally:
        await again.close()
    assert list(key_indexes(path)) == [name]  # the index of every entry is gone
    with contextlib.closing(sqlite3.connect(path)) as connection:
        [used] = connection.execute(
            f"EXPLAIN QUERY PLAN {journal_module._SELECT} WHERE key = 'x' "
            "ORDER BY intended_at DESC LIMIT 1"
        ).fetchall()[:1]
        assert name in used[-1]  # by_key's query uses the partial index


async def test_a_field_that_is_none_is_stored_as_null(tmp_path: Path) -> None:
    # Rows bind a NaN for None (cheaper to bind): the file must hold NULL, which
    # any reader of the file (SQL included) takes as "not known", never a number.
    path = tmp_path / "journal.db"
    journal = Journal(path)
    journal.record(entry("a"))
    await journal.flush()
    journal.record(entry("a", EntryState.CREATED, task_id="t-a"))  # its body left out
    await journal.flush()
    nullable = ("status", "error", "key", "owner", "estimate", "cost", "units_used", "batch")
    try:
        with contextlib.closing(sqlite3.connect(path)) as connection:
            types = connection.execute(
                f"SELECT {', '.join(f'typeof({name})' for name in nullable)}, "
                "typeof(task_id), typeof(body) FROM entries"
            ).fetchall()
        assert types == [("null",) * len(nullable) + ("text", "text")]
        found = await journal.get("a")
        assert found is not None
        assert (found.status, found.error, found.key, found.cost, found.units_used) == (None,) * 5
        assert found.task_id == "t-a"
        assert found.body["prompt"] == "prompt of a"
    finally:
        await journal.close()


async def test_the_file_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "journal.db"
    journal = Journal(path)
    journal.record(entry("a"))
    await journal.flush()
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        wal = path.with_name(path.name + "-wal")
        assert wal.exists()
        assert stat.S_IMODE(wal.stat().st_mode) == 0o600
    finally:
        await journal.close()


async def test_writes_do_not_block_the_loop_and_are_batched(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    try:
        started = time.perf_counter()
        for number in range(2000):
            journal.record(entry(f"e{number}"))
        queued = time.perf_counter() - started
        await journal.flush()
        assert len(await journal.entries()) == 2000
        assert queued < 1.0  # queueing 2,000 entries does no I/O on the loop
    finally:
        await journal.close()


async def test_records_made_while_the_writer_commits_are_all_written(tmp_path: Path) -> None:
    # Threads record (no loop: each record wakes the writer thread) while the
    # writer takes the pending entries for its commits. A record that chose the
    # pending dict before taking the lock put its entry into one a commit had
    # already taken: hundreds of 4,000 went missing, and the flush said all was
    # written. A short switch interval makes the threads interleave often.
    journal = Journal(tmp_path / "journal.db")
    switch_interval = sys.getswitchinterval()
    try:
        await journal.open()

        def record_many(thread: int) -> None:
            for number in range(1000):
                journal.record(entry(f"t{thread}-e{number}"))

        sys.setswitchinterval(1e-6)
        threads = [threading.Thread(target=record_many, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        sys.setswitchinterval(switch_interval)
        await journal.flush()
        assert len(await journal.entries()) == 4000
    finally:
        sys.setswitchinterval(switch_interval)
        await journal.close()


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
async def test_what_one_pass_of_the_loop_records_wakes_the_writer_thread_at_most_once(
    tmp_path: Path, synchronous: journal_module.Synchronous
) -> None:
    # With NORMAL a commit does no fsync: the loop makes it, and the creates
    # waiting on it never wait for the thread. With FULL the thread commits,
    # woken once for the creates started together (it then contends with the
    # loop for the interpreter).
    journal = Journal(tmp_path / "journal.db", synchronous=synchronous)
    handed: list[str] = []

    class Counting(queue.SimpleQueue[Any]):
        def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
            handed.append(item[0])
            super().put(item, block, timeout)

    journal._queue = Counting()
    try:
        await journal.open()
        handed.clear()
        for number in range(100):
            journal.record(entry(f"e{number}"))
        await journal.flush()  # as a create does: its intent, then the flush
        by_the_thread = synchronous == "FULL"
        assert handed == (["batch"] if by_the_thread else [])
        journal.record(entry("e0", EntryState.CREATED, task_id="t-0"))
        first = await journal.get("e0")  # in order: the read comes after the record
        assert handed == (["batch", "batch"] if by_the_thread else ["batch"])
        assert first is not None
        assert first.state is EntryState.CREATED
        assert len(await journal.entries()) == 100
    finally:
        await journal.close()


def test_a_commit_of_many_entries_runs_few_statements(tmp_path: Path) -> None:
    # The sqlite3 module lets go of the interpreter lock around each statement:
    # a commit of a hundred creates must not ask a busy loop for it back 100 times.
    connection = sqlite3.connect(tmp_path / "journal.db", isolation_level=None)
    connection.executescript(journal_module._SCHEMA)
    statements: list[str] = []
    connection.set_trace_callback(statements.append)
    rows = [journal_module._row(entry(f"e{number}")) for number in range(200)]
    journal_module._upsert_many(connection, rows)
    assert len(statements) <= 200 // journal_module._ROWS_PER_STATEMENT + 1
    # An update of an entry keeps its body, as one statement per entry did.
    later = entry("e7", EntryState.CREATED, task_id="t-7")
    journal_module._upsert_many(connection, [journal_module._row(later, with_body=False)])
    connection.set_trace_callback(None)
    assert connection.execute("SELECT count(*) FROM entries").fetchone() == (200,)
    state, body = connection.execute(
        "SELECT state, body FROM entries WHERE external_task_id = 'e7'"
    ).fetchone()
    assert state == EntryState.CREATED.value
    assert "prompt of e7" in body
    connection.close()


def test_a_journal_records_outside_an_event_loop_too(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    journal.record(entry("a"))

    async def read() -> LedgerEntry | None:
        try:
            return await journal.get("a")
        finally:
            await journal.close()

    found = asyncio.run(read())
    assert found is not None
    assert found.external_task_id == "a"


# --- where commits are made -------------------------------------------------------------


@contextlib.asynccontextmanager
async def writer_thread_held(journal: Journal) -> AsyncIterator[None]:
    """Keep the journal's thread busy, as a long read or a checkpoint would,
    until the block ends."""
    held, release = threading.Event(), threading.Event()
    serve = journal._serve

    def slow(connection: sqlite3.Connection, operations: list[Any]) -> bool:
        held.set()
        release.wait(HOLD_AT_MOST)
        return serve(connection, operations)

    journal._serve = slow  # type: ignore[method-assign]
    journal._queue.put(("wake", None, None))  # an operation it ignores, once served
    try:
        assert await asyncio.to_thread(held.wait, HOLD_AT_MOST)
        yield
    finally:
        release.set()
        journal._serve = serve  # type: ignore[method-assign]


# How long a held writer thread stays held if a test fails to let it go.
HOLD_AT_MOST = 10.0


def committed(path: Path, external_task_id: str) -> bool:
    """Whether the file holds the entry, as another connection sees it."""
    with contextlib.closing(sqlite3.connect(path, timeout=5)) as db:
        row = db.execute(
            "SELECT 1 FROM entries WHERE external_task_id = ?", (external_task_id,)
        ).fetchone()
    return row is not None


async def test_with_synchronous_normal_a_flush_does_not_wait_for_the_writer_thread(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.db"
    journal = Journal(path)
    await journal.open()
    try:
        async with writer_thread_held(journal):
            journal.record(entry("fox"))
            # Committed on the loop: no wait for the thread, even a busy one.
            await asyncio.wait_for(journal.flush(), 2.0)
            assert committed(path, "fox")
            durations = journal_module.JournalDurations(journal, "https://api.example")
            durations.save({("image", "kling-v1", 1): [12.5]})
            await eventually(lambda: bool(durations.load()))  # the loop's commit saves them too
    finally:
        await journal.close()


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
async def test_a_flush_waits_for_durations_saved_before_it(
    tmp_path: Path, synchronous: journal_module.Synchronous
) -> None:
    path = tmp_path / "journal.db"
    journal = Journal(path, synchronous=synchronous)
    await journal.open()
    try:
        durations = journal_module.JournalDurations(journal, "https://api.example")
        durations.save({("image", "kling-v1", 1): [12.5]})
        await journal.flush()
        with contextlib.closing(sqlite3.connect(path)) as db:
            assert db.execute("SELECT count(*) FROM durations").fetchone() == (1,)
    finally:
        await journal.close()


async def test_with_synchronous_full_the_writer_thread_commits(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    journal = Journal(path, synchronous="FULL")
    await journal.open()
    try:
        async with writer_thread_held(journal):
            journal.record(entry("fox"))
            flushing = asyncio.ensure_future(journal.flush())
            await asyncio.sleep(0.3)
            # A commit with an fsync is never made on the loop.
            assert not flushing.done()
            assert not committed(path, "fox")
        await asyncio.wait_for(flushing, 5.0)
        assert committed(path, "fox")
    finally:
        await journal.close()


@pytest.mark.parametrize(
    ("synchronous", "on_the_loop"), [("NORMAL", True), ("OFF", True), ("FULL", False)]
)
async def test_commits_are_made_on_the_loop_unless_they_fsync(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    synchronous: journal_module.Synchronous,
    on_the_loop: bool,
) -> None:
    threads: list[str] = []
    upsert_many = journal_module._upsert_many

    def watched(connection: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
        threads.append(threading.current_thread().name)
        upsert_many(connection, rows)

    monkeypatch.setattr(journal_module, "_upsert_many", watched)
    journal = Journal(tmp_path / "journal.db", synchronous=synchronous)
    await journal.open()
    try:
        for number in range(5):
            journal.record(entry(f"e{number}"))
            await journal.flush()
    finally:
        await journal.close()
    here = threading.current_thread().name
    assert len(threads) == 5
    assert all((name == here) is on_the_loop for name in threads), threads


async def test_a_pass_recording_many_entries_leaves_their_commit_to_the_writer_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A row costs about 20 us to commit: thousands recorded in one pass (a resume,
    # a sweep finding many tasks ended) would stall the event loop that long.
    threads: list[tuple[str, int]] = []
    upsert_many = journal_module._upsert_many

    def watched(connection: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
        threads.append((threading.current_thread().name, len(rows)))
        upsert_many(connection, rows)

    monkeypatch.setattr(journal_module, "_upsert_many", watched)
    journal = Journal(tmp_path / "journal.db")
    await journal.open()
    try:
        journal.record(entry("few"))
        await journal.flush()
        for number in range(journal_module._LOOP_COMMIT_ROWS + 1):
            journal.record(entry(f"many-{number}"))
        await journal.flush()
        assert len(await journal.entries()) == journal_module._LOOP_COMMIT_ROWS + 2
    finally:
        await journal.close()
    here = threading.current_thread().name
    assert threads[0] == (here, 1)
    assert all(name != here for name, _rows in threads[1:]), threads


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
async def test_a_read_sees_what_was_recorded_before_it(
    tmp_path: Path, synchronous: journal_module.Synchronous
) -> None:
    journal = Journal(tmp_path / "journal.db", synchronous=synchronous)
    try:
        for number in range(50):  # no flush: the read alone must see each record
            journal.record(entry(f"e{number}", EntryState.CREATED, task_id=f"t{number}"))
            found = await journal.get(f"e{number}")
            assert found is not None
            assert found.task_id == f"t{number}"
        assert len(await journal.unsettled()) == 50
    finally:
        await journal.close()


def wal_frames(path: Path) -> int:
    """How many frames the WAL beside ``path`` has room for (its size)."""
    wal = path.with_name(path.name + "-wal")
    size = wal.stat().st_size if wal.exists() else 0
    return max(0, size - 32) // (4096 + 24)


async def test_the_loop_never_checkpoints_and_the_writer_thread_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "_COMMIT_INTERVAL", 0.0, raising=False)
    monkeypatch.setattr(journal_module, "_CHECKPOINT_COMMITS", 20, raising=False)
    path = tmp_path / "journal.db"
    journal = Journal(path)
    await journal.open()

    def big(external_task_id: str) -> LedgerEntry:  # a page or more per commit
        return LedgerEntry(
            external_task_id=external_task_id,
            endpoint=Endpoint.GENERATIONS,
            body={"prompt": "x" * 3000},
        )

    try:
        async with writer_thread_held(journal):
            for number in range(1200):
                journal.record(big(f"held-{number}"))
                await journal.flush()
            # 1,200 commits of a page or more, no checkpoint (SQLite's own would
            # have run at 1,000 pages, and the WAL would have started over).
            assert wal_frames(path) >= 1200
        high_water = wal_frames(path)
        largest = 0
        for number in range(1200):
            journal.record(big(f"free-{number}"))
            await journal.flush()
            largest = max(largest, wal_frames(path) - high_water)
        # Checkpointed every 20 commits: the WAL is reused from its start, it
        # does not grow by another 1,200 commits. (How far it grows before the
        # thread's first checkpoint depends on when the thread gets the CPU: under
        # load it passed 600 frames.)
        assert largest < 1200
    finally:
        await journal.close()
    assert wal_frames(path) == 0  # all in the file at close
    assert len(await _entries_of(path)) == 2400


async def _entries_of(path: Path) -> list[LedgerEntry]:
    again = Journal(path)
    try:
        return await again.entries()
    finally:
        await again.close()


def test_a_journal_keeps_working_on_one_event_loop_after_another(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    journal = Journal(path)

    async def first() -> None:
        journal.record(entry("a"))
        await journal.flush()
        journal.record(entry("a", EntryState.CREATED, task_id="t-a"))  # left to the next loop

    async def second() -> LedgerEntry | None:
        journal.record(entry("b"))
        await journal.flush()
        assert committed(path, "b")
        return await journal.get("a")

    asyncio.run(first())
    found = asyncio.run(second())
    assert found is not None
    assert found.task_id == "t-a"
    asyncio.run(journal.close())


def test_a_journal_works_on_two_event_loops_at_once(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    journal = Journal(path)

    async def creates(side: str) -> None:
        for number in range(200):
            journal.record(entry(f"{side}-{number}"))
            await journal.flush()
            if number % 50 == 0:
                assert committed(path, f"{side}-{number}")

    failures: list[BaseException] = []

    def on_another_loop() -> None:
        try:
            asyncio.run(creates("thread"))
        except BaseException as error:
            failures.append(error)

    other = threading.Thread(target=on_another_loop)
    other.start()
    asyncio.run(creates("main"))
    other.join(30)
    assert not other.is_alive()
    assert failures == []

    async def count() -> int:
        try:
            return len(await journal.entries())
        finally:
            await journal.close()

    assert asyncio.run(count()) == 400


class HeldAt:
    """Holds the thread named ``name`` the first time it calls this, until let go:
    forces one interleaving of that thread with a close made meanwhile."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.reached, self.go = threading.Event(), threading.Event()
        self._armed = True

    def __call__(self) -> None:
        if threading.current_thread().name == self.name and self._armed:
            self._armed = False
            self.reached.set()
            self.go.wait(HOLD_AT_MOST)


class LockHeldAt:
    """A journal's _lock whose taking holds a thread (see HeldAt)."""

    def __init__(self, lock: Any, hold: HeldAt) -> None:
        self.lock, self.hold = lock, hold

    def __enter__(self) -> bool:
        self.hold()
        return bool(self.lock.__enter__())

    def __exit__(self, *exc: object) -> None:
        self.lock.__exit__(*exc)


def outcome_on_a_thread(name: str, call: Any) -> tuple[threading.Thread, list[str]]:
    """Run ``call()`` (a coroutine) on a loop of its own in the thread ``name``:
    its outcome is "answered", "refused" (a JournalError) or "hung" (3 s)."""
    outcome: list[str] = []

    async def run() -> None:
        try:
            await asyncio.wait_for(call(), 3.0)
            outcome.append("answered")
        except TimeoutError:
            outcome.append("hung")
        except kling_async.JournalError:
            outcome.append("refused")

    thread = threading.Thread(target=lambda: asyncio.run(run()), name=name)
    thread.start()
    return thread, outcome


def test_a_read_handed_over_while_another_thread_closes_is_answered(tmp_path: Path) -> None:
    # Loop B takes its read off the pending ones at the end of its pass; the
    # main thread closes the journal before B hands the read over (held here,
    # as a busy interpreter could hold it): the writer thread had served the
    # close and ended, and the read waited for ever on a queue nobody read.
    journal = Journal(tmp_path / "journal.db")
    asyncio.run(journal.open())
    hold = HeldAt("B")
    commit_here = journal._commit_here

    def held() -> bool:
        hold()
        return commit_here()

    journal._commit_here = held  # type: ignore[method-assign]

    async def read() -> LedgerEntry | None:
        journal.record(entry("b"))  # a commit for the end of this pass to make
        return await journal.get("b")

    thread, outcome = outcome_on_a_thread("B", read)
    try:
        assert hold.reached.wait(HOLD_AT_MOST)
        asyncio.run(asyncio.wait_for(journal.close(), HOLD_AT_MOST))
    finally:
        hold.go.set()
        thread.join(HOLD_AT_MOST)
    assert outcome == ["refused"]


def test_a_flush_made_while_another_thread_closes_is_answered(tmp_path: Path) -> None:
    # Loop B's flush looks whether the journal is closed, then (held here) the
    # main thread closes it, and a record from thread C that had looked too
    # lands after the close's commit: B's flush then waited for a commit by a
    # writer thread that had ended.
    journal = Journal(tmp_path / "journal.db")
    asyncio.run(journal.open())
    hold_b, hold_c = HeldAt("B"), HeldAt("C")
    start = journal._start

    def held_start() -> None:
        hold_c()
        start()

    journal._start = held_start  # type: ignore[method-assign]
    recording = threading.Thread(target=lambda: journal.record(entry("c")), name="C")
    recording.start()
    journal._lock = LockHeldAt(journal._lock, hold_b)  # type: ignore[assignment]
    flushing, outcome = outcome_on_a_thread("B", journal.flush)
    try:
        assert hold_c.reached.wait(HOLD_AT_MOST)
        assert hold_b.reached.wait(HOLD_AT_MOST)
        asyncio.run(asyncio.wait_for(journal.close(), HOLD_AT_MOST))
        hold_c.go.set()
        recording.join(HOLD_AT_MOST)
    finally:
        hold_c.go.set()
        hold_b.go.set()
        flushing.join(HOLD_AT_MOST)
    assert outcome == ["refused"]  # C's entry came after the close: not written


async def test_a_flush_after_a_close_fails_for_what_was_not_committed(tmp_path: Path) -> None:
    # A create still running after its journal closed records its intent, which
    # is not written: its flush returned at once, as if it had been, and the
    # create went out with no intent in the file.
    path = tmp_path / "closed.db"
    closed = Journal(path)
    closed.record(entry("before"))
    await closed.close()
    await closed.flush()  # all recorded before the close is committed
    closed.record(entry("after"))
    with pytest.raises(
        kling_async.JournalError, match="closed with 1 of the records made not committed"
    ):
        await closed.flush()
    assert committed(path, "before")
    assert not committed(path, "after")
    # Recorded while the close waits for the writer thread: the close's commit
    # must not count it among what it committed.
    racing = Journal(tmp_path / "racing.db")
    await racing.open()
    async with writer_thread_held(racing):
        closing = asyncio.create_task(racing.close())
        await asyncio.sleep(0)  # closed, waiting for the writer thread
        racing.record(entry("during"))
    await closing
    with pytest.raises(kling_async.JournalError, match="closed with 1 of the records"):
        await racing.flush()
    never_opened = Journal(tmp_path / "never.db")
    await never_opened.close()
    never_opened.record(entry("after"))
    with pytest.raises(kling_async.JournalError):
        await never_opened.flush()
    # An abandoned journal (a crash) lost what it had not committed: later calls fail.
    abandoned = Journal(tmp_path / "abandoned.db")
    abandoned.record(entry("committed"))
    await abandoned.flush()
    abandoned.record(entry("lost"))
    abandoned._abandon()
    with pytest.raises(kling_async.JournalError):
        await abandoned.flush()
    await abandoned.close()


async def test_records_from_another_thread_are_committed(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    journal = Journal(path)
    await journal.open()
    try:
        await asyncio.to_thread(journal.record, entry("from-a-thread"))
        await eventually(lambda: committed(path, "from-a-thread"))
        await asyncio.to_thread(journal.record, entry("then-flushed"))
        await journal.flush()
        assert committed(path, "then-flushed")
    finally:
        await journal.close()


async def test_a_journal_that_cannot_be_opened_refuses_every_create(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    async with FakeKlingServer(api_key=API_KEY) as server:
        with pytest.raises(kling_async.JournalError):  # async with: refused on entry
            async with make_client(server, journal=blocker / "journal.db"):
                pass
        client = make_client(server, journal=blocker / "journal.db")  # without: at the create
        try:
            with pytest.raises(kling_async.KlingError):
                await client.images.generate(prompt="p")
        finally:
            await client.close()
        assert server.requests_for("create") == []  # no intent on record, nothing sent


# --- a client with a journal ------------------------------------------------------------------


async def test_a_create_is_journaled_from_intent_to_result_and_download(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    async with FakeKlingServer(api_key=API_KEY) as server:
        async with make_client(server, journal=path) as client:
            handle = await client.images.generate(prompt="a fox", n=2)
            task = await handle
            paths = await client.download(task, tmp_path / "out")
    journal = Journal(path)
    try:
        recorded = await journal.get(str(handle.external_task_id))
        assert recorded is not None
        assert recorded.state is EntryState.TERMINAL
        assert recorded.task_id == task.task_id
        assert recorded.status == "succeed"
        assert [image.url for image in recorded.images] == [image.url for image in task.images]
        assert recorded.downloaded == tuple(str(p) for p in paths)
        assert await journal.unsettled() == []
    finally:
        await journal.close()


async def test_the_journal_holds_no_credential(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    receiver = CallbackReceiver("https://hooks.example.com/kling", secret="x" * 32)
    async with FakeKlingServer(api_key=API_KEY) as server:
        async with make_client(server, journal=path, callbacks=receiver) as client:
            handle = await client.images.generate(prompt="a fox")
    token = receiver.token_for(str(handle.external_task_id))
    data = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("journal"))
    assert handle.external_task_id is not None
    assert handle.external_task_id.encode() in data  # the file was read whole
    assert API_KEY.encode() not in data
    assert token.encode() not in data
    assert b"hooks.example.com" not in data


# --- resume ---------------------------------------------------------------------------


async def test_resume_settles_every_kind_of_unfinished_entry(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.2) as server:
        running = await create_on_server(server, "created-before-crash")
        await create_on_server(server, "landed-unanswered")
        journal = Journal(path)
        journal.record(entry("created-before-crash", EntryState.CREATED, task_id=running))
        journal.record(entry("landed-unanswered", EntryState.SENT))
        journal.record(entry("never-sent", EntryState.INTENDED))
        journal.record(entry("answer-lost", EntryState.UNCERTAIN))
        journal.record(entry("refused", EntryState.NOT_CREATED))
        journal.record(entry("done", EntryState.TERMINAL, task_id="t-done", status="succeed"))
        await journal.close()

        async with make_client(server, journal=path) as client:
            handles = await client.resume()
            tasks = await asyncio.gather(*(handle.wait() for handle in handles))
        by_external = {handle.external_task_id: handle for handle in handles}
        assert set(by_external) == {
            "created-before-crash",
            "landed-unanswered",
            "never-sent",
            "answer-lost",
        }
        assert by_external["created-before-crash"].task_id == running
        assert all(task.status is kling_async.TaskStatus.SUCCEED for task in tasks)
        # Only what Kling did not have was sent, under its own id; nothing twice.
        # (the first two creates are the dead process's own)
        sent = sorted(str(r.external_task_id) for r in server.requests_for("create"))
        assert sent == ["answer-lost", "created-before-crash", "landed-unanswered", "never-sent"]
        assert len(server.tasks) == 4
    journal = Journal(path)
    try:
        assert await journal.unsettled() == []
    finally:
        await journal.close()


async def test_resume_leaves_what_it_cannot_settle_in_the_journal(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    journal = Journal(path)
    journal.record(entry("answer-lost", EntryState.SENT))
    await journal.close()
    async with FakeKlingServer(api_key=API_KEY) as server:
        server.inject("drop", route="get", times=None)  # Kling unreachable for lookups
        retry = kling_async.RetryPolicy(initial_delay=0.01, max_delay=0.02, max_attempts=2)
        async with make_client(server, journal=path, retry=retry) as client:
            assert await client.resume() == []
        assert server.requests_for("create") == []  # never sent blindly
    journal = Journal(path)
    try:
        (left,) = await journal.unsettled()
        assert left.external_task_id == "answer-lost"
        assert left.state is EntryState.UNCERTAIN
    finally:
        await journal.close()


async def test_resumed_running_tasks_hold_their_units(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.3) as server:
        running = await create_on_server(server, "big")
        journal = Journal(path)
        journal.record(entry("big", EntryState.CREATED, task_id=running, units=4))
        await journal.close()
        limiter = ConcurrencyLimiter(4, min_cooldown=0.02)
        async with make_client(server, journal=path, max_concurrency=limiter) as client:
            (handle,) = await client.resume()
            assert limiter.in_use == 4
            await handle
            await eventually(lambda: limiter.in_use == 0)


# --- batches that resume ----------------------------------------------------------------


def prompts(count: int) -> list[ImageGenerationRequest]:
    return [ImageGenerationRequest(prompt=f"line {i}") for i in range(count)]


async def test_a_batch_run_again_skips_what_is_done_and_creates_nothing_twice(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.db"
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.2) as server:
        async with make_client(server, max_concurrency=ConcurrencyLimiter(4)) as client:
            first = client.batch(prompts(12), journal=path, name="prompts.jsonl")
            async with contextlib.aclosing(as_generator(first.__aiter__())) as results:
                async for _ in results:
                    if first.finished == 3:
                        break  # like Ctrl-C: some done, some running, some never sent
        created_first = len(server.tasks)
        assert 3 <= created_first < 12

        async with make_client(server, max_concurrency=ConcurrencyLimiter(4)) as client:
            resumed = await client.batch(prompts(12), journal=path, name="prompts.jsonl").collect()
        assert [r.index for r in resumed] == list(range(12))
        assert all(r.ok for r in resumed)
        assert sum(r.resumed for r in resumed) >= 3
        assert len(server.tasks) == 12  # one task per line
        assert sorted(str(t.prompt) for t in server.tasks.values()) == sorted(
            f"line {i}" for i in range(12)
        )

        async with make_client(server) as client:  # a third run sends nothing at all
            again = await client.batch(prompts(12), journal=path, name="prompts.jsonl").collect()
        assert all(r.resumed and r.ok for r in again)
        assert sum(r.code == 0 for r in server.requests_for("create")) == 12


async def test_an_edited_line_is_a_new_request(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.05) as server:
        async with make_client(server) as client:
            await client.batch(prompts(3), journal=path).collect()
            changed = [*prompts(2), ImageGenerationRequest(prompt="line 2, edited")]
            results = await client.batch(changed, journal=path).collect()
        assert [r.resumed for r in results] == [True, True, False]
        assert len(server.tasks) == 4


async def test_the_same_lines_in_another_batch_name_are_new_requests(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.05) as server:
        async with make_client(server) as client:
            await client.batch(prompts(2), journal=path, name="a").collect()
            results = await client.batch(prompts(2), journal=path, name="b").collect()
        assert not any(r.resumed for r in results)
        assert len(server.tasks) == 4


def test_journal_rejects_an_unknown_synchronous_mode(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        Journal(tmp_path / "j.db", synchronous="SOMETIMES")  # type: ignore[arg-type]


def test_a_journal_path_is_private_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        asyncio.run(_write_one(tmp_path / "j.db"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "j.db").stat().st_mode) == 0o600


async def _write_one(path: Path) -> None:
    journal = Journal(path)
    journal.record(entry("a"))
    await journal.close()
