"""A model-based test of the journal's commits under interleavings.

Hypothesis drives a :class:`~hypothesis.stateful.RuleBasedStateMachine` through
random sequences of what a journal's users do at once: records made in one pass
of the event loop or spread over several, records from other threads while the
loop records and flushes too (with the interpreter switching threads every
microsecond, so that the writer thread's commits land between any two lines),
updates of entries already written, learned durations saved, another connection
holding the file's write lock for a while, an entry SQLite cannot store,
``close()`` and reopen (in a drawn ``synchronous`` mode), and a crash
(``_abandon``, as a killed process leaves the file). The invariants are checked
against the file, read by a connection of the test's own, not against what the
journal says:

- a flush that returned: every entry recorded before it is in the file in the
  latest state recorded, its request body whole; no flush hangs;
- a flush after an entry SQLite cannot store raises
  :class:`~kling_async.JournalError` once, and the next one succeeds for the
  rest, which are in the file (none waits for a commit that may never come);
- a read made after records sees them (the journal's reads come after them);
- ``close()`` writes everything recorded before it;
- after a crash the file holds every entry a flush promised, each in a state
  that was recorded for it, no older than the one promised, and nothing that
  was never recorded.

``KLING_JOURNAL_MODEL_EXAMPLES`` (default 50) sets how many sequences are tried.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Final, TypeVar

import attrs
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kling_async import EntryState, Journal, JournalError, LedgerEntry
from kling_async import _journal as journal_module
from tests.test_journal import entry

EXAMPLES: Final = int(os.environ.get("KLING_JOURNAL_MODEL_EXAMPLES", "50"))
# The states an entry goes through, in order (a create that succeeds).
PROGRESSION: Final = (EntryState.INTENDED, EntryState.SENT, EntryState.CREATED, EntryState.TERMINAL)
# A flush or read that takes longer than this hangs.
PATIENCE: Final = 20.0
MODES: Final = st.sampled_from(["NORMAL", "FULL", "OFF"])

T = TypeVar("T")


class Violation(AssertionError):
    """An invariant of the journal broke."""


def advanced(current: LedgerEntry) -> LedgerEntry | None:
    """``current`` in its next state, or None once it ended."""
    index = PROGRESSION.index(current.state)
    if index + 1 == len(PROGRESSION):
        return None
    state = PROGRESSION[index + 1]
    task_id = f"task-{current.external_task_id}" if state is EntryState.CREATED else None
    return attrs.evolve(
        current, state=state, task_id=task_id or current.task_id, updated_at=time.time()
    )


def read_file(path: Path) -> tuple[dict[str, tuple[str, str | None, Any]], dict[str, str]]:
    """What the file holds, by a connection of the test's own: each entry's state,
    task_id and body, and each durations row's seconds."""
    if not path.exists():
        return {}, {}  # never used: opened lazily
    connection = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        rows = connection.execute(
            "SELECT external_task_id, state, task_id, body FROM entries"
        ).fetchall()
        durations = dict(connection.execute("SELECT key, seconds FROM durations").fetchall())
    finally:
        connection.close()
    return {row[0]: (row[1], row[2], json.loads(row[3])) for row in rows}, durations


class JournalInterleavings(RuleBasedStateMachine):
    """Records, flushes, reads, faults and restarts of one journal file."""

    def __init__(self) -> None:
        super().__init__()
        self.threads_before = set(threading.enumerate())
        self.folder = tempfile.TemporaryDirectory(prefix="kling-journal-model-")
        self.path = Path(self.folder.name) / "journal.db"
        self.loop = asyncio.new_event_loop()
        self.journal = Journal(self.path)
        self.ids = itertools.count()
        self.steps: list[str] = []
        #: The latest state recorded per entry (what the file must hold once
        #: flushed), and every state recorded for it.
        self.recorded: dict[str, LedgerEntry] = {}
        self.states: dict[str, list[EntryState]] = {}
        #: What a flush that returned (or a close) promised is in the file.
        self.promised: dict[str, LedgerEntry] = {}
        #: Durations saved, the latest per key, and those a flush promised.
        self.durations: dict[str, str] = {}
        self.promised_durations: dict[str, str] = {}
        self.saved_durations: dict[str, list[str]] = {}
        #: Entries recorded that SQLite cannot store, not flushed yet.
        self.unstorable: set[str] = set()

    # --- helpers --------------------------------------------------------------------

    def violation(self, what: str) -> Violation:
        history = "\n  ".join(self.steps[-20:])
        message = f"{what}\nsteps (latest last):\n  {history}"
        print(f"VIOLATION: {message}", file=sys.stderr)
        return Violation(message)

    def run(self, awaitable: Awaitable[T], what: str) -> T:
        async def bounded() -> T:
            return await awaitable

        try:
            return self.loop.run_until_complete(asyncio.wait_for(bounded(), PATIENCE))
        except asyncio.TimeoutError:
            raise self.violation(f"{what} did not return in {PATIENCE} s") from None

    def new_entry(self, actor: str) -> LedgerEntry:
        return entry(f"{actor}-{next(self.ids)}")

    def note(self, recorded: LedgerEntry) -> None:
        """The model's side of a record (made by the caller, in its order)."""
        self.recorded[recorded.external_task_id] = recorded
        self.states.setdefault(recorded.external_task_id, []).append(recorded.state)

    def record(self, recorded: LedgerEntry) -> None:
        self.note(recorded)
        self.journal.record(recorded)

    def some_records(self, actor: str, new: int, updates: int) -> list[LedgerEntry]:
        """``new`` entries and ``updates`` next states of entries at rest, in order."""
        made = [self.new_entry(actor) for _ in range(new)]
        at_rest = [
            current
            for external, current in self.recorded.items()
            if external not in self.unstorable and current.state is not EntryState.TERMINAL
        ]
        for current in at_rest[len(at_rest) - updates :]:
            following = advanced(current)
            if following is not None:
                made.append(following)
        return made

    def flush(self, what: str) -> JournalError | None:
        """Flush; on success what was recorded is promised. An entry SQLite cannot
        store is given up by the first commit that meets it, and the flushes then
        answered fail, once (the next ones succeed for the rest)."""
        try:
            self.run(self.journal.flush(), what)
        except JournalError as error:
            if not self.unstorable:
                raise self.violation(f"{what} failed: {error!r}") from error
            self.give_up_unstorable()
            return error
        if self.unstorable:
            raise self.violation(f"{what} succeeded, {sorted(self.unstorable)} never written")
        self.promised = dict(self.recorded)
        self.promised_durations = dict(self.durations)
        return None

    def give_up_unstorable(self) -> None:
        for external in self.unstorable:
            self.recorded.pop(external)
            self.states.pop(external)
        self.unstorable.clear()

    def expect_file(self, what: str) -> None:
        """The file holds exactly what was promised."""
        entries, durations = read_file(self.path)
        for external, promised in self.promised.items():
            held = entries.get(external)
            if held is None:
                raise self.violation(f"{what}: {external} ({promised.state}) is not in the file")
            state, task_id, body = held
            if state != promised.state.value or task_id != promised.task_id:
                raise self.violation(
                    f"{what}: {external} is {state}/{task_id} in the file, "
                    f"{promised.state}/{promised.task_id} was recorded last"
                )
            if body != dict(promised.body):
                raise self.violation(f"{what}: {external}'s body is {body!r} in the file")
        for external in entries:
            if external not in self.recorded:
                raise self.violation(f"{what}: {external} is in the file, never recorded")
        for key, seconds in self.promised_durations.items():
            if durations.get(key) != seconds:
                raise self.violation(
                    f"{what}: durations {key} are {durations.get(key)} in the file, {seconds} saved"
                )

    def reopen(self, synchronous: journal_module.Synchronous) -> None:
        self.journal = Journal(self.path, synchronous=synchronous)
        self.run(self.journal.open(), "open")

    # --- rules ---------------------------------------------------------------------------

    @initialize(synchronous=MODES)
    def open_journal(self, synchronous: journal_module.Synchronous) -> None:
        self.steps.append(f"open ({synchronous})")
        self.journal = Journal(self.path, synchronous=synchronous)

    @rule(
        passes=st.lists(st.tuples(st.integers(0, 300), st.integers(0, 20)), min_size=1, max_size=4),
        pause=st.sampled_from([0.0, 0.0005, 0.003]),
        flush=st.booleans(),
    )
    def record_on_the_loop(self, passes: list[tuple[int, int]], pause: float, flush: bool) -> None:
        """Records in passes of the loop (a pass records without awaiting), a
        pause between passes; then perhaps a flush."""
        self.steps.append(f"loop records {passes}, pause {pause}, flush {flush}")

        async def in_passes() -> None:
            for new, updates in passes:
                for made in self.some_records("loop", new, updates):
                    self.record(made)
                await asyncio.sleep(pause)

        self.run(in_passes(), "records")
        if flush:
            self.flush("flush")

    @rule(
        threads=st.integers(1, 4),
        per_thread=st.integers(20, 500),
        loop_new=st.integers(0, 300),
    )
    def record_from_threads(self, threads: int, per_thread: int, loop_new: int) -> None:
        """Threads record entries of their own while the loop records and flushes
        too, the interpreter switching threads every microsecond."""
        self.steps.append(f"{threads} threads x {per_thread} records, the loop {loop_new}")
        batches = [self.some_records(f"thread{n}", per_thread, 0) for n in range(threads)]
        on_loop = self.some_records("loop", loop_new, 0)
        for made in [*on_loop, *(item for batch in batches for item in batch)]:
            self.note(made)

        def record_all(batch: list[LedgerEntry]) -> None:
            for made in batch:
                self.journal.record(made)

        async def alongside() -> None:
            workers = [threading.Thread(target=record_all, args=(batch,)) for batch in batches]
            for worker in workers:
                worker.start()
            for number, made in enumerate(on_loop):
                self.journal.record(made)
                if number % 50 == 49:
                    try:
                        await self.journal.flush()
                    except JournalError as error:
                        if not self.unstorable:
                            raise self.violation(f"a flush failed: {error!r}") from error
                        self.give_up_unstorable()

            def join_all() -> None:
                for worker in workers:
                    worker.join()

            await asyncio.to_thread(join_all)  # the loop goes on serving the journal

        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        try:
            self.run(alongside(), "records from threads")
        finally:
            sys.setswitchinterval(interval)
        if self.flush("flush after threads") is None:
            self.expect_file("after records from threads")

    @rule(keys=st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3))
    def save_durations(self, keys: list[str]) -> None:
        rows = []
        for key in keys:
            seconds = json.dumps([round(time.time() % 100, 3)])
            self.durations[key] = seconds
            self.saved_durations.setdefault(key, []).append(seconds)
            rows.append((key, seconds, time.time()))
        self.steps.append(f"save durations {keys}")
        self.journal._save_later(rows)

    @rule()
    def flush_and_check(self) -> None:
        self.steps.append("flush")
        if self.flush("flush") is not None and self.flush("the next flush") is not None:
            raise self.violation("the flush after one that gave up an entry failed too")
        self.expect_file("after a flush")

    @rule()
    def read(self) -> None:
        """A read comes after every record made before it."""
        self.steps.append("read")
        rows = self.run(self.journal.entries(), "entries()")
        if self.unstorable:
            return  # the commit before the read failed: the rest waits for the next
        seen = {row.external_task_id: row for row in rows}
        for external, latest in self.recorded.items():
            held = seen.get(external)
            if held is None or held.state is not latest.state:
                state = None if held is None else held.state
                raise self.violation(
                    f"entries() has {external} as {state}; {latest.state} was recorded "
                    "before the read"
                )

    @rule(hold=st.sampled_from([0.0, 0.002, 0.02, 0.1]), new=st.integers(1, 250))
    def another_connection_holds_the_lock(self, hold: float, new: int) -> None:
        """Another connection holds the write lock while the loop records and
        flushes: the loop's commit is handed to the writer thread, which waits."""
        self.steps.append(f"a foreign write lock for {hold} s, {new} records")
        locked = threading.Event()

        def hold_lock() -> None:
            connection = sqlite3.connect(self.path, isolation_level=None, timeout=10)
            try:
                connection.execute("BEGIN IMMEDIATE")
                locked.set()
                time.sleep(hold)
                connection.execute("COMMIT")
            finally:
                connection.close()

        self.run(self.journal.open(), "open")
        holder = threading.Thread(target=hold_lock)
        holder.start()
        locked.wait(10)
        try:
            for made in self.some_records("loop", new, 5):
                self.record(made)
            flushed = self.flush("flush behind a foreign lock")
        finally:
            holder.join()
        if flushed is None:
            self.expect_file("after a flush behind a foreign lock")

    @rule()
    def unstorable_entry(self) -> None:
        """An entry SQLite cannot encode (a key with a lone surrogate)."""
        bad = attrs.evolve(self.new_entry("bad"), key="\ud800")
        self.steps.append(f"record unstorable {bad.external_task_id}")
        self.unstorable.add(bad.external_task_id)
        self.record(bad)

    @rule(synchronous=MODES)
    def close_and_reopen(self, synchronous: journal_module.Synchronous) -> None:
        self.steps.append(f"close, reopen ({synchronous})")
        self.run(self.journal.close(), "close")
        self.give_up_unstorable()
        self.promised = dict(self.recorded)
        self.promised_durations = dict(self.durations)
        self.expect_file("after close")
        self.reopen(synchronous)

    @rule(synchronous=MODES)
    def crash_and_reopen(self, synchronous: journal_module.Synchronous) -> None:
        """The process dies: what a flush promised survives, the rest may not."""
        self.steps.append(f"crash, reopen ({synchronous})")
        self.journal._abandon()
        entries, durations = read_file(self.path)
        for external, promised in self.promised.items():
            held = entries.get(external)
            if held is None:
                raise self.violation(f"after a crash {external}, flushed, is not in the file")
            state = EntryState(held[0])
            if state not in self.states[external]:
                raise self.violation(f"after a crash {external} is {state}, never recorded")
            if PROGRESSION.index(state) < PROGRESSION.index(promised.state):
                raise self.violation(
                    f"after a crash {external} is {state}, older than the flushed {promised.state}"
                )
        for key, seconds in self.promised_durations.items():
            saved = self.saved_durations[key]
            held_seconds = durations.get(key)
            if held_seconds not in saved or saved.index(held_seconds) < saved.index(seconds):
                raise self.violation(
                    f"after a crash durations {key} are {held_seconds}, {seconds} was flushed"
                )
        kept = {}
        for external, (held_state, task_id, _body) in entries.items():
            if external not in self.recorded or held_state not in self.states[external]:
                raise self.violation(f"after a crash {external} is {held_state}, never recorded")
            # The file is the truth now, and the next records start from it.
            kept[external] = attrs.evolve(
                self.recorded[external], state=EntryState(held_state), task_id=task_id
            )
        self.recorded = kept
        self.states = {external: [kept[external].state] for external in kept}
        self.unstorable.clear()
        self.promised = dict(kept)
        self.durations = dict(durations)
        self.promised_durations = dict(durations)
        self.saved_durations = {key: [seconds] for key, seconds in durations.items()}
        self.reopen(synchronous)

    @invariant()
    def no_thread_left_but_the_writer(self) -> None:
        started = set(threading.enumerate()) - self.threads_before
        writers = [t.name for t in started if t.name.startswith("kling-journal-")]
        if len(writers) > 1:
            raise self.violation(f"writer threads left behind: {writers}")

    def teardown(self) -> None:
        try:
            self.run(self.journal.close(), "close at teardown")
            self.give_up_unstorable()
            self.promised = dict(self.recorded)
            self.promised_durations = dict(self.durations)
            self.expect_file("at teardown")
        finally:
            self.loop.close()
            self.folder.cleanup()


JournalInterleavings.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=10, deadline=None
)
TestJournalInterleavings = pytest.mark.timeout(300)(JournalInterleavings.TestCase)
