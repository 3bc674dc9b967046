"""Bounded stress: the journal is closed by one thread while loops on other
threads record, flush and read, and plain threads record.

Promises checked: no call waits for ever (10 s), and every entry whose flush
returned is in the file at the version recorded before that flush. Each round
uses a fresh journal. Exits 1 on a broken promise.
Usage: stress_close_race.py [seconds]
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

from kling_async import EntryState, Journal, JournalError, LedgerEntry
from kling_async._models import Endpoint

WAIT = 10.0


def entry(external_task_id: str, version: int) -> LedgerEntry:
    return LedgerEntry(
        external_task_id=external_task_id,
        endpoint=Endpoint.GENERATIONS,
        body={"prompt": "p", "model_name": "kling-v3", "external_task_id": external_task_id},
        state=EntryState.INTENDED,
        status=f"v{version}",
    )


def one_round(directory: Path, number: int, rng: random.Random) -> list[str]:
    problems: list[str] = []
    journal = Journal(directory / f"j{number}.db")
    flushed: dict[str, int] = {}  # id -> version whose flush returned
    stop = threading.Event()

    async def creates(side: str) -> None:
        version = 0
        while not stop.is_set():
            version += 1
            external_task_id = f"{side}-{version % 7}"
            journal.record(entry(external_task_id, version))
            try:
                if rng.random() < 0.3:
                    await asyncio.wait_for(journal.get(external_task_id), WAIT)
                await asyncio.wait_for(journal.flush(), WAIT)
            except TimeoutError:
                problems.append(f"{side}: a call hung")
                return
            except JournalError:
                return  # closed: said so
            flushed[external_task_id] = version
            await asyncio.sleep(0)

    def on_a_loop(side: str) -> None:
        asyncio.run(creates(side))

    def records(side: str) -> None:
        version = 0
        while not stop.is_set():
            version += 1
            journal.record(entry(f"{side}-{version % 7}", version))

    asyncio.run(journal.open())
    workers = [threading.Thread(target=on_a_loop, args=(f"L{n}",)) for n in range(2)]
    workers.append(threading.Thread(target=records, args=("T",)))
    for worker in workers:
        worker.start()
    time.sleep(rng.random() * 0.02)
    try:
        asyncio.run(asyncio.wait_for(journal.close(), WAIT))
    except TimeoutError:
        problems.append("close hung")
    time.sleep(0.01)
    stop.set()
    for worker in workers:
        worker.join(3 * WAIT)
        if worker.is_alive():
            problems.append("a worker hung")
    with sqlite3.connect(journal.path) as db:
        found = dict(db.execute("SELECT external_task_id, status FROM entries").fetchall())
    for external_task_id, version in flushed.items():
        status = found.get(external_task_id)
        if status is None or int(status[1:]) < version:
            problems.append(f"flushed {external_task_id} v{version}, file has {status}")
    return problems


def main() -> int:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 30.0
    sys.setswitchinterval(1e-6)
    directory = Path(tempfile.mkdtemp())
    rng = random.Random(1)
    deadline = time.monotonic() + seconds
    rounds = 0
    problems: list[str] = []
    while time.monotonic() < deadline and not problems:
        problems = one_round(directory, rounds, rng)
        rounds += 1
    print(f"{rounds} rounds")
    for problem in problems[:10]:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
