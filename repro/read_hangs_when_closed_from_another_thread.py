"""A read asked on one loop while another thread closes the journal hangs for ever.

Loop B records an entry and asks a read; its end of pass takes the read off
_pending and, before handing it to the writer thread, is held (as a busy
interpreter or a long commit would hold it) while the main thread closes the
journal: the writer serves the close and exits, and B's hand-over goes into a
queue nobody reads. Exits 1 while the read hangs.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import threading
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


def main() -> int:
    path = Path(tempfile.mkdtemp()) / "journal.db"
    journal = Journal(path)
    asyncio.run(journal.open())
    taken, go = threading.Event(), threading.Event()
    commit_here = journal._commit_here

    def held() -> bool:
        if threading.current_thread().name == "B":
            taken.set()
            go.wait(10)
        return commit_here()

    journal._commit_here = held  # type: ignore[method-assign]
    outcome: list[str] = []

    async def read() -> LedgerEntry | None:
        journal.record(entry("b"))  # in the same pass as the read
        return await journal.get("b")

    async def on_b() -> None:
        try:
            await asyncio.wait_for(read(), 3.0)
            outcome.append("answered")
        except TimeoutError:
            outcome.append("hung")
        except Exception as error:
            outcome.append(f"refused: {type(error).__name__}")

    b = threading.Thread(target=lambda: asyncio.run(on_b()), name="B")
    b.start()
    assert taken.wait(10)
    asyncio.run(asyncio.wait_for(journal.close(), 10))
    go.set()
    b.join()
    print("read on loop B:", outcome[0])
    return 1 if outcome[0] == "hung" else 0


if __name__ == "__main__":
    sys.exit(main())
