"""The durable ledger: a SQLite journal that survives a crash.

``Client(journal="out/kling-journal.db")`` (or a :class:`Journal`) records every
create's intent before it is sent, then its task_id, its status changes, its
result URLs and which images were downloaded. After a crash, ``await
client.resume()`` reads it back and settles every create that did not end, and a
batch run again over the same input skips what is done.

Writes never block the event loop: :meth:`Journal.record` puts the entry on a
queue, and one thread of the journal's own writes whatever has queued up in one
transaction (a group commit), so a hundred creates in flight cost one commit, not
a hundred. :meth:`Journal.flush` returns once everything recorded before it is
committed: the create's owner awaits it between recording an intent and sending
the create.

The database runs in WAL mode with ``synchronous=NORMAL`` by default: a commit
survives the process being killed (SIGKILL included); only a power loss or an OS
crash may roll back the last commits. ``Journal(path, synchronous="FULL")``
survives those too, at the price of an fsync per commit. The file is created
readable by its owner only; it never holds a credential.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import sqlite3
import threading
from pathlib import Path
from typing import Any, Final, Literal

from ._ledger import EntryState, LedgerEntry
from ._wire import converter

__all__ = ["Journal"]

logger = logging.getLogger("kling_async")

SCHEMA_VERSION: Final = 1
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
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_by_key ON entries (key);
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
_UNSETTLED: Final = tuple(state.value for state in EntryState if not state.settled)

Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]

# An operation for the writer thread: a write, or a read answered through a
# future on the caller's loop.
_Reply = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _row(entry: LedgerEntry, *, with_body: bool = True) -> tuple[Any, ...]:
    """The entry as a row; written by hand, field by field, since the writer
    thread shares the interpreter with the event loop and this runs per record."""
    return (
        entry.external_task_id,
        entry.endpoint.value,
        _json(entry.body) if with_body else None,
        entry.units,
        entry.state.value,
        entry.task_id,
        entry.status,
        _json([converter.unstructure(image) for image in entry.images]) if entry.images else "[]",
        entry.error,
        int(entry.receiver_callback),
        entry.key,
        entry.owner,
        _json(entry.downloaded) if entry.downloaded else "[]",
        entry.intended_at,
        entry.updated_at,
    )


def _entry(row: tuple[Any, ...]) -> LedgerEntry:
    data = dict(zip(_COLUMNS, row, strict=True))
    for column in _JSON_COLUMNS:
        data[column] = json.loads(data[column] or "{}")
    data["receiver_callback"] = bool(data["receiver_callback"])
    return converter.structure(data, LedgerEntry)


class Journal:
    """A :class:`~kling_async.Ledger` kept in a SQLite file (see the module docstring).

    Nothing is opened until first use. ``close()`` commits what is queued and
    closes the file; a :class:`Client` closes the journals it opened from a path.
    """

    #: The create owner keeps a journal's entries current with status changes
    #: and results (an in-memory ledger does not need them).
    records_results: Final = True

    def __init__(
        self, path: str | os.PathLike[str], *, synchronous: Synchronous = "NORMAL"
    ) -> None:
        if synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be OFF, NORMAL, FULL or EXTRA, got {synchronous!r}")
        self.path = Path(path)
        self.synchronous = synchronous
        self._queue: queue.SimpleQueue[tuple[str, Any, _Reply | None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        # Entries whose body this journal has written (the writer thread's own).
        self._bodies_written: set[str] = set()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._thread else "not opened"
        return f"<Journal {str(self.path)!r} {state}>"

    # --- the Ledger protocol -----------------------------------------------------------

    def record(self, entry: LedgerEntry) -> None:
        """Queue ``entry`` to be written; never blocks."""
        if self._closed:
            logger.debug("journal %s is closed; entry %s not written", self.path, entry)
            return
        self._start()
        self._queue.put(("write", entry, None))

    async def flush(self) -> None:
        """Return once every entry recorded so far is committed."""
        if self._thread is None or self._closed:
            return
        await self._ask("flush", None)

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

    async def close(self) -> None:
        """Commit what is queued, stop the writer and close the file; idempotent."""
        if self._closed:
            return
        if self._thread is not None:
            await self._ask("close", None)
            await asyncio.to_thread(self._thread.join)
        self._closed = True

    # --- the writer thread ----------------------------------------------------------------

    def _start(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None:
                thread = threading.Thread(
                    target=self._write_forever, name=f"kling-journal-{self.path.name}", daemon=True
                )
                thread.start()
                self._thread = thread

    async def _ask(self, op: str, argument: Any) -> Any:
        if self._closed:
            raise RuntimeError(f"the journal {self.path} is closed")
        self._start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.put((op, argument, (loop, future)))
        return await future

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Created owner-only before SQLite opens it; SQLite gives its -wal and
        # -shm files the database file's permissions.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute(f"PRAGMA synchronous={self.synchronous}")
        connection.execute("PRAGMA busy_timeout=10000")
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path} was written by a newer kling_async (journal schema {version})"
            )
        connection.executescript(_SCHEMA)
        return connection

    def _write_forever(self) -> None:
        try:
            connection = self._open()
        except Exception as error:  # every request from now on gets the reason
            logger.error("cannot open the journal %s: %s", self.path, error)
            self._refuse_forever(error)
            return
        try:
            while self._serve_batch(connection):
                pass
        finally:
            connection.close()

    def _serve_batch(self, connection: sqlite3.Connection) -> bool:
        """Write everything queued in one transaction, then answer the reads and
        flushes that came with it. Returns False after a close."""
        operations = [self._queue.get()]
        while True:
            try:
                operations.append(self._queue.get_nowait())
            except queue.Empty:
                break
        rows = []
        for op, argument, _ in operations:
            if op == "write":
                known = argument.external_task_id in self._bodies_written
                rows.append(_row(argument, with_body=not known))
                self._bodies_written.add(argument.external_task_id)
        failure: BaseException | None = None
        if rows:
            try:
                with connection:
                    connection.execute("BEGIN")
                    connection.executemany(_UPSERT, rows)
            except sqlite3.Error as error:
                failure = error
                logger.error("journal %s: %d entries not written: %s", self.path, len(rows), error)
        keep_going = True
        answers = _Answers()
        for op, argument, reply in operations:
            if reply is None:
                continue
            if op == "select":
                sql, parameters = argument
                try:
                    answers.add(reply, connection.execute(sql, parameters).fetchall())
                except sqlite3.Error as error:
                    answers.add(reply, error=error)
            else:
                answers.add(reply, error=failure)
            keep_going = keep_going and op != "close"
        answers.send()
        return keep_going

    def _refuse_forever(self, error: BaseException) -> None:
        while True:
            op, _argument, reply = self._queue.get()
            if reply is not None:
                answers = _Answers()
                answers.add(reply, error=error if op != "close" else None)
                answers.send()
            if op == "close":
                return


_Settle = tuple["asyncio.Future[Any]", Any, "BaseException | None"]


class _Answers:
    """Replies to the callers' futures, sent to each event loop in one call:
    waking a loop from another thread is a system call, not to be paid per
    create when a hundred flushes were served by one commit."""

    def __init__(self) -> None:
        self._by_loop: dict[asyncio.AbstractEventLoop, list[_Settle]] = {}

    def add(self, reply: _Reply, value: Any = None, *, error: BaseException | None = None) -> None:
        loop, future = reply
        if isinstance(error, sqlite3.Error):
            error = OSError(f"journal: {error}")
        self._by_loop.setdefault(loop, []).append((future, value, error))

    def send(self) -> None:
        for loop, replies in self._by_loop.items():
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
