"""The journal under faults: a writer that fails, commits that fail, a file that
cannot be opened, memory over many tasks, and the journal's one owner."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from click.testing import CliRunner

import kling_async
from kling_async import (
    EntryState,
    ImageGenerationRequest,
    Journal,
    JournalError,
    JournalInUseError,
    LedgerEntry,
    MultiImageRequest,
    ValidationError,
)
from kling_async import _journal as journal_module
from kling_async._cli import main
from kling_async._models import Endpoint
from kling_async.testing import FakeKlingServer
from tests.helpers import API_KEY, eventually, make_client

CLI = [sys.executable, "-m", "kling_async", "--mock-task-seconds", "0.1"]
# A journal refused or failing answers at once; this only bounds a hang.
ANSWER_WITHIN = 5.0


def entry(
    external_task_id: str, state: EntryState = EntryState.INTENDED, **fields: object
) -> LedgerEntry:
    return LedgerEntry(
        external_task_id=external_task_id,
        endpoint=Endpoint.GENERATIONS,
        body={"prompt": f"prompt of {external_task_id}", "external_task_id": external_task_id},
        state=state,
        **fields,  # type: ignore[arg-type]
    )


def row(path: Path, external_task_id: str) -> tuple[str, str | None] | None:
    """The entry's state and body as the file holds them, read by another connection."""
    db = sqlite3.connect(path, timeout=2)
    try:
        found: tuple[str, str | None] | None = db.execute(
            "SELECT state, body FROM entries WHERE external_task_id = ?", (external_task_id,)
        ).fetchone()
    finally:
        db.close()
    return found


# --- text SQLite cannot store -----------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: ImageGenerationRequest(prompt="a fox \ud800"), "prompt"),
        (
            lambda: ImageGenerationRequest(prompt="a fox", negative_prompt="\udce9"),
            "negative_prompt",
        ),
        (
            lambda: ImageGenerationRequest(prompt="a fox", external_task_id="id-\udce9"),
            "external_task_id",
        ),
        (lambda: MultiImageRequest(subject_images=["a", "b"], prompt="x\ud800"), "prompt"),
    ],
)
def test_text_with_a_lone_surrogate_is_refused_naming_the_field(build: object, field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        build()  # type: ignore[operator]
    assert caught.value.field == field
    assert "surrogate" in caught.value.rule


async def test_a_prompt_with_a_lone_surrogate_is_refused_and_the_client_keeps_working(
    tmp_path: Path,
) -> None:
    async with FakeKlingServer(api_key=API_KEY) as server:
        async with make_client(server, journal=tmp_path / "journal.db") as client:
            with pytest.raises(ValidationError, match="prompt"):
                await asyncio.wait_for(client.images.generate(prompt="a fox \ud800"), ANSWER_WITHIN)
            handle = await asyncio.wait_for(client.images.generate(prompt="a fox"), ANSWER_WITHIN)
            await handle
        assert [r.body["prompt"] for r in server.requests_for("create")] == ["a fox"]


# --- a writer that fails ----------------------------------------------------------------


async def test_an_entry_sqlite_cannot_store_fails_its_flush_not_the_journal(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.db"
    journal = Journal(path)
    try:
        # A key from a file name that is not UTF-8: not a sqlite3.Error when written.
        journal.record(entry("bad", key="caf\udce9.jsonl#1"))
        with pytest.raises(JournalError) as caught:
            await asyncio.wait_for(journal.flush(), ANSWER_WITHIN)
        assert isinstance(caught.value.__cause__, UnicodeError)
        # Given up once reported: the journal goes on.
        journal.record(entry("good"))
        await asyncio.wait_for(journal.flush(), ANSWER_WITHIN)
        assert await journal.get("good") is not None
    finally:
        await asyncio.wait_for(journal.close(), ANSWER_WITHIN)


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
async def test_entries_committed_beside_one_sqlite_cannot_store_are_written_at_once(
    tmp_path: Path, synchronous: journal_module.Synchronous
) -> None:
    # The bad entry is given up; the others in its commit were kept "for the
    # next commit", which a close (or a process that records nothing more)
    # never makes: they were lost, the created state of a task among them.
    path = tmp_path / "journal.db"
    journal = Journal(path, synchronous=synchronous)
    await journal.open()
    journal.record(entry("task", EntryState.CREATED, task_id="t-1"))
    journal.record(entry("bad", key="caf\udce9.jsonl#1"))
    journal.record(entry("other"))
    await asyncio.wait_for(journal.close(), ANSWER_WITHIN)
    states = {name: row(path, name) for name in ("task", "other", "bad")}
    assert {name: found and found[0] for name, found in states.items()} == {
        "task": "created",
        "other": "intended",
        "bad": None,
    }


async def test_an_integer_sqlite_cannot_store_fails_one_flush_not_every_later_one(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path / "journal.db")
    try:
        journal.record(entry("huge", units_used=2**70))
        journal.record(entry("good"))
        with pytest.raises(JournalError, match="given up"):
            await asyncio.wait_for(journal.flush(), ANSWER_WITHIN)
        journal.record(entry("later"))
        await asyncio.wait_for(journal.flush(), ANSWER_WITHIN)
        assert await journal.get("good") is not None
        assert await journal.get("huge") is None
    finally:
        await asyncio.wait_for(journal.close(), ANSWER_WITHIN)


async def test_an_entry_given_up_when_no_flush_waited_fails_the_next_flush_once(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path / "journal.db")
    try:
        journal.record(entry("bad", key="caf\udce9.jsonl#1"))
        journal.record(entry("good"))
        await asyncio.wait_for(journal.get("good"), ANSWER_WITHIN)  # committed, bad given up
        # Recorded before this flush and never to be written: it says so.
        with pytest.raises(JournalError, match="given up") as caught:
            await asyncio.wait_for(journal.flush(), ANSWER_WITHIN)
        assert isinstance(caught.value.__cause__, UnicodeError)
        await asyncio.wait_for(journal.flush(), ANSWER_WITHIN)  # once
    finally:
        await asyncio.wait_for(journal.close(), ANSWER_WITHIN)


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
async def test_a_commit_that_breaks_fails_every_waiting_and_later_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synchronous: journal_module.Synchronous
) -> None:
    # NORMAL: the loop commits; FULL: the writer thread does.
    journal = Journal(tmp_path / "journal.db", synchronous=synchronous)
    await journal.open()

    def broken(*_: object, **__: object) -> bool:
        raise RuntimeError("a bug in the writer")

    monkeypatch.setattr(journal, "_commit", broken)
    journal.record(entry("a"))
    calls = [journal.flush(), journal.get("a"), journal.unsettled()]
    outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), ANSWER_WITHIN)
    for outcome in outcomes:
        assert isinstance(outcome, JournalError)
        assert isinstance(outcome.__cause__, RuntimeError)
    assert len({id(outcome) for outcome in outcomes}) == 3  # one error per call
    with pytest.raises(JournalError):
        await asyncio.wait_for(journal.by_key("k"), ANSWER_WITHIN)
    journal.record(entry("b"))
    with pytest.raises(JournalError) as later:
        await asyncio.wait_for(journal.flush(), ANSWER_WITHIN)
    assert isinstance(later.value.__cause__, RuntimeError)
    await asyncio.wait_for(journal.close(), ANSWER_WITHIN)


async def test_a_writer_thread_that_fails_fails_every_later_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal(tmp_path / "journal.db")
    await journal.open()

    def broken(*_: object) -> bool:
        raise RuntimeError("a bug in the writer")

    monkeypatch.setattr(journal, "_serve", broken)
    journal.record(entry("a"))
    calls = [journal.get("a"), journal.unsettled()]
    outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), ANSWER_WITHIN)
    for outcome in outcomes:
        assert isinstance(outcome, JournalError)
        assert isinstance(outcome.__cause__, RuntimeError)
    journal.record(entry("b"))
    with pytest.raises(JournalError) as later:
        await asyncio.wait_for(journal.flush(), ANSWER_WITHIN)
    assert isinstance(later.value.__cause__, RuntimeError)
    await asyncio.wait_for(journal.close(), ANSWER_WITHIN)


# --- commits that fail ------------------------------------------------------------------


@pytest.fixture
def short_busy_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit gives up on a held write lock after 50 ms, not 10 s."""
    monkeypatch.setattr(journal_module, "_BUSY_TIMEOUT_MS", 50)


@pytest.mark.usefixtures("short_busy_timeout")
async def test_flush_fails_until_what_was_recorded_before_it_is_committed(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.db"
    journal = Journal(path)
    journal.record(entry("warm-up", EntryState.NOT_CREATED))
    await journal.flush()
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # another writer holds the file
    try:
        journal.record(entry("fox"))
        with pytest.raises(JournalError, match="not committed") as first:
            await journal.flush()
        assert isinstance(first.value.__cause__, sqlite3.OperationalError)
        # The next flush has nothing new to write: it still fails, the intent is not in.
        with pytest.raises(JournalError, match="not committed"):
            await journal.flush()
        assert row(path, "fox") is None
    finally:
        locker.execute("COMMIT")
        locker.close()
    journal.record(entry("fox", EntryState.CREATED, task_id="task-1"))
    await journal.flush()
    state, body = row(path, "fox") or ("missing", None)
    assert state == "created"
    assert body is not None  # the first row committed carries the body
    assert "prompt of fox" in body
    await journal.close()


# --- a journal that cannot be opened ----------------------------------------------------


async def test_a_refused_journal_gives_each_call_its_own_error_chained_to_the_cause(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.db"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")  # written by a newer version
    db.commit()
    db.close()
    journal = Journal(path)
    errors: list[JournalError] = []
    for _ in range(50):
        with pytest.raises(JournalError) as caught:
            await asyncio.wait_for(journal.get("x"), ANSWER_WITHIN)
        errors.append(caught.value)
    assert len({id(error) for error in errors}) == len(errors)
    assert all("newer kling_async" in str(error.__cause__) for error in errors)
    sizes = {len(traceback.extract_tb(error.__traceback__)) for error in errors}
    assert len(sizes) == 1  # the traceback does not grow with every call
    await asyncio.wait_for(journal.close(), ANSWER_WITHIN)


# --- memory -----------------------------------------------------------------------------


async def test_memory_does_not_grow_with_ended_tasks(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    per_round = 10_000
    tracemalloc.start()
    try:
        traced = []
        for number in range(3):
            for i in range(per_round):
                intent = entry(f"{number:02d}-{i:030d}")
                journal.record(intent)
                journal.record(intent.moved(EntryState.TERMINAL, task_id=f"t{i}"))
            await journal.flush()
            # A second flush is served after the writer let go of the first's batch.
            await journal.flush()
            traced.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
        await journal.close()
    # 20,000 more ended tasks: an id kept for each would be well over a megabyte.
    assert traced[-1] - traced[0] < 500_000


# --- one owner --------------------------------------------------------------------------

HOLDER = """
import asyncio, sys
from kling_async import EntryState, Journal, LedgerEntry
from kling_async._models import Endpoint

async def main():
    journal = Journal(sys.argv[1])
    journal.record(LedgerEntry(external_task_id="held", endpoint=Endpoint.GENERATIONS,
                               body={"prompt": "p"}, state=EntryState.CREATED, task_id="t"))
    await journal.flush()
    print("owned", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    await journal.close()

asyncio.run(main())
"""


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process that owns ``tmp_path/out/kling-journal.db`` until its stdin closes."""
    path = tmp_path / "out" / "kling-journal.db"
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "owned"
    try:
        yield process
    finally:
        process.kill()
        process.wait(10)
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()


def journal_of(tmp_path: Path) -> Path:
    return tmp_path / "out" / "kling-journal.db"


async def test_a_journal_in_use_by_another_process_is_refused_at_once_naming_it(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    journal = Journal(journal_of(tmp_path))
    started = time.monotonic()
    with pytest.raises(JournalInUseError) as caught:
        await asyncio.wait_for(journal.open(), ANSWER_WITHIN)
    assert time.monotonic() - started < 1.0
    error = caught.value
    assert (error.pid, error.host) == (holder.pid, socket.gethostname())
    assert error.since is not None
    assert error.since <= time.time()
    assert f"process {holder.pid} on {socket.gethostname()} since" in str(error)
    # Every call is refused the same way, and nothing is written.
    with pytest.raises(JournalInUseError):
        await journal.get("held")
    journal.record(entry("mine"))
    with pytest.raises(JournalInUseError):
        await journal.flush()
    await asyncio.wait_for(journal.close(), ANSWER_WITHIN)
    assert row(journal_of(tmp_path), "mine") is None


async def test_a_journal_waits_for_its_owner_when_asked(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    journal = Journal(journal_of(tmp_path), wait=math.inf)
    opening = asyncio.ensure_future(journal.open())
    await asyncio.sleep(0.2)
    assert not opening.done()
    assert holder.stdin is not None
    holder.stdin.close()  # the owner closes its journal
    await asyncio.wait_for(opening, ANSWER_WITHIN)
    held = await journal.get("held")
    assert held is not None
    assert held.task_id == "t"
    await journal.close()


async def test_a_journal_waiting_for_its_owner_still_closes(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    journal = Journal(journal_of(tmp_path), wait=math.inf)
    opening = asyncio.ensure_future(journal.open())
    await asyncio.sleep(0.1)
    await asyncio.wait_for(journal.close(), ANSWER_WITHIN)
    with pytest.raises(JournalInUseError):
        await asyncio.wait_for(opening, ANSWER_WITHIN)


async def test_an_owner_that_died_is_taken_over(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    holder.kill()  # SIGKILL: it never closed the journal
    holder.wait(10)
    journal = Journal(journal_of(tmp_path))
    try:
        await asyncio.wait_for(journal.open(), ANSWER_WITHIN)
        held = await journal.get("held")
        assert held is not None
        assert held.task_id == "t"
    finally:
        await journal.close()


async def test_two_journals_on_one_file_in_one_process_have_one_owner(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    first = Journal(path)
    await first.open()
    second = Journal(path)
    with pytest.raises(JournalInUseError, match="this process") as caught:
        await second.open()
    assert caught.value.pid == os.getpid()
    await second.close()
    await first.close()
    third = Journal(path)  # the owner closed: free again
    await third.open()
    await third.close()


async def test_two_clients_on_one_journal_path_cannot_both_create(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    async with FakeKlingServer(api_key=API_KEY) as server:
        async with make_client(server, journal=path) as first:
            await first.images.generate(prompt="first")
            with pytest.raises(kling_async.JournalInUseError):  # refused on entry
                async with make_client(server, journal=path):
                    pass
            second = make_client(server, journal=path)  # without async with: at the create
            try:
                with pytest.raises(kling_async.KlingError):
                    await second.images.generate(prompt="second")
            finally:
                await second.close()
        assert [r.body["prompt"] for r in server.requests_for("create")] == ["first"]


def test_the_cli_refuses_a_second_batch_on_one_out_naming_the_run(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    requests = tmp_path / "prompts.jsonl"
    requests.write_text('"a red fox"\n')
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["--mock-task-seconds", "0.1", "batch", str(requests), "--out", str(out)]
    )
    assert result.exit_code == 1, result.output
    assert f"is in use by process {holder.pid} on {socket.gethostname()}" in result.stderr
    assert "--wait" in result.stderr
    assert not (out / "results.jsonl").exists()  # nothing written, nothing sent


def test_the_cli_waits_for_the_run_that_holds_the_out_with_wait(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    requests = tmp_path / "prompts.jsonl"
    requests.write_text('"a red fox"\n')
    out = tmp_path / "out"
    run = subprocess.Popen(
        [*CLI, "batch", str(requests), "--out", str(out), "--no-download", "--wait"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("KLING_")},
    )
    try:
        assert run.stderr is not None
        for line in run.stderr:
            if "waiting for" in line:
                assert f"process {holder.pid}" in line
                break
        assert run.poll() is None  # still waiting
        assert holder.stdin is not None
        holder.stdin.close()
        assert run.wait(60) == 0
        assert "1 succeeded" in run.stderr.read()
    finally:
        run.kill()
        run.wait(10)
        assert run.stderr is not None
        run.stderr.close()


def test_fresh_never_deletes_a_journal_another_run_works_on(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    requests = tmp_path / "prompts.jsonl"
    requests.write_text('"a red fox"\n')
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, [*CLI[3:], "batch", str(requests), "--out", str(out), "--fresh"]
    )
    assert result.exit_code == 1, result.output
    assert f"in use by process {holder.pid}" in result.stderr
    assert row(journal_of(tmp_path), "held") is not None  # the owner's journal is intact


async def test_discard_deletes_a_journal_nobody_owns(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    journal = Journal(path)
    journal.record(entry("a"))
    await journal.close()
    Journal.discard(path)
    assert not path.exists()
    again = Journal(path)
    try:
        assert await again.entries() == []
    finally:
        await again.close()


async def test_an_abandoned_journal_loses_what_it_did_not_commit_and_lets_go(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.db"
    crashed = Journal(path)
    crashed.record(entry("committed"))
    await crashed.flush()
    crashed.record(entry("queued"))
    crashed._abandon()  # as if the process had been killed here
    with pytest.raises(JournalError):
        await crashed.get("committed")
    again = Journal(path)  # the same process takes the file over
    try:
        assert [e.external_task_id for e in await again.entries()] == ["committed"]
    finally:
        await again.close()
    await asyncio.wait_for(crashed.close(), ANSWER_WITHIN)


# --- a fork -----------------------------------------------------------------------------------


async def _in_forked_child(journal: Journal) -> int:
    """What the child sees of its parent's journal: 0 if every call is refused
    at once, naming the fork; the exit code of what went wrong otherwise."""
    journal.record(entry("child"))
    try:
        await asyncio.wait_for(journal.flush(), ANSWER_WITHIN)
    except asyncio.TimeoutError:
        return 10  # the flush waited for a writer thread the fork did not copy
    except JournalError as error:
        if "fork" not in str(error):
            return 11
    else:
        return 12
    with contextlib.suppress(JournalError):
        await asyncio.wait_for(journal.entries(), ANSWER_WITHIN)
        return 13
    await asyncio.wait_for(journal.close(), ANSWER_WITHIN)
    return 0


def _be_the_forked_child(journal: Journal, answered: Path) -> NoReturn:
    """Try the parent's journal, write the exit code to ``answered``, and stay
    alive with the parent's files open until killed. Not a line of pytest's
    may run in the child, nor the parent's loop: a thread of its own runs one."""
    code = [99]

    def run() -> None:
        code[0] = asyncio.run(_in_forked_child(journal))

    try:
        child = threading.Thread(target=run)
        child.start()
        child.join(ANSWER_WITHIN * 4)
        written = answered.with_suffix(".partial")
        written.write_text(str(code[0]))
        written.replace(answered)
        threading.Event().wait(ANSWER_WITHIN * 4)
    finally:
        os._exit(code[0])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() here")
# Python 3.12+ warns that a fork with threads running may deadlock the child:
# what this test makes sure the journal's part cannot do.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.parametrize("lock_held", [False, True], ids=["quiet", "lock-held"])
async def test_a_forked_child_is_refused_its_parents_journal_and_the_parent_goes_on(
    tmp_path: Path, lock_held: bool
) -> None:
    path, answered = tmp_path / "journal.db", tmp_path / "child-answered"
    journal = Journal(path)
    journal.record(entry("before"))
    await journal.flush()
    # The worst moment: another thread holds the journal's lock as the process
    # forks (the child's copy of it stays held: that thread is not in the child).
    if lock_held:
        journal._lock.acquire()
    pid = os.fork()
    if pid == 0:
        _be_the_forked_child(journal, answered)
    try:
        if lock_held:
            journal._lock.release()
        journal.record(entry("after"))
        await journal.flush()
        await eventually(answered.exists, timeout=ANSWER_WITHIN * 6)  # else it hung
        assert answered.read_text() == "0"
        assert {each.external_task_id for each in await journal.entries()} == {"before", "after"}
        other = Journal(path)
        with pytest.raises(JournalInUseError):  # still the parent's: the child took nothing
            await other.open()
        await other.close()
        # Closed by its owner, the journal can be opened again while the child
        # lives on with a copy of the lock's file descriptor.
        await journal.close()
        reopened = Journal(path)
        await asyncio.wait_for(reopened.open(), ANSWER_WITHIN)
        assert len(await reopened.entries()) == 2
        await reopened.close()
    finally:
        os.kill(pid, signal.SIGKILL)
        await asyncio.to_thread(os.waitpid, pid, 0)
