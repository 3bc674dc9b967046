"""A fake server's tasks kept in a file between runs (``state_file=``).

The CLI's offline simulation starts a new FakeKlingServer for every command; this
is what lets ``status``, ``list`` and ``download`` find a task an earlier
``generate`` made. The file is a convenience of a simulation, not a database:
a missing or unreadable one starts empty, and it keeps the newest
:data:`MAX_SAVED_TASKS` tasks.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ._tasks import FakeTask

__all__ = ["MAX_SAVED_TASKS", "load_tasks", "save_tasks"]

MAX_SAVED_TASKS = 1000
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


def save_tasks(path: str | os.PathLike[str], tasks: Iterable[FakeTask]) -> None:
    """Save ``tasks`` to ``path``, merged into what it holds now (another process
    may have saved since this one loaded), keeping the newest
    :data:`MAX_SAVED_TASKS`. Written to a temporary file and renamed, so a
    reader never sees half a file. Raises ``OSError`` if it cannot be written.
    """
    target = Path(path)
    merged = {task.task_id: task for task in load_tasks(target)}
    merged.update((task.task_id, task) for task in tasks)
    newest = sorted(merged.values(), key=lambda task: task.created_at_ms)[-MAX_SAVED_TASKS:]
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
    try:
        partial.write_text(
            json.dumps(
                {"format": _FORMAT, "tasks": [_record(task) for task in newest]},
                separators=(",", ":"),
            ),
            encoding="utf-8",
        )
        os.replace(partial, target)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise
