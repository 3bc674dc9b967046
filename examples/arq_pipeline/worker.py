"""An arq worker of the example pipeline; run it in this folder, as many as you like:

    arq worker.WorkerSettings

Every worker shares the account's concurrency quota and one ledger through
Redis, and adopts the tasks of a worker that dies. Settings come from the
environment: ``REDIS_URL`` (default ``redis://127.0.0.1:6379/0``),
``KLING_MAX_CONCURRENCY`` (the account's quota in units, default 10),
``KLING_API_KEY`` and ``KLING_BASE_URL`` (read by the client; never written to
Redis), and for tests ``KLING_MEMBER`` (this worker's name), ``KLING_LEASE``
(seconds), ``ARQ_MAX_JOBS``, ``ARQ_JOB_TIMEOUT``.
"""

from __future__ import annotations

import os

from kling_async import PollPolicy
from kling_async.contrib.arq import worker_settings

WorkerSettings = worker_settings(
    redis_url=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
    capacity=int(os.environ.get("KLING_MAX_CONCURRENCY", "10")),
    account=os.environ.get("KLING_ACCOUNT", "example"),
    member=os.environ.get("KLING_MEMBER") or None,
    lease=float(os.environ.get("KLING_LEASE", "10")),
    client_options={"polling": PollPolicy(initial_delay=0.2, max_delay=2.0)},
    max_jobs=int(os.environ.get("ARQ_MAX_JOBS", "20")),
    job_timeout=int(os.environ.get("ARQ_JOB_TIMEOUT", "600")),
)
