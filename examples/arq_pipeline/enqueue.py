"""Enqueue a JSONL batch for the workers, one arq job per line:

    python enqueue.py prompts.jsonl --wait

Each line is a request (``{"prompt": ..., "n": 2}``; a line with
``subject_images`` is a multi-image request). Job ids are ``<name>:<line>``, so
running this again enqueues nothing twice: it waits for the same jobs. With
``--wait`` it prints one JSON summary when every job has its result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from arq import create_pool
from arq.connections import RedisSettings
from arq.jobs import Job


async def enqueue(lines: list[str], name: str, wait: bool, timeout: float) -> dict[str, Any]:
    redis = await create_pool(
        RedisSettings.from_dsn(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    )
    try:
        jobs: list[Job] = []
        for number, line in enumerate(lines):
            job_id = f"{name}:{number}"
            job = await redis.enqueue_job("generate", json.loads(line), _job_id=job_id)
            jobs.append(job if job is not None else Job(job_id, redis))  # enqueued before
        summary: dict[str, Any] = {"lines": len(lines), "jobs": [job.job_id for job in jobs]}
        if wait:
            results = await asyncio.gather(
                *(job.result(timeout=timeout, poll_delay=0.2) for job in jobs),
                return_exceptions=True,
            )
            done = [result for result in results if isinstance(result, dict)]
            summary.update(
                succeeded=sum(result["status"] == "succeed" for result in done),
                failed=sum(result["status"] == "failed" for result in done),
                errors=[repr(result) for result in results if not isinstance(result, dict)],
                task_ids=[result["task_id"] for result in done],
                images=sum(len(result["images"]) for result in done),
            )
        return summary
    finally:
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("file", type=Path, help="a JSONL file of requests")
    parser.add_argument("--name", default=None, help="the batch's name (default: the file's stem)")
    parser.add_argument("--wait", action="store_true", help="wait for every result")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait per job")
    arguments = parser.parse_args()
    name = arguments.name or arguments.file.stem
    lines = [line for line in arguments.file.read_text().splitlines() if line.strip()]
    summary = asyncio.run(enqueue(lines, name, arguments.wait, arguments.timeout))
    print(json.dumps(summary))
    sys.exit(1 if summary.get("errors") else 0)


if __name__ == "__main__":
    main()
