"""A flush on one loop while another thread closes the journal hangs for ever.

flush() checks _closed before taking the lock. Loop B's flush passes that check,
the main thread closes the journal (the writer commits, fails the flushes then
waiting, and exits), a record from thread C that had passed its own _closed
check lands after that, and B's flush then registers a waiter for it: B's end of
pass finds the loop's connection closed and leaves the commit to a writer
thread that is gone. The interleaving is forced by holding B and C at those
points. Exits 1 while the flush hangs.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from kling_async import EntryState, Journal, LedgerEntry
from kling_async._models import Endpoint


def entry(external_task_id: str) -> LedgerEntry:
    return LedgerEntry(
        external_task_id=external_task_id,
        endpoint=Endpoint.GENERATIONS,
        body={"prompt": "p", "model_name": "kling-v3", "external_task_id": external_task_id},
        state=EntryState.INTENDED,
    )


class Gate:
    """Holds the named thread at its first pass, until let go."""

    def __init__(self, name: str) -> None:
        self.name, self.reached, self.go, self.armed = (
            name,
            threading.Event(),
            threading.Event(),
            True,
        )

    def __call__(self) -> None:
        if threading.current_thread().name == self.name and self.armed:
            self.armed = False
            self.reached.set()
            self.go.wait(10)


class GatedLock:
    def __init__(self, lock: Any, gate: Gate) -> None:
        self.lock, self.gate = lock, gate

    def __enter__(self) -> bool:
        self.gate()
        return bool(self.lock.__enter__())

    def __exit__(self, *exc: object) -> None:
        self.lock.__exit__(*exc)


def main() -> int:
    path = Path(tempfile.mkdtemp()) / "journal.db"
    journal = Journal(path)
    journal.record(entry("a"))
    asyncio.run(journal.open())
    gate_b, gate_c = Gate("B"), Gate("C")
    start = journal._start

    def held_start() -> None:
        gate_c()
        start()

    journal._start = held_start  # type: ignore[method-assign]
    outcome: list[str] = []

    async def on_b() -> None:
        journal._lock = GatedLock(journal._lock, gate_b)  # type: ignore[assignment]
        try:
            await asyncio.wait_for(journal.flush(), 3.0)
            outcome.append("returned")
        except TimeoutError:
            outcome.append("hung")
        except Exception as error:
            outcome.append(f"refused: {type(error).__name__}")

    c = threading.Thread(target=lambda: journal.record(entry("c")), name="C")
    c.start()
    assert gate_c.reached.wait(10)
    b = threading.Thread(target=lambda: asyncio.run(on_b()), name="B")
    b.start()
    assert gate_b.reached.wait(10)
    asyncio.run(asyncio.wait_for(journal.close(), 10))
    gate_c.go.set()
    c.join()
    gate_b.go.set()
    b.join()
    print("flush on loop B:", outcome[0])
    return 1 if outcome[0] == "hung" else 0


if __name__ == "__main__":
    sys.exit(main())
