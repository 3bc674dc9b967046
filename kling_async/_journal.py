"""The durable ledger: a SQLite journal that survives a crash.

``Client(journal="out/kling-journal.db")`` (or a :class:`Journal`) records every
create's intent before it is sent, then its task_id, its status changes, its
result URLs and which images were downloaded. After a crash, ``await
client.resume()`` reads it back and settles every create that did not end, and a
batch run again over the same input skips what is done.

:meth:`Journal.record` never blocks: it queues the entry. :meth:`Journal.flush`
returns once everything recorded before it is committed: the create's owner
awaits it between recording an intent and sending the create (the write-ahead).
Where the commit is made depends on whether it fsyncs:

- With ``synchronous="NORMAL"`` (the default) or ``"OFF"``, in WAL mode, a commit
  does no fsync: it writes the WAL's frames into the OS page cache, well under a
  millisecond. It is made on the event loop's own thread, by a callback at the
  end of the pass that recorded the entries, with everything that pass recorded,
  in one statement: a flush waits for no thread. At most one such commit is
  made every 2 ms: what the passes in between record joins the next one (a
  commit costs tens of microseconds however few its rows). That connection
  never waits for a lock (a commit that would is left to the journal's thread)
  and never checkpoints.
- With ``"FULL"`` or ``"EXTRA"`` a commit fsyncs, which the loop must not wait
  for: the journal's thread commits what each pass recorded (a group commit)
  and answers the flushes.

Records may come from any thread and any event loop (one loop after another, or
several at once). The journal's thread also opens the file (taking its ownership
may wait: what is recorded meanwhile is committed once it is open), serves
the reads on a connection of its own, after committing what was recorded before
them, and copies the WAL into the file (a checkpoint, which fsyncs) every 500
commits or each second there were commits, and at close.

A journal has one owner: a second :class:`Journal` on the same file, in another
process or in this one, is refused with :class:`~kling_async.JournalInUseError`
naming the owner (pid, host, since when), or waits for it (``wait=``). The lock is
the operating system's (``flock`` on ``<journal>.lock``), so an owner that dies,
even by SIGKILL, lets go by itself and is taken over.

Any failure of the writer is a failure of the calls waiting on it, never a hang:
a commit that fails fails the flushes waiting for it, and later ones, until its
entries are committed (they are retried with every commit); a journal that cannot
be opened, or whose writer fails, answers every call with its own
:class:`~kling_async.JournalError` chained to the cause.

What a commit survives: with ``NORMAL`` a committed intent survives the process
being killed (SIGKILL included): its WAL frames are in the OS page cache, which
the OS writes out whatever happens to the process. A power loss or an OS crash
may roll back the commits made since the last checkpoint (about a second's, or
500 commits, at most), never leaving a damaged file. ``Journal(path,
synchronous="FULL")`` survives those too, at the price of an fsync per commit,
made in the journal's thread. The file is created readable by its owner only; it
never holds a credential.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import queue
import socket
import sqlite3
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal

if sys.platform != "win32":
    import fcntl

from ._budget import Spend, SpendGrouping, spend_of
from ._durations import MAX_CACHED_KINDS, WINDOW, Kind, entry_key, read_entries
from ._exceptions import JournalError, JournalInUseError
from ._ledger import EntryState, LedgerEntry
from ._records import records

__all__ = ["Journal"]

logger = logging.getLogger("kling_async")

SCHEMA_VERSION: Final = 1
#: Columns added after schema 1, with their SQL type: a journal of an older
#: version gets them by ALTER TABLE when opened (see ``_migrate``), so adding
#: one never needs a version of its own, and an older journal's rows read
#: them as NULL ("not known").
_ADDED_COLUMNS: Final = (
    ("estimate", "TEXT"),
    ("cost", "TEXT"),
    ("pack", "TEXT"),
    ("units_used", "INTEGER"),
    ("batch", "TEXT"),
)
_COLUMNS: Final = (
    "external_task_id",
    "endpoint",
    "body",
    "units",
    "state",
    "task_id",
    "status",
    "images",
    "error",
    "receiver_callback",
    "key",
    "owner",
    "downloaded",
    "intended_at",
    "updated_at",
    *(name for name, _type in _ADDED_COLUMNS),
)
_JSON_COLUMNS: Final = frozenset({"body", "images", "downloaded"})
_SCHEMA: Final = f"""
CREATE TABLE IF NOT EXISTS entries (
    external_task_id TEXT PRIMARY KEY,
    endpoint TEXT NOT NULL,
    body TEXT,
    units INTEGER NOT NULL,
    state TEXT NOT NULL,
    task_id TEXT,
    status TEXT,
    images TEXT NOT NULL,
    error TEXT,
    receiver_callback INTEGER NOT NULL,
    key TEXT,
    owner TEXT,
    downloaded TEXT NOT NULL,
    intended_at REAL NOT NULL,
    updated_at REAL NOT NULL{"".join(f", {name} {kind}" for name, kind in _ADDED_COLUMNS)}
);
-- Only the entries that have a key (a batch's): most have none, and an index
-- of them all would be written by every commit. Named anew: a journal made
-- before has the index of every entry, dropped here.
DROP INDEX IF EXISTS entries_by_key;
CREATE INDEX IF NOT EXISTS entries_with_a_key ON entries (key) WHERE key IS NOT NULL;
CREATE INDEX IF NOT EXISTS entries_by_state ON entries (state);
PRAGMA user_version = {SCHEMA_VERSION};
"""
# A later record of an entry leaves its body out (NULL here): a body holds
# megabytes of base64 images, and it never changes after the intent.
_UPSERT: Final = (
    f"INSERT INTO entries ({', '.join(_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in _COLUMNS)}) "
    "ON CONFLICT (external_task_id) DO UPDATE SET "
    + ", ".join(
        "body = coalesce(excluded.body, body)"
        if column == "body"
        else f"{column} = excluded.{column}"
        for column in _COLUMNS
        if column not in ("external_task_id", "intended_at")
    )
)
_SELECT: Final = f"SELECT {', '.join(_COLUMNS)} FROM entries"
# Rows written by one statement: the sqlite3 module lets go of the interpreter
# lock around every statement it runs (BEGIN and COMMIT included), and getting
# it back from a busy event loop can take a switch interval (5 ms), so a commit
# of many rows in one statement (with no BEGIN and COMMIT when one statement is
# all of it) keeps the creates waiting on it from waiting for that many times.
# 999 variables is the most SQLite before 3.32 takes in one statement.
_ROWS_PER_STATEMENT: Final = max(1, 999 // len(_COLUMNS))
_UPSERT_HEAD, _, _UPSERT_TAIL = _UPSERT.partition(f"VALUES ({', '.join('?' for _ in _COLUMNS)}) ")
_ROW_MARKS: Final = f"({', '.join('?' for _ in _COLUMNS)})"
# The statement for each count of rows, made once rather than per commit.
_UPSERTS: Final = tuple(
    f"{_UPSERT_HEAD}VALUES {', '.join(_ROW_MARKS for _ in range(count))} {_UPSERT_TAIL}"
    for count in range(_ROWS_PER_STATEMENT + 1)
)


def _upsert_many(connection: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    """Insert or update ``rows`` (no two of one entry) with few statements."""
    for start in range(0, len(rows), _ROWS_PER_STATEMENT):
        chunk = rows[start : start + _ROWS_PER_STATEMENT]
        connection.execute(_UPSERTS[len(chunk)], list(itertools.chain.from_iterable(chunk)))


# How long the client's tasks took, for the schedule of its polls (``_durations``):
# a table of its own, made on open. Additive, so the schema version stays: a
# journal without it reads as no history, and an older version ignores it.
# ``key`` names the API root and the kind of task; ``seconds`` is a JSON list.
_DURATIONS_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS durations (
    key TEXT PRIMARY KEY,
    seconds TEXT NOT NULL,
    written_at REAL NOT NULL
);
"""
_SAVE_DURATIONS: Final = (
    "INSERT INTO durations (key, seconds, written_at) VALUES (?, ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET seconds = excluded.seconds, written_at = excluded.written_at"
)
# Bounded as the durations file is: the kinds most recently written.
_TRIM_DURATIONS: Final = (
    "DELETE FROM durations WHERE key NOT IN "
    "(SELECT key FROM durations ORDER BY written_at DESC LIMIT ?)"
)
_UNSETTLED: Final = tuple(state.value for state in EntryState if not state.settled)
# EntryState.settled compares with each settled state in turn; a set is asked
# once per committed entry.
_SETTLED: Final = frozenset(state for state in EntryState if state.settled)

Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]

# An operation for the writer thread: a read (or open) answered through a
# future on the caller's loop, or a wake-up (commit, checkpoint, close, ...).
_Reply = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]"]
_Operation = tuple[str, Any, _Reply | None]
# A flush waiting for a commit: the count of records it waits for, and its future.
_Waiter = tuple[int, asyncio.AbstractEventLoop, "asyncio.Future[None]"]

# How long a commit waits for another connection's write lock before it fails.
_BUSY_TIMEOUT_MS: Final = 10_000
# The integers SQLite stores (sqlite3 raises OverflowError binding others).
_SQLITE_MIN_INT: Final = -(2**63)
_SQLITE_MAX_INT: Final = 2**63 - 1
# SQLite's result code for a lock another connection holds.
_SQLITE_BUSY: Final = 5
# The writer thread copies the WAL into the file (a checkpoint, which fsyncs)
# after this many commits, or this many seconds after its last checkpoint while
# there were commits: the WAL is reused from its start once copied, so it does
# not grow with the journal.
_CHECKPOINT_COMMITS: Final = 500
_CHECKPOINT_SECONDS: Final = 1.0
# A loop commits at most once in this many seconds: what the passes in between
# record joins the next commit, and a flush waits for it (a read does not).
# A commit costs tens of microseconds of CPU however few its rows (the WAL's
# pages and locks); at a thousand creates a second each would get a commit of
# its own, doubling what the journal costs a create.
_COMMIT_INTERVAL: Final = 0.002
# Rows the loop commits at most: a row costs about 20 us, and a pass that
# recorded more (a resume, thousands of tasks ending at once) would stall the
# loop that long; the writer thread commits those instead.
_LOOP_COMMIT_ROWS: Final = 200
# Whether the OS has flock (all but Windows).
_FLOCK: Final = sys.platform != "win32"
# How often a journal waiting for its owner to let go looks again, in seconds.
_OWNER_POLL: Final = 0.05
# How many settled entries' "body written" marks are kept (see Journal._settled_bodies).
_RECENTLY_SETTLED: Final = 1024


# One encoder: json.dumps with arguments of its own builds a new one each call.
_encode: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _json(value: Any) -> str:
    return _encode(value)


# What a row binds for a column that is NULL. The sqlite3 module binds None by
# looking for an adapter for its type (a tuple built, a dict and two attributes
# looked up: a third of a row's binding, and a row has about eight); a float is
# bound as it is, and SQLite stores a NaN as NULL (it has no NaN), in a column
# of any type, and reads it back as None.
_NULL: Final = float("nan")


def _row(entry: LedgerEntry, *, with_body: bool = True) -> tuple[Any, ...]:
    """The entry as a row, with _NULL for None; written by hand, field by field,
    since the writer thread shares the interpreter with the event loop and this
    runs per record."""
    return (
        entry.external_task_id,
        entry.endpoint.value,
        _json(entry.body) if with_body else _NULL,
        entry.units,
        entry.state.value,
        _NULL if entry.task_id is None else entry.task_id,
        _NULL if entry.status is None else entry.status,
        _json([records.unstructure(image) for image in entry.images]) if entry.images else "[]",
        _NULL if entry.error is None else entry.error,
        int(entry.receiver_callback),
        _NULL if entry.key is None else entry.key,
        _NULL if entry.owner is None else entry.owner,
        _json(entry.downloaded) if entry.downloaded else "[]",
        entry.intended_at,
        entry.updated_at,
        _NULL if entry.estimate is None else str(entry.estimate),
        _NULL if entry.cost is None else _json(records.unstructure(entry.cost)),
        entry.pack,
        _NULL if entry.units_used is None else entry.units_used,
        _NULL if entry.batch is None else entry.batch,
    )


def _entry(row: tuple[Any, ...]) -> LedgerEntry:
    data = dict(zip(_COLUMNS, row, strict=True))
    for column in _JSON_COLUMNS:
        data[column] = json.loads(data[column] or "{}")
    data["receiver_callback"] = bool(data["receiver_callback"])
    data["cost"] = json.loads(data["cost"]) if data["cost"] else None
    if data["pack"] is None:  # written before packs were recorded: the image pack's
        del data["pack"]
    return records.structure(data, LedgerEntry)


def _migrate(connection: sqlite3.Connection) -> None:
    """Give an older journal's table the columns added since (additive only:
    nothing an older version wrote is changed)."""
    present = {row[1] for row in connection.execute("PRAGMA table_info(entries)")}
    if not present:
        return  # a new file: the schema creates the table whole
    for name, sql_type in _ADDED_COLUMNS:
        if name not in present:
            connection.execute(f"ALTER TABLE entries ADD COLUMN {name} {sql_type}")


class _Ownership:
    """The journal's one owner, held as an OS lock (``flock``) on ``<journal>.lock``.

    The kernel lets go of the lock when its process ends, however it ends (SIGKILL
    included), so an owner that died never has to be cleared by hand and cannot be
    mistaken for a live one: a stale owner is simply taken over. The file also says
    who holds it (pid, host, since when), for the message that refuses a second
    owner. It is never deleted: a process waiting on a deleted lock file would
    hold a lock nobody else sees.

    ``flock`` locks belong to an open file, not to a process, so a second
    :class:`Journal` on the same file in the same process is refused too: two
    clients of one process running the same batch would create lines twice just
    as two processes would.
    """

    def __init__(self, journal: Path) -> None:
        self.journal = journal
        self.path = journal.with_name(journal.name + ".lock")
        self._fd: int | None = None

    def acquire(self, wait: float, stop: threading.Event) -> None:
        """Become the owner, waiting up to ``wait`` seconds (or until ``stop`` is
        set) for the current owner to let go; else raise :class:`JournalInUseError`."""
        if not _FLOCK:  # pragma: no cover - no flock on Windows: one owner is up to the user
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    left = deadline - time.monotonic()
                    if left <= 0 or stop.is_set():
                        raise self._in_use(fd) from None
                    stop.wait(min(_OWNER_POLL, left))
            previous = _read_owner(fd)
            if previous.get("pid") is not None:
                logger.warning(
                    "journal %s: taking it over from process %s on %s, which ended "
                    "without closing it",
                    self.journal,
                    previous.get("pid"),
                    previous.get("host"),
                )
            me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, _json(me).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        """Let go: the owner's details are cleared (nobody took it over from a
        crash), then the lock is released, explicitly: a child forked meanwhile
        holds a copy of the descriptor, and closing ours alone would leave the
        file locked until that child exits."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def _in_use(self, fd: int) -> JournalInUseError:
        owner = _read_owner(fd)
        pid, host, since = owner.get("pid"), owner.get("host"), owner.get("since")
        return JournalInUseError(
            str(self.journal),
            pid=pid if isinstance(pid, int) else None,
            host=host if isinstance(host, str) else None,
            since=since if isinstance(since, (int, float)) else None,
        )


def _read_owner(fd: int) -> dict[str, Any]:
    """What a lock file says of its owner; empty when it says nothing readable
    (released cleanly, or being written this instant)."""
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# Journals whose writer thread runs in this process: a child forked from it
# refuses them (Journal._after_fork).
_STARTED: weakref.WeakSet[Journal] = weakref.WeakSet()
# In a forked child, the parent's SQLite connections: kept referenced, so that
# no garbage collection closes them there (SQLite's lock state in the child's
# memory is a copy of the parent's, and a close may checkpoint its WAL).
_INHERITED: list[sqlite3.Connection] = []


def _refuse_in_forked_child() -> None:
    parent = os.getppid()
    for journal in list(_STARTED):
        journal._after_fork(parent)
    _STARTED.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_refuse_in_forked_child)


class Journal:
    """A :class:`~kling_async.Ledger` kept in a SQLite file (see the module docstring).

    Nothing is opened until first use (or :meth:`open`). A journal has one owner:
    opening a file another :class:`Journal` holds (in another process, or in this
    one) raises :class:`~kling_async.JournalInUseError` naming it, unless ``wait``
    (seconds; ``math.inf`` for ever) lets it wait for that owner to close. An owner
    that died lets go by itself. In a process forked from the owner every call
    raises :class:`~kling_async.JournalError` (the child opens a journal of its
    own). ``close()`` commits what is queued, closes the file and lets go; a
    :class:`Client` closes the journals it opened from a path.

    ``synchronous`` is SQLite's: with ``"NORMAL"`` (the default) or ``"OFF"`` a
    commit does no fsync and is made on the event loop's own thread, at the end
    of the pass that recorded its entries; with ``"FULL"`` or ``"EXTRA"`` a commit
    fsyncs, so it is made by the journal's thread. Either way a commit survives
    the process being killed; only ``"FULL"`` and ``"EXTRA"`` survive a power loss.

    Any failure of the writer is a failure of every operation waiting on it: a
    commit that fails fails the flushes waiting on it, and later ones, until its
    entries are committed (they are retried with every commit); a journal that
    cannot be opened, or whose writer fails, answers every call with a
    :class:`~kling_async.JournalError` chained to the cause. ``close()`` always
    returns.
    """

    #: The create owner keeps a journal's entries current with status changes
    #: and results (an in-memory ledger does not need them).
    records_results: Final = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Synchronous = "NORMAL",
        wait: float = 0.0,
    ) -> None:
        if synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be OFF, NORMAL, FULL or EXTRA, got {synchronous!r}")
        if not wait >= 0:  # NaN included
            raise ValueError(f"wait must be seconds >= 0 (math.inf: for ever), got {wait!r}")
        self.path = Path(path)
        self.synchronous = synchronous
        self.wait = wait
        # A commit that does no fsync is made on the loop: a flush then waits for
        # no thread (see the module docstring).
        self._commits_on_loop = synchronous in ("OFF", "NORMAL")
        self._queue: queue.SimpleQueue[_Operation] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # Set under _lock (read without it only to return early): a record, flush
        # or read either comes before it, and the close answers it, or sees it.
        self._closed = False
        # Set by close(): a writer waiting for the owner to let go stops waiting.
        self._stop = threading.Event()

        # What the callers hand over, guarded by _lock (held for a few lines, never
        # around I/O). Entries recorded and not taken by a commit yet, latest per id.
        self._lock = threading.Lock()
        self._incoming: dict[str, LedgerEntry] = {}
        # Durations to save (JournalDurations), by key, not taken by a commit yet.
        self._durations: dict[str, tuple[Any, ...]] = {}
        # How many records were made, and how many of the first were committed
        # (every one of them): a flush waits until the second reaches the first
        # as it was when the flush was called.
        self._recorded = 0
        self._committed = 0
        # Entries recorded once the journal was closed: never written, and apart
        # from _recorded, which a commit's count would sweep up.
        self._refused = 0
        self._waiters: list[_Waiter] = []
        # Entries given up (see _drop_unstorable) since a flush was last told,
        # and why: the next flushes answered fail for them.
        self._given_up = 0
        self._given_up_because: BaseException | None = None
        # Operations for the writer thread (reads, open) asked during a pass of a
        # loop, handed over at its end.
        self._pending: list[_Operation] = []
        # The loop whose end of pass is scheduled (_end_of_pass), if any.
        self._scheduled: asyncio.AbstractEventLoop | None = None
        # When a loop may commit next (time.monotonic()): see _COMMIT_INTERVAL.
        self._next_commit = 0.0
        # Why the journal cannot be used (not opened, or its writer failed).
        self._broken: BaseException | None = None
        # Whether the writer thread has ended (after a close): what is handed
        # over from then on is answered by whoever hands it over.
        self._stopped = False
        # The pid of the process that started this journal, in a child forked
        # from it (see _after_fork); None in that process.
        self._forked_from: int | None = None

        # The writer's own state, guarded by _writing: whoever commits holds it (a
        # loop, or the writer thread), so one commit runs at a time. The loop's
        # connection, once the file is open (with synchronous OFF or NORMAL).
        self._writing = threading.Lock()
        self._writer: sqlite3.Connection | None = None
        # Entries taken by a commit and not committed (a failed commit's,
        # retried with every commit), latest state per id.
        self._unwritten: dict[str, LedgerEntry] = {}
        self._unsaved_durations: dict[str, tuple[Any, ...]] = {}
        # Why the last commit failed, while entries are unwritten.
        self._failure: BaseException | None = None
        # Unsettled entries whose body is committed: their later rows leave it out.
        # An entry leaves this set when it settles, so it holds only creates in
        # progress; a few recently settled ones are remembered apart, bounded, so
        # the record of a download just after the end does not write the body again.
        self._bodies_written: set[str] = set()
        self._settled_bodies: dict[str, None] = {}
        # Commits made, and how many when the writer thread was last asked to
        # checkpoint (a loop asks) and last checkpointed (its own count).
        self._commits = 0
        self._checkpoint_asked = 0
        self._checkpointed = 0
        self._checkpointed_at = time.monotonic()

    @staticmethod
    def discard(path: str | os.PathLike[str]) -> None:
        """Delete the journal at ``path`` (and SQLite's files beside it) to start
        over; refused with :class:`~kling_async.JournalInUseError` while an owner
        holds it, so that nobody's journal is deleted under it."""
        path = Path(path)
        if not path.parent.is_dir():
            return
        ownership = _Ownership(path)
        ownership.acquire(0, threading.Event())
        try:
            for name in (path.name, path.name + "-wal", path.name + "-shm"):
                path.with_name(name).unlink(missing_ok=True)
        finally:
            ownership.release()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._thread else "not opened"
        return f"<Journal {str(self.path)!r} {state}>"

    # --- the Ledger protocol -----------------------------------------------------------

    def record(self, entry: LedgerEntry) -> None:
        """Queue ``entry`` to be written; never blocks. On an event loop it is
        committed at the end of the loop's pass, with everything else the pass
        recorded; from anywhere else (a thread, no loop) by the journal's thread.
        Once the journal is closed it is not written, and a flush says so."""
        self._take_in(entry=entry)

    async def flush(self) -> None:
        """Return once every entry recorded so far is committed; raise
        :class:`~kling_async.JournalError` while any of them is not (after a
        close too: one recorded after it, or that the close could not commit)."""
        if self._thread is None and not self._closed:
            return
        loop = asyncio.get_running_loop()
        with self._lock:
            broken = self._broken
            missing = self._recorded - self._committed + self._refused
            if broken is None and not missing and not self._given_up:
                return  # nothing recorded since the last commit
            # Under the lock: a flush before the close is answered by it.
            closed = self._closed
            future: asyncio.Future[None] = loop.create_future()
            if broken is None and not closed:
                self._waiters.append((self._recorded, loop, future))
                schedule = self._claim_end_of_pass(loop)
        if broken is not None:
            raise self._refusal(broken)
        if closed:
            lost = missing + self._given_up
            raise self._error(
                f"closed with {lost} of the records made not committed",
                self._failure or self._given_up_because,
            )
        self._wake(loop, schedule)
        await future

    async def open(self) -> None:
        """Open the file and become its owner now rather than at first use: raises
        :class:`~kling_async.JournalInUseError` if another owner holds it (after
        waiting ``wait`` seconds for it), :class:`~kling_async.JournalError` if it
        cannot be opened."""
        await self._ask("open", None)

    async def get(self, external_task_id: str) -> LedgerEntry | None:
        rows = await self._ask(
            "select", (f"{_SELECT} WHERE external_task_id = ?", (external_task_id,))
        )
        return _entry(rows[0]) if rows else None

    async def by_key(self, key: str) -> LedgerEntry | None:
        """The most recent entry recorded under a batch request's ``key``."""
        rows = await self._ask(
            "select", (f"{_SELECT} WHERE key = ? ORDER BY intended_at DESC LIMIT 1", (key,))
        )
        return _entry(rows[0]) if rows else None

    async def unsettled(self) -> list[LedgerEntry]:
        marks = ", ".join("?" for _ in _UNSETTLED)
        rows = await self._ask(
            "select", (f"{_SELECT} WHERE state IN ({marks}) ORDER BY intended_at", _UNSETTLED)
        )
        return [_entry(row) for row in rows]

    async def entries(self) -> list[LedgerEntry]:
        """Every entry, oldest intent first."""
        return [
            _entry(row)
            for row in await self._ask("select", (f"{_SELECT} ORDER BY intended_at", ()))
        ]

    async def spend(self, by: SpendGrouping = "total") -> list[Spend]:
        """What the journal's creates cost, grouped ``by`` ``"batch"``, ``"day"``,
        ``"endpoint"``, ``"model"`` or in ``"total"``: estimated against what
        Kling deducted (see :class:`~kling_async.Spend`). Request bodies are not
        read back, only their model name."""
        columns = ", ".join(
            "json_object('model_name', json_extract(body, '$.model_name'))"
            if column == "body"
            else column
            for column in _COLUMNS
        )
        rows = await self._ask(
            "select", (f"SELECT {columns} FROM entries ORDER BY intended_at", ())
        )
        return spend_of((_entry(row) for row in rows), by)

    async def close(self) -> None:
        """Commit what is queued, stop the writer, close the file and let go of it;
        idempotent. Always returns: entries that cannot be committed are logged."""
        if self._closed:
            return
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._stop.set()
            self._hand_over()
            self._queue.put(("close", None, None))
            # Joined, not answered: returns however the writer ends.
            await asyncio.to_thread(thread.join)

    def _abandon(self) -> None:
        """Let go of the file as if this process had been killed: entries not yet
        committed are lost, later calls fail, and another :class:`Journal` may take
        the file over. For fault tests that simulate a crash inside one process
        (one owner per file holds within a process too)."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self._stop.set()
        if thread is not None:
            self._hand_over()
            self._queue.put(("abandon", None, None))
            thread.join()

    # --- handing over -------------------------------------------------------------------

    def _wake(self, loop: asyncio.AbstractEventLoop | None, schedule: bool) -> None:
        """After a record, flush or read: on a loop, schedule its end of pass if
        this caller claimed it; with no loop, have the writer thread commit."""
        if loop is None:
            self._queue.put(("commit", None, None))
        elif schedule:
            loop.call_soon(self._end_of_pass, loop)

    def _save_later(self, rows: list[tuple[Any, ...]]) -> None:
        """Save durations (``JournalDurations``) with the next commit, as a record is."""
        if self._closed:
            return
        # One record: a flush after it waits for it too.
        self._take_in(durations=rows)

    def _take_in(
        self, *, entry: LedgerEntry | None = None, durations: Sequence[tuple[Any, ...]] = ()
    ) -> None:
        """Put ``entry`` or ``durations`` among the pending writes (the latest per
        key wins) as one record, and make sure a commit takes them: at the end of
        this pass of the running loop, or by the writer thread when there is no
        loop. Nothing once the journal is refused or closed: every flush says so
        (a save of durations, an optimisation, is not counted then)."""
        self._start()
        loop = _running_loop()
        with self._lock:
            if self._broken is not None:
                return
            # Under the lock: what comes before the close is committed by it.
            closed = self._closed
            if closed:
                if entry is not None:
                    self._refused += 1  # never committed: a flush from now on says so
            else:
                # The dicts are read under the lock: a commit swaps them for new
                # ones, and what went into one it had taken would never be written.
                if entry is not None:
                    self._incoming[entry.external_task_id] = entry
                for row in durations:
                    self._durations[row[0]] = row
                self._recorded += 1
                schedule = self._claim_end_of_pass(loop)
        if closed:
            logger.debug("journal %s is closed; not written: %s", self.path, entry or durations)
            return
        self._wake(loop, schedule)

    def _claim_end_of_pass(self, loop: asyncio.AbstractEventLoop | None) -> bool:
        """Whether the caller must schedule ``loop``'s end of pass (called with
        _lock held): not when there is no loop or one is scheduled already."""
        if loop is None or self._scheduled is loop:
            return False
        self._scheduled = loop
        return True

    async def _ask(self, op: str, argument: Any) -> Any:
        """Have the writer thread answer ``op`` (a read, or the file being open),
        after the entries recorded before it are committed."""
        if self._closed:
            if self._forked_from is not None and self._broken is not None:
                raise self._refusal(self._broken)
            raise JournalError(f"the journal {self.path} is closed")
        self._start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            if self._closed:  # under the lock: a read before the close is answered by it
                raise JournalError(f"the journal {self.path} is closed")
            self._pending.append((op, argument, (loop, future)))
            schedule = self._claim_end_of_pass(loop)
        self._wake(loop, schedule)
        return await future

    def _end_of_pass(self, loop: asyncio.AbstractEventLoop) -> None:
        """At the end of a pass of ``loop`` that recorded entries or asked for
        reads: commit the entries (here, or by the writer thread when a commit
        fsyncs or the writer is busy), then hand the writer the reads, in one
        hand-over, after the commit that they must see. A commit on the loop comes
        _COMMIT_INTERVAL after the last one at the soonest (a read does not wait)."""
        with self._lock:
            writes = self._has_writes()
            wait = 0.0
            if writes and self._commits_on_loop and not self._pending:
                wait = self._next_commit - time.monotonic()
            if wait > 0:
                self._scheduled = loop  # what the next passes record joins this commit
                operations: list[_Operation] = []
            else:
                if self._scheduled is loop:
                    self._scheduled = None
                operations, self._pending = self._pending, []
        if wait > 0:
            loop.call_later(wait, self._end_of_pass, loop)
            return
        try:
            if writes and not (self._commits_on_loop and self._commit_here()):
                operations.insert(0, ("commit", None, None))
        except Exception as error:  # a bug: nobody may be left waiting on it
            self._break(error, operations)
            return
        if operations:
            self._send(operations)

    def _has_writes(self) -> bool:
        """Whether a commit has anything to do (called with _lock held): entries or
        durations to write, or flushes to answer."""
        return bool(
            self._incoming
            or self._durations
            or self._waiters
            or self._unwritten
            or self._unsaved_durations
        )

    def _commit_here(self) -> bool:
        """Commit on this thread with the loop's connection. False when that cannot
        be done without waiting: the writer thread is committing, or another
        connection holds the file's write lock (the thread then waits for it)."""
        if not self._writing.acquire(blocking=False):
            return False
        try:
            if self._writer is None:
                return True  # not open yet: the writer thread commits once it is
            with self._lock:
                rows = len(self._incoming) + len(self._unwritten)
            if rows > _LOOP_COMMIT_ROWS:
                return False  # too long a stall for the loop
            self._next_commit = time.monotonic() + _COMMIT_INTERVAL
            return self._commit(self._writer, on_loop=True)
        finally:
            self._writing.release()

    def _hand_over(self) -> None:
        """Give the writer thread every operation asked on a loop and not handed
        over yet (by close(), whatever the loops do next)."""
        with self._lock:
            operations, self._pending = self._pending, []
        if operations:
            self._send(operations)

    def _send(self, operations: list[_Operation]) -> None:
        """Hand ``operations`` to the writer thread in one batch. Once it has
        ended (a close by another thread may come between a loop taking them and
        handing them over) the reads among them are refused here: nobody would
        answer them."""
        with self._lock:
            stopped = self._stopped
            if not stopped:
                self._queue.put(("batch", operations, None))
        if stopped:
            self._refuse_closed(operations)

    def _refuse_closed(self, operations: list[_Operation]) -> None:
        self._refuse(operations, lambda: self._error("closed before it was answered", None))

    def _break(self, error: BaseException, operations: list[_Operation]) -> None:
        """The loop's side of the writer failed: every flush waiting and every later
        call fails, chained to ``error``; the writer thread is told, and refuses
        ``operations`` and every later one."""
        with self._lock:
            self._broken = error
            waiters, self._waiters = self._waiters, []
        self._fail(waiters, lambda: self._refusal(error))
        self._send([("broken", error, None), *operations])

    def _after_fork(self, parent: int) -> None:
        """In a child forked from the process that started this journal: its
        writer thread did not come along, its lock may be held by a thread that
        did not either, and its SQLite connections and file lock are the
        parent's (a connection used across a fork can corrupt the file). Every
        call is refused at once, naming the fork, and nothing of the parent's
        is touched, not even by close(): the child opens a journal of its own."""
        self._lock = threading.Lock()
        self._writing = threading.Lock()
        self._forked_from = parent
        self._broken = JournalError(
            f"it was opened by process {parent}, and this process ({os.getpid()}) was forked "
            "from it; a journal does not cross a fork: open one in the child, on a file of "
            "its own"
        )
        self._closed = self._stopped = True
        self._waiters, self._pending, self._scheduled = [], [], None
        if self._writer is not None:
            # An end of pass the parent's loop had scheduled, run by a child
            # that forked on that loop, finds no connection to commit with.
            _INHERITED.append(self._writer)
            self._writer = None

    def _start(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None and not self._closed:
                thread = threading.Thread(
                    target=self._write_forever, name=f"kling-journal-{self.path.name}", daemon=True
                )
                thread.start()
                self._thread = thread
                _STARTED.add(self)

    # --- the writer thread ----------------------------------------------------------------

    def _connect(self, *, busy_timeout_ms: int, check_same_thread: bool) -> sqlite3.Connection:
        """A connection to the file with the journal's settings. No connection
        checkpoints on its own: the writer thread does (see _maybe_checkpoint)."""
        connection = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=check_same_thread
        )
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(f"PRAGMA synchronous={self.synchronous}")
            connection.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
            connection.execute("PRAGMA wal_autocheckpoint=0")
        except BaseException:
            connection.close()
            raise
        return connection

    def _open(self) -> sqlite3.Connection:
        """The writer thread's connection (reads, checkpoints, the commits it makes),
        with the schema made or migrated."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Created owner-only before SQLite opens it; SQLite gives its -wal and
        # -shm files the database file's permissions.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        connection = self._connect(busy_timeout_ms=_BUSY_TIMEOUT_MS, check_same_thread=True)
        try:
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise JournalError(
                    f"{self.path} was written by a newer kling_async (journal schema {version})"
                )
            _migrate(connection)
            connection.executescript(_SCHEMA)
            connection.executescript(_DURATIONS_SCHEMA)
        except BaseException:
            connection.close()
            raise
        return connection

    def _write_forever(self) -> None:
        try:
            self._write_until_closed()
        finally:
            # Whatever was handed over after the last batch served is answered
            # here, and what is handed over from now on by whoever hands it over.
            with self._lock:
                self._stopped = True
            self._refuse_closed(self._take(0))

    def _write_until_closed(self) -> None:
        ownership = _Ownership(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            ownership.acquire(self.wait, self._stop)
        except Exception as error:  # every request from now on gets the reason
            # Another owner is an answer for the caller, not a fault of this one.
            level = logging.INFO if isinstance(error, JournalInUseError) else logging.ERROR
            logger.log(level, "cannot open the journal %s: %s", self.path, error)
            self._refuse_forever(error, [])
            return
        connection: sqlite3.Connection | None = None
        try:
            connection = self._open()
            # The loop's connection: it never waits for a write lock (the loop
            # hands such a commit to this thread, which waits for it).
            writer = (
                self._connect(busy_timeout_ms=0, check_same_thread=False)
                if self._commits_on_loop
                else None
            )
        except Exception as error:
            if connection is not None:
                connection.close()
            ownership.release()
            logger.error("cannot open the journal %s: %s", self.path, error)
            self._refuse_forever(error, [])
            return
        with self._writing:
            self._writer = writer
        operations: list[_Operation] = []  # the first serve commits what waited for the file
        try:
            while self._serve(connection, operations):
                operations = []  # not kept alive (with their bodies) until the next batch
                operations = self._take(_CHECKPOINT_SECONDS)
        except BaseException as error:  # a writer that fails must not leave anyone waiting
            logger.critical(
                "the journal %s failed (%d entries not written); every call to it fails "
                "from now on",
                self.path,
                len(self._unwritten) + len(self._incoming),
                exc_info=True,
            )
            self._close_files(connection, ownership)
            self._refuse_forever(error, operations)
        finally:
            self._close_files(connection, ownership)

    def _close_files(self, connection: sqlite3.Connection, ownership: _Ownership) -> None:
        with self._writing:
            self._close_writer()
        with contextlib.suppress(Exception):
            connection.close()
        ownership.release()

    def _close_writer(self) -> None:
        """Close the loop's connection (called with _writing held): from now on
        a loop leaves its commits to this thread."""
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()

    def _take(self, timeout: float | None) -> list[_Operation]:
        """The next operation, and every one queued behind it (a hand-over's in
        order); none if ``timeout`` seconds pass first."""
        operations: list[_Operation] = []
        try:
            operation: _Operation | None = self._queue.get(timeout=timeout)
        except queue.Empty:
            return operations
        while operation is not None:
            if operation[0] == "batch":
                operations += operation[1]
            else:
                operations.append(operation)
            try:
                operation = self._queue.get_nowait()
            except queue.Empty:
                operation = None
        return operations

    def _serve(self, connection: sqlite3.Connection, operations: list[_Operation]) -> bool:
        """Commit what is recorded and not committed (with what earlier commits
        failed to write), then answer the reads that came after it, and checkpoint
        when due. Returns False after a close."""
        if any(op == "abandon" for op, _, _ in operations):
            return self._abandon_now(operations)
        closing = False
        for op, argument, _ in operations:
            if op == "broken":  # the loop's side failed: so does this one
                raise argument
            closing = closing or op == "close"
        with self._writing:
            with self._lock:
                writes = self._has_writes()
            if writes or closing:  # a close settles the count a flush after it reads
                self._commit(connection, on_loop=False)
            if closing:
                self._close_writer()
        answers = _Answers()
        for op, argument, reply in operations:
            if reply is None:
                continue
            if op == "select":
                sql, parameters = argument
                try:
                    answers.add(reply, connection.execute(sql, parameters).fetchall())
                except Exception as error:
                    answers.add(reply, error=self._error(f"cannot read it: {error}", error))
            else:  # "open": it is
                answers.add(reply)
        answers.send()
        if not closing:
            self._maybe_checkpoint(connection)
            return True
        if self._unwritten:
            logger.error(
                "journal %s closed with %d entries not written: %s",
                self.path,
                len(self._unwritten),
                self._failure,
            )
        self._fail_waiters("closed before they were committed")
        # Everything into the file, and an empty WAL left behind.
        self._checkpoint(connection, "TRUNCATE")
        return False

    def _maybe_checkpoint(self, connection: sqlite3.Connection) -> None:
        """Copy the WAL into the file when commits were made: after every
        _CHECKPOINT_COMMITS commits, or _CHECKPOINT_SECONDS after the last time."""
        behind = self._commits - self._checkpointed
        if behind and (
            behind >= _CHECKPOINT_COMMITS
            or time.monotonic() - self._checkpointed_at >= _CHECKPOINT_SECONDS
        ):
            self._checkpoint(connection, "PASSIVE")

    def _checkpoint(self, connection: sqlite3.Connection, mode: str) -> None:
        """Copy the WAL into the file (PASSIVE; TRUNCATE at close). A checkpoint
        fsyncs, which is why the loop's connection never runs one. Only logged
        when it fails: the WAL keeps what it did not copy.

        Held under _writing, so that no commit of this journal's lands during it
        (one that comes meanwhile is left to this thread, after it): the WAL is
        then copied whole, and starts over from its beginning, rather than grow
        for as long as commits keep coming while a checkpoint runs."""
        commits = self._commits
        try:
            with self._writing:
                busy, frames, copied = connection.execute(
                    f"PRAGMA wal_checkpoint({mode})"
                ).fetchone()
                if mode == "PASSIVE" and not busy and 0 < frames == copied:
                    # The next commit starts the WAL over, and the first frame of
                    # a WAL has its header fsynced: a write of nothing new (the
                    # schema version it holds) does that here, not in the loop's
                    # next commit.
                    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error as error:
            logger.debug("journal %s: checkpoint %s not done: %s", self.path, mode, error)
        self._checkpointed = commits
        self._checkpointed_at = time.monotonic()

    def _abandon_now(self, operations: list[_Operation]) -> bool:
        """Stop as a killed process would: what is not committed is lost."""
        with self._writing:
            self._close_writer()
            with self._lock:
                lost = len(self._unwritten | self._incoming)
                self._incoming.clear()
                self._durations.clear()
                waiters, self._waiters = self._waiters, []
            self._unwritten.clear()
        logger.warning("journal %s abandoned: %d entries not written", self.path, lost)
        self._fail(waiters, lambda: self._error("abandoned", None))
        self._refuse(operations, lambda: self._error("abandoned", None))
        return False

    # --- committing (by a loop, or by the writer thread) -------------------------------

    def _commit(self, connection: sqlite3.Connection, *, on_loop: bool) -> bool:
        """Write every entry recorded and not committed in one transaction, then
        the durations to save, then answer the flushes that waited for them (a
        save of durations counts as a record for them). Called with
        _writing held. A failure (any: a locked file, a full disk, text SQLite
        cannot encode) keeps the entries for the next try. Returns False when
        ``on_loop`` and another connection holds the write lock: the writer
        thread, which may wait for it, commits what is left (the entries, or the
        durations alone) and answers the flushes then."""
        with self._lock:
            upto = self._recorded
            incoming, self._incoming = self._incoming, {}
            durations, self._durations = self._durations, {}
        self._unwritten.update(incoming)  # the latest state wins
        self._unsaved_durations.update(durations)
        incoming, durations = {}, {}  # held by the journal now, not by this frame
        failure: BaseException | None = None  # why this commit fails its flushes
        while self._unwritten:
            entries = list(self._unwritten.values())
            try:
                rows = [_row(entry, with_body=not self._body_written(entry)) for entry in entries]
                if len(rows) <= _ROWS_PER_STATEMENT:
                    _upsert_many(connection, rows)  # one statement: a transaction of its own
                else:
                    with connection:
                        connection.execute("BEGIN IMMEDIATE")
                        _upsert_many(connection, rows)
            except Exception as error:
                if on_loop and _busy(error):
                    return False
                failure = self._failure = error
                logger.error(
                    "journal %s: %d entries not written (retried with the next commit): %s",
                    self.path,
                    len(entries),
                    error,
                )
                dropped = self._drop_unstorable(entries)
                if dropped:
                    with self._lock:
                        self._given_up += dropped
                        self._given_up_because = error
                entries, rows = [], []
                if not dropped:
                    break  # kept for the next commit
                # The others are written now, not left for a next commit that
                # may never come (a close, or nothing recorded any more).
            else:
                self._unwritten.clear()
                for entry in entries:
                    self._body_committed(entry)
                self._commits += 1
                if on_loop and self._commits - self._checkpoint_asked >= _CHECKPOINT_COMMITS:
                    self._checkpoint_asked = self._commits
                    self._queue.put(("checkpoint", None, None))
                # Let go of them before the flushes are answered: a caller woken by
                # the answer finds the batch gone, not still held by this frame.
                entries, rows = [], []
        if not self._unwritten:
            self._failure = None
        if not self._save_durations(connection, on_loop=on_loop):
            return False  # the writer thread saves them, and answers the flushes then
        self._settle(upto, failure)
        return True

    def _settle(self, upto: int, failure: BaseException | None) -> None:
        """Answer the flushes that wait for records up to ``upto``: all committed,
        or not (they fail, with ``failure``, when entries are kept for the next
        commit or were given up)."""
        given_up = 0
        with self._lock:
            if failure is None:
                self._committed = max(self._committed, upto)
            if not self._waiters:
                return
            due = [waiter for waiter in self._waiters if waiter[0] <= upto]
            if len(due) == len(self._waiters):
                self._waiters = []
            else:
                self._waiters = [waiter for waiter in self._waiters if waiter[0] > upto]
            if due and self._given_up:
                given_up, self._given_up = self._given_up, 0
                failure = failure or self._given_up_because
        answers = _Answers()
        for _target, loop, future in due:
            error = None if failure is None else self._not_written(failure, given_up)
            answers.add((loop, future), error=error)
        answers.send()

    def _fail_waiters(self, reason: str) -> None:
        with self._lock:
            waiters, self._waiters = self._waiters, []
        self._fail(waiters, lambda: self._error(reason, self._failure))

    @staticmethod
    def _fail(waiters: list[_Waiter], error: Callable[[], BaseException]) -> None:
        """Answer ``waiters`` (flushes taken off the list) each with an error of
        its own (see _error: one object raised to many would collect their frames)."""
        answers = _Answers()
        for _target, loop, future in waiters:
            answers.add((loop, future), error=error())
        answers.send()

    @staticmethod
    def _refuse(operations: list[_Operation], error: Callable[[], BaseException]) -> None:
        """Answer the reads and opens among ``operations`` each with an error of
        its own, as _fail answers flushes."""
        answers = _Answers()
        for _op, _argument, reply in operations:
            if reply is not None:
                answers.add(reply, error=error())
        answers.send()

    def _save_durations(self, connection: sqlite3.Connection, *, on_loop: bool) -> bool:
        """Write learned durations: an optimisation, so a failure is only logged.
        False, as for _commit, when the loop would have to wait for the file."""
        if not self._unsaved_durations:
            return True
        rows = list(self._unsaved_durations.values())
        try:
            with connection:
                connection.execute("BEGIN IMMEDIATE")
                connection.executemany(_SAVE_DURATIONS, rows)
                connection.execute(_TRIM_DURATIONS, (MAX_CACHED_KINDS,))
        except sqlite3.Error as error:
            if on_loop and _busy(error):
                return False
            logger.debug("journal %s: durations not written: %s", self.path, error)
        self._unsaved_durations.clear()
        return True

    def _drop_unstorable(self, entries: list[LedgerEntry]) -> int:
        """Entries SQLite can never store (text it cannot encode: validation refuses
        it in requests, but a key or an error message may carry it; an integer
        beyond 64 bits) fail the flushes that waited on them once, then are given
        up, so that they do not fail every later commit too. Returns how many
        were given up."""
        given_up = 0
        for entry in entries:
            try:
                for value in _row(entry):
                    if isinstance(value, str):
                        value.encode("utf-8")
                    elif isinstance(value, int) and not _SQLITE_MIN_INT <= value <= _SQLITE_MAX_INT:
                        raise OverflowError(f"{value} does not fit SQLite's 64-bit integers")
            except Exception as error:
                logger.error(
                    "journal %s: entry %s can never be written, given up: %s",
                    self.path,
                    entry.external_task_id,
                    error,
                )
                self._unwritten.pop(entry.external_task_id, None)
                given_up += 1
        return given_up

    def _body_written(self, entry: LedgerEntry) -> bool:
        return (
            entry.external_task_id in self._bodies_written
            or entry.external_task_id in self._settled_bodies
        )

    def _body_committed(self, entry: LedgerEntry) -> None:
        """Remember that ``entry``'s body is in the file, for as long as it matters:
        while the entry is unsettled, then among a bounded few recently settled."""
        external_task_id = entry.external_task_id
        if entry.state not in _SETTLED:
            self._bodies_written.add(external_task_id)
            return
        self._bodies_written.discard(external_task_id)
        self._settled_bodies.pop(external_task_id, None)
        self._settled_bodies[external_task_id] = None
        if len(self._settled_bodies) > _RECENTLY_SETTLED:
            del self._settled_bodies[next(iter(self._settled_bodies))]

    # --- errors -------------------------------------------------------------------------

    def _not_written(self, failure: BaseException, given_up: int) -> JournalError:
        kept = f"{len(self._unwritten)} entries recorded before this flush are not committed yet"
        if given_up:
            kept = (
                f"{given_up} entries recorded before this flush can never be written and "
                f"were given up, {len(self._unwritten)} are not committed yet"
            )
        return self._error(f"{kept}: {failure}", failure)

    def _error(self, reason: str, cause: BaseException | None) -> JournalError:
        """A new error for each caller, chained to ``cause``: one exception object
        raised to many callers would collect every raise's frames in its traceback."""
        error = JournalError(f"journal {self.path}: {reason}")
        error.__cause__ = cause
        return error

    def _refusal(self, cause: BaseException) -> JournalError:
        if isinstance(cause, JournalInUseError):
            error: JournalError = JournalInUseError(
                cause.path, pid=cause.pid, host=cause.host, since=cause.since
            )
            error.__cause__ = cause
            return error
        return self._error(f"cannot be used: {cause}", cause)

    def _refuse_forever(self, cause: BaseException, pending: list[_Operation]) -> None:
        """Answer the flushes waiting, the operations left pending and every later
        one with an error of its own chained to ``cause``, until the journal is
        closed. What was recorded and not committed is never written."""
        with self._lock:
            self._broken = cause
            waiters, self._waiters = self._waiters, []
            self._incoming.clear()
            self._durations.clear()
        self._fail(waiters, lambda: self._refusal(cause))
        operations = pending
        while True:
            self._refuse(operations, lambda: self._refusal(cause))
            if any(op in ("close", "abandon") for op, _argument, _reply in operations):
                return
            operations = self._take(None)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _busy(error: BaseException) -> bool:
    """Whether ``error`` says another connection holds the file's lock."""
    if not isinstance(error, sqlite3.OperationalError):
        return False
    code = getattr(error, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return bool(code & 0xFF == _SQLITE_BUSY)
    return "locked" in str(error) or "busy" in str(error)


class JournalDurations:
    """A journal's table of learned task durations, for one API root (``scope``):
    the client's :class:`~kling_async._durations.DurationStore` when it has a
    journal. Read on first use from a read-only connection of its own (a small
    table, read once); written by the journal's next commit, as a record is (on
    the loop, or by the journal's thread), so it is committed before the journal
    closes. Never raises."""

    def __init__(self, journal: Journal, scope: str) -> None:
        self.journal = journal
        self.scope = scope

    def load(self) -> dict[Kind, list[float]]:
        path = self.journal.path
        if not path.exists():
            return {}
        try:
            connection = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True)
            try:
                rows = connection.execute("SELECT key, seconds FROM durations").fetchall()
            finally:
                connection.close()
        except sqlite3.Error as error:  # no table yet, a file that is no journal
            logger.debug("journal %s: no durations read: %s", path, error)
            return {}
        return read_entries(self.scope, ((key, _seconds(text)) for key, text in rows))

    def save(self, recent: Mapping[Kind, Sequence[float]]) -> None:
        journal = self.journal
        if journal._closed:
            return
        now = time.time()
        rows = [
            (entry_key(self.scope, kind), _json(list(seconds)[-WINDOW:]), now)
            for kind, seconds in recent.items()
            if seconds
        ]
        if rows:
            journal._save_later(rows)


def _seconds(text: Any) -> object:
    """A stored durations list as the entry :func:`read_entries` takes."""
    try:
        return {"seconds": json.loads(text)}
    except (TypeError, ValueError):
        return None


_Settle = tuple["asyncio.Future[Any]", Any, "BaseException | None"]


class _Answers:
    """Replies to the callers' futures, sent to each event loop in one call:
    waking a loop from another thread is a system call, not to be paid per
    create when a hundred flushes were served by one commit."""

    def __init__(self) -> None:
        self._by_loop: dict[asyncio.AbstractEventLoop, list[_Settle]] = {}

    def add(self, reply: _Reply, value: Any = None, *, error: BaseException | None = None) -> None:
        loop, future = reply
        self._by_loop.setdefault(loop, []).append((future, value, error))

    def send(self) -> None:
        here = _running_loop()
        for loop, replies in self._by_loop.items():
            if loop is here:  # answered on its own thread: no wake-up needed
                _settle_all(replies)
                continue
            with contextlib.suppress(RuntimeError):  # that loop has closed: nobody waits
                loop.call_soon_threadsafe(_settle_all, replies)


def _settle_all(replies: list[_Settle]) -> None:
    for future, value, error in replies:
        if future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
