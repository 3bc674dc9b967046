"""A flush says OK for an entry a closed (or abandoned) journal never wrote.

record() on a closed journal drops the entry (a debug log) and flush() returns
at once, so a create that recorded its intent after the journal closed would be
sent with no intent in the file. Also a record that checked _closed just before
another thread closed the journal puts its entry in after the close's commit.
Exits 1 while a flush returns OK for an entry not in the file.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import tempfile
from pathlib import Path

from kling_async import EntryState, Journal, LedgerEntry
from kling_async._models import Endpoint


def entry(external_task_id: str) -> LedgerEntry:
    return LedgerEntry(
        external_task_id=external_task_id,
        endpoint=Endpoint.GENERATIONS,
        body={"prompt": "p", "model_name": "kling-v3", "external_task_id": external_task_id},
        state=EntryState.INTENDED,
    )


def in_file(path: Path, external_task_id: str) -> bool:
    with sqlite3.connect(path) as db:
        return bool(
            db.execute(
                "SELECT 1 FROM entries WHERE external_task_id = ?", (external_task_id,)
            ).fetchone()
        )


async def flush_says_ok(journal: Journal) -> bool:
    try:
        await asyncio.wait_for(journal.flush(), 5)
    except Exception:
        return False
    return True


async def main() -> int:
    bad = 0
    directory = Path(tempfile.mkdtemp())
    closed = Journal(directory / "closed.db")
    closed.record(entry("before"))
    await closed.close()
    closed.record(entry("after-close"))
    if await flush_says_ok(closed) and not in_file(closed.path, "after-close"):
        print("closed journal: flush OK, entry not in the file")
        bad = 1
    abandoned = Journal(directory / "abandoned.db")
    abandoned.record(entry("committed"))
    await abandoned.flush()
    abandoned.record(entry("lost"))
    abandoned._abandon()
    if await flush_says_ok(abandoned) and not in_file(abandoned.path, "lost"):
        print("abandoned journal: flush OK, entry not in the file")
        bad = 1
    await abandoned.close()
    return bad


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
