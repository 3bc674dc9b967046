"""A fake server's tasks kept in a file between runs (``state_file=``).

The CLI's offline simulation starts a new FakeKlingServer for every command; this
is what lets ``status``, ``list`` and ``download`` find a task an earlier
``generate`` made. The file is a convenience of a simulation, not a database:
a missing or unreadable one starts empty, and it keeps the newest
:data:`MAX_SAVED_TASKS` tasks.

It is written through (:class:`StateWriter`): every change of a task is on disk
before the server's next answer leaves, and a change no answer follows (a
task's timer ending it) within :data:`WRITE_DELAY` seconds. Each write replaces
the whole file atomically, so a server killed at any moment (SIGKILL included)
leaves the file as of its last answer: a task whose create was answered is
never lost, and a rerun of a killed batch finds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ._tasks import FakeTask

__all__ = ["MAX_SAVED_TASKS", "WRITE_DELAY", "StateWriter", "load_tasks"]

logger = logging.getLogger("kling_async.testing")

MAX_SAVED_TASKS = 1000
#: Seconds a change no answer follows waits to be written: changes that come
#: together (tasks of a batch ending) make one write.
WRITE_DELAY = 0.05
_FORMAT = "kling-async fake server state 1"
# Not kept: images may be megabytes of base64, and a callback URL would send a
# later run's updates to a receiver long gone.
_DROPPED_BODY_FIELDS = frozenset(
    ("image", "subject_image_list", "scene_image", "style_image", "callback_url")
)


def _record(task: FakeTask) -> dict[str, Any]:
    return {
        "task_id": task.task_id,
        "endpoint": task.endpoint,
        "external_task_id": task.external_task_id,
        "body": {k: v for k, v in task.body.items() if k not in _DROPPED_BODY_FIELDS},
        "n": task.n,
        "status": task.status,
        "status_message": task.status_message,
        "created_at_ms": task.created_at_ms,
        "updated_at_ms": task.updated_at_ms,
        "final_unit_deduction": task.final_unit_deduction,
    }


def _task(record: dict[str, Any]) -> FakeTask:
    # Result URLs are left out: they name the port of the run that made them,
    # so the server that loads the task gives it URLs of its own.
    return FakeTask(
        task_id=str(record["task_id"]),
        endpoint=str(record["endpoint"]),
        external_task_id=record["external_task_id"],
        body=dict(record["body"]),
        n=int(record["n"]),
        status=str(record["status"]),
        status_message=str(record["status_message"]),
        created_at_ms=int(record["created_at_ms"]),
        updated_at_ms=int(record["updated_at_ms"]),
        final_unit_deduction=str(record["final_unit_deduction"]),
    )


def _read(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError):
        return []  # unreadable or corrupt: a simulation starts afresh
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        return []
    records = data.get("tasks")
    return [r for r in records if isinstance(r, dict)] if isinstance(records, list) else []


def load_tasks(path: str | os.PathLike[str]) -> list[FakeTask]:
    """The tasks saved in ``path``, oldest first; none if it is missing or unreadable."""
    tasks = []
    for record in _read(Path(path)):
        try:
            tasks.append(_task(record))
        except (KeyError, TypeError, ValueError):
            continue  # one damaged record does not cost the others
    tasks.sort(key=lambda task: task.created_at_ms)
    return tasks


class StateWriter:
    """Keeps ``path`` current with ``tasks()``: :meth:`changed` marks the tasks
    dirty, :meth:`flush` writes them if they are (one atomic replace however
    many changes came since the last one).

    The server awaits :meth:`written` before each answer it sends, so what an
    answer told a client (a task created) is on disk before the client hears
    it; a timer flushes changes no answer follows. A write that fails is logged
    and tried again at the next flush; :meth:`close` raises its ``OSError``.

    Writes stay cheap however often they come: each task is encoded again only
    when it changed, and the file is read back (to keep the tasks another
    server saved in it since) only when someone else wrote it.
    """

    def __init__(
        self, path: str | os.PathLike[str], tasks: Callable[[], Iterable[FakeTask]]
    ) -> None:
        self._path = Path(path)
        self._tasks = tasks
        self._dirty = False
        self._timer: asyncio.TimerHandle | None = None
        self._group: asyncio.Future[None] | None = None
        self._failing = False
        #: This server's tasks as saved: task_id -> (updated_at_ms, its record's JSON).
        self._encoded: dict[str, tuple[int, str]] = {}
        #: Tasks other servers saved in the file: task_id -> (created_at_ms, JSON).
        self._others: dict[str, tuple[int, str]] = {}
        #: The file as this writer left it (inode, mtime, size), to tell another's write.
        self._left: tuple[int, int, int] | None = None

    def changed(self) -> None:
        """A task was created or changed: write it soon, and before the next answer."""
        self._dirty = True
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(WRITE_DELAY, self._on_timer)

    async def written(self) -> None:
        """Return once every change made so far is on disk (or its write failed
        and was logged). Callers that ask in the same moment (answers prepared in
        one turn of the event loop) share one write."""
        if not self._dirty:
            return
        if self._group is None:
            loop = asyncio.get_running_loop()
            self._group = loop.create_future()
            loop.call_soon(self._write_group)
        await asyncio.shield(self._group)

    def _write_group(self) -> None:
        group, self._group = self._group, None
        self.flush()
        if group is not None and not group.done():
            group.set_result(None)

    def flush(self) -> None:
        """Write the tasks now if anything changed since the last write; a failure
        is logged (once while it lasts) and left for the next flush."""
        try:
            self._write()
        except OSError as error:
            if not self._failing:
                logger.warning("the fake server cannot save its tasks in %s: %s", self._path, error)
            self._failing = True
        else:
            self._failing = False

    def close(self) -> None:
        """Stop the timer and write what is left; raises ``OSError`` if it cannot."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._dirty = True  # one last write even when nothing changed, as before
        self._write()

    def _on_timer(self) -> None:
        self._timer = None
        self.flush()

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            status = self._path.stat()
        except FileNotFoundError:
            return None
        return status.st_ino, status.st_mtime_ns, status.st_size

    def _write(self) -> None:
        if not self._dirty:
            return
        if self._left is None or self._stamp() != self._left:
            self._others = {}
            for record in _read(self._path):
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    self._others[str(record["task_id"])] = (
                        int(record["created_at_ms"]),
                        json.dumps(record, separators=(",", ":")),
                    )
        merged = dict(self._others)
        for task in self._tasks():
            saved = self._encoded.get(task.task_id)
            if saved is None or saved[0] != task.updated_at_ms:
                saved = (task.updated_at_ms, json.dumps(_record(task), separators=(",", ":")))
                self._encoded[task.task_id] = saved
            merged[task.task_id] = (task.created_at_ms, saved[1])
        newest = sorted(merged.values(), key=lambda item: item[0])[-MAX_SAVED_TASKS:]
        tasks = ",".join(encoded for _, encoded in newest)
        text = f'{{"format":{json.dumps(_FORMAT)},"tasks":[{tasks}]}}'
        _replace(self._path, text)
        self._left = self._stamp()
        self._dirty = False


def _replace(target: Path, text: str) -> None:
    """Write ``text`` to ``target`` by an atomic rename: a reader (or a kill) never
    meets half a file. Raises ``OSError`` if it cannot be written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
    try:
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, target)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise
