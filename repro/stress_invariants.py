"""Bounded stress of the journal's promises, across loops and threads.

Two event loops (the main one and one in a thread), each with several tasks,
and two plain threads record versions of entries of their own (``status`` holds
the version), with durations saved in between, tiny commit limits (checkpoints
every 3 commits, loop commits of at most 5 rows) and a 1 us switch interval.
Each loop task, after a flush that returned, checks through a read that each
of its entries holds its latest version, and now and then through a connection
of its own. At the end every version recorded must be the one in the file.
Exits 1 on any broken promise, a hang (a call waiting 10 s) included.
Usage: stress_invariants.py [seconds] [NORMAL|FULL]
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

from kling_async import EntryState, Journal, LedgerEntry
from kling_async import _journal as journal_module
from kling_async._models import Endpoint

WAIT = 10.0
problems: list[str] = []


def entry(external_task_id: str, version: int) -> LedgerEntry:
    return LedgerEntry(
        external_task_id=external_task_id,
        endpoint=Endpoint.GENERATIONS,
        body={"prompt": "p", "model_name": "kling-v3", "external_task_id": external_task_id},
        state=EntryState.INTENDED if version == 0 else EntryState.CREATED,
        task_id=None if version == 0 else f"t-{external_task_id}",
        status=f"v{version}",
    )


def in_file(path: Path, ids: list[str]) -> dict[str, str]:
    with sqlite3.connect(path, timeout=10) as db:
        marks = ",".join("?" for _ in ids)
        return dict(
            db.execute(
                f"SELECT external_task_id, status FROM entries WHERE external_task_id IN ({marks})",
                ids,
            ).fetchall()
        )


async def creates(journal: Journal, side: str, deadline: float, latest: dict[str, int]) -> None:
    rng = random.Random(side)
    ids = [f"{side}-{n}" for n in range(rng.randint(1, 30))]
    durations = journal_module.JournalDurations(journal, f"https://{side}")
    rounds = 0
    while time.monotonic() < deadline and not problems:
        rounds += 1
        for external_task_id in rng.sample(ids, rng.randint(1, len(ids))):
            latest[external_task_id] = latest.get(external_task_id, -1) + 1
            journal.record(entry(external_task_id, latest[external_task_id]))
        if rng.random() < 0.2:
            durations.save({("image", "kling-v1", 1): [rng.random() * 100]})
        if rng.random() < 0.3:
            await asyncio.sleep(rng.random() * 0.003)
        try:
            await asyncio.wait_for(journal.flush(), WAIT)
        except TimeoutError:
            problems.append(f"{side}: a flush hung")
            return
        mine = [i for i in ids if i in latest]
        if rng.random() < 0.5:
            probe = rng.choice(mine)
            got = await asyncio.wait_for(journal.get(probe), WAIT)
            if got is None or got.status != f"v{latest[probe]}":
                problems.append(
                    f"{side}: read after flush: {probe} is "
                    f"{got and got.status}, recorded v{latest[probe]}"
                )
        if rounds % 20 == 0:
            found = await asyncio.to_thread(in_file, journal.path, mine)
            for i in mine:
                if found.get(i) != f"v{latest[i]}":
                    problems.append(
                        f"{side}: file after flush: {i} is {found.get(i)}, v{latest[i]}"
                    )


def records_from_a_thread(
    journal: Journal, side: str, deadline: float, latest: dict[str, int]
) -> None:
    rng = random.Random(side)
    ids = [f"{side}-{n}" for n in range(50)]
    while time.monotonic() < deadline and not problems:
        external_task_id = rng.choice(ids)
        latest[external_task_id] = latest.get(external_task_id, -1) + 1
        journal.record(entry(external_task_id, latest[external_task_id]))
        if rng.random() < 0.01:
            time.sleep(0.001)


async def one_loop(journal: Journal, name: str, deadline: float, latest: dict[str, int]) -> None:
    await asyncio.gather(*(creates(journal, f"{name}{t}", deadline, latest) for t in range(6)))


def main() -> int:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 20.0
    synchronous = sys.argv[2] if len(sys.argv) > 2 else "NORMAL"
    journal_module._CHECKPOINT_COMMITS = 3  # type: ignore[misc]
    journal_module._LOOP_COMMIT_ROWS = 5  # type: ignore[misc]
    path = Path(tempfile.mkdtemp()) / "journal.db"
    journal = Journal(path, synchronous=synchronous)  # type: ignore[arg-type]
    latest: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    sys.setswitchinterval(1e-6)
    workers = [
        threading.Thread(target=lambda: asyncio.run(one_loop(journal, "L", deadline, latest))),
        threading.Thread(target=records_from_a_thread, args=(journal, "T1", deadline, latest)),
        threading.Thread(target=records_from_a_thread, args=(journal, "T2", deadline, latest)),
    ]
    for worker in workers:
        worker.start()

    async def main_loop() -> None:
        await one_loop(journal, "M", deadline, latest)
        for worker in workers:
            await asyncio.to_thread(worker.join)
        sys.setswitchinterval(0.005)
        try:
            await asyncio.wait_for(journal.flush(), WAIT)
        except TimeoutError:
            problems.append("the last flush hung")
        ids = list(latest)
        found: dict[str, str] = {}
        for start in range(0, len(ids), 500):
            found.update(await asyncio.to_thread(in_file, path, ids[start : start + 500]))
        wrong = [i for i in ids if found.get(i) != f"v{latest[i]}"]
        if wrong:
            problems.append(
                f"{len(wrong)} of {len(ids)} entries not at their last version: {wrong[:5]}"
            )
        await asyncio.wait_for(journal.close(), WAIT)
        records = sum(latest.values()) + len(ids)
        print(f"{len(ids)} entries, {records} records, {journal._commits} commits")

    asyncio.run(main_loop())
    for problem in problems[:20]:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
