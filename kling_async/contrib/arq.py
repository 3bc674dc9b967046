"""arq job functions for Kling generation requests, on one shared account.

Needs the ``arq`` extra (``pip install '.[arq]'`` in the checkout). arq runs the jobs
(queueing, retries, several workers on several hosts); this module makes them
safe to run there: every worker shares the account's concurrency quota
(:class:`~kling_async.contrib.redis.RedisLimiter`) and one ledger
(:class:`~kling_async.contrib.redis.RedisLedger`), and each job creates its
task at most once, however often arq runs it::

    # worker.py: run with `arq worker.WorkerSettings`
    from kling_async.contrib.arq import worker_settings
    WorkerSettings = worker_settings(redis_url="redis://127.0.0.1:6379/0", capacity=50)

    # anywhere: enqueue one job per request
    await arq_redis.enqueue_job("generate", {"prompt": "a red fox", "n": 2}, _job_id="batch-1:0")

When a worker dies (SIGKILL, OOM, a lost host), a surviving worker adopts its
tasks within the account's lease: polls them to their end and records their
results. It also lets arq run the dead worker's jobs again at once (each
worker keeps the ids of the jobs it runs in Redis); each finds its task in the
ledger (by the job's id) and returns its result without creating anything.
Only a worker that lost its fence (reaped while Redis served) counts as dead:
a worker that merely looks late, or a Redis that paused, loses nothing, and a
stalled worker that was reaped finds, when it runs again, the job's key
reserved by the rerun and follows that task instead of creating one.
``worker_settings`` sets arq's ``on_job_start`` and ``after_job_end`` for this.

The job timeout (default :data:`DEFAULT_JOB_TIMEOUT`, 1800 s) must cover the
whole job (waiting for units, the task): a job waiting longer is cancelled and
retried by arq (it follows the same task: nothing is created twice, but arq's
``max_tries``, 5 by default, bounds how long a task may take). It is no
recovery delay: a job arq handed to a worker that died before starting it is
released by survivors once its in-progress mark stayed a lease with no worker
starting it (see :class:`_Unstarted`), not when the mark expires (job timeout
+ 10 s); a job arq starts twice in one worker runs once after the other.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any, Final

from arq.connections import RedisSettings
from arq.constants import default_queue_name, in_progress_key_prefix
from redis.exceptions import RedisError

from kling_async._client import Client
from kling_async._exceptions import TaskFailedError
from kling_async._handle import TaskHandle
from kling_async._models import Task, request_from_mapping
from kling_async.contrib.redis import (
    DEFAULT_LEASE,
    DEFAULT_ORPHAN_TTL,
    RedisAccount,
    RedisLedger,
    RedisLimiter,
    TaskTakenOverError,
    submit_once,
)
from kling_async.contrib.redis._account import stop_tasks

__all__ = ["JOB_KEY_PREFIX", "generate", "job_key", "task_summary", "worker_settings"]

logger = logging.getLogger("kling_async")

#: Ledger keys of arq jobs: ``arq:<job id>``.
JOB_KEY_PREFIX: Final = "arq:"
#: A Kling task may take minutes; a job is given this long unless told otherwise.
DEFAULT_JOB_TIMEOUT: Final = 1800

ClientFactory = Callable[[RedisLimiter, RedisLedger], Client]
"""Builds a worker's client around the shared limiter and ledger."""


def job_key(job_id: str) -> str:
    """The ledger key of an arq job."""
    return JOB_KEY_PREFIX + job_id


def task_summary(task: Task, handle: TaskHandle) -> dict[str, Any]:
    """What a job returns: plain data, so any arq serializer can store it."""
    return {
        "task_id": task.task_id,
        "external_task_id": handle.external_task_id,
        "status": task.status.value,
        "status_message": task.status_message,
        "images": [image.url for image in task.images],
    }


async def generate(
    ctx: dict[str, Any], request: Mapping[str, Any], endpoint: str | None = None
) -> dict[str, Any]:
    """arq job: create ``request`` on ``endpoint``, wait for the task to end
    and return :func:`task_summary`. A failed task is a result with
    ``status == "failed"``, not an exception (so arq does not run it again).

    ``request`` is a JSONL-style dict (Kling's wire names or the SDK's). The
    endpoint is any task endpoint :mod:`kling_async` declares, named by its
    path or CLI name (``"images/omni-image"``, ``"omni-image"``, ``"expand"``...):
    the ``endpoint`` argument, else an ``"endpoint"`` key of ``request``, else
    the model whose fields ``request`` uses (``subject_images``: multi-image;
    otherwise an image generation). An unknown endpoint or an invalid request
    fails the job with :class:`~kling_async.ValidationError` before anything
    is sent::

        await arq_redis.enqueue_job(
            "generate", {"prompt": "a fox, <<<image_1>>>", "images": [url]}, "omni-image"
        )

    The task is created at most once per job id, across workers and runs.
    """
    client: Client = ctx["kling_client"]
    built = request_from_mapping(request, endpoint=endpoint)
    while True:
        handle = await submit_once(
            client, built, key=job_key(str(ctx["job_id"])), adopter=ctx.get("kling_adopter")
        )
        try:
            task = await handle
        except TaskFailedError as error:
            task = error.task
        except TaskTakenOverError:
            # This worker was taken for dead and a survivor took the task over:
            # the key now leads to it (followed, or its result read back).
            continue
        return task_summary(task, handle)


def worker_settings(
    *,
    capacity: int | None,
    redis_url: str | None = None,
    redis_settings: RedisSettings | None = None,
    account: str = "default",
    member: str | None = None,
    lease: float = DEFAULT_LEASE,
    orphan_ttl: float = DEFAULT_ORPHAN_TTL,
    client_options: Mapping[str, Any] | None = None,
    client_factory: ClientFactory | None = None,
    functions: list[Any] | None = None,
    **worker_options: Any,
) -> dict[str, Any]:
    """arq ``WorkerSettings`` (a dict arq accepts as such) for workers sharing
    one Kling account.

    ``capacity`` is the account's concurrency quota in units (``None``: learn
    it from 1303), the same in every worker. Redis is ``redis_url`` or
    ``redis_settings`` (default: arq's, localhost). ``account`` names the
    account's keys in Redis; ``member`` this worker (default: host, pid and a
    random part); ``lease`` and ``orphan_ttl`` as in
    :class:`~kling_async.contrib.redis.RedisAccount`.

    Each worker builds one :class:`~kling_async.Client` at startup, with
    ``client_options`` (credentials from the environment unless given there:
    ``KLING_API_KEY``, ``KLING_BASE_URL``...; nothing of them goes to Redis) or
    by ``client_factory(limiter, ledger)``, and adopts dead workers' tasks.
    ``functions`` adds job functions to :func:`generate`; other keywords
    (``max_jobs``, ``job_timeout``, ...) go to arq's worker as they are.
    """
    if redis_settings is None:
        redis_settings = RedisSettings.from_dsn(redis_url) if redis_url else RedisSettings()
    queue_name = str(worker_options.get("queue_name") or default_queue_name)
    options = dict(client_options or {})

    async def startup(ctx: dict[str, Any]) -> None:
        shared = RedisAccount(
            ctx["redis"], name=account, member=member, lease=lease, orphan_ttl=orphan_ttl
        )
        await shared.start()
        limiter = shared.limiter(capacity)
        ledger = shared.ledger()
        if client_factory is not None:
            client = client_factory(limiter, ledger)
        else:
            client = Client(max_concurrency=limiter, ledger=ledger, **options)
        # The namespace is this Kling account's: a worker of another account is refused.
        await shared.bind(client)
        ctx["kling_account"] = shared
        ctx["kling_client"] = client
        ctx["kling_adopter"] = shared.adopt(client)
        ctx["kling_runs"] = {}
        ctx["kling_rerun"] = asyncio.get_running_loop().create_task(
            _rerun_forever(shared, queue_name)
        )
        logger.info("kling worker %s joined account %r", shared.member, account)

    async def job_started(ctx: dict[str, Any]) -> None:
        shared: RedisAccount = ctx["kling_account"]
        job_id = str(ctx["job_id"])
        await _after_an_earlier_run(ctx["kling_runs"], job_id)
        async with shared.redis.pipeline(transaction=True) as pipe:
            pipe.sadd(_jobs_key(shared, shared.member), job_id)
            pipe.hset(shared.key("arq-job-runner"), job_id, shared.member)
            pipe.sadd(shared.key("arq-workers"), shared.member)
            await pipe.execute()

    async def job_recorded(ctx: dict[str, Any]) -> None:
        shared: RedisAccount = ctx["kling_account"]
        await shared.script(JOB_RECORDED)(
            keys=[_jobs_key(shared, shared.member), shared.key("arq-job-runner")],
            args=[str(ctx["job_id"]), shared.member],
        )

    async def shutdown(ctx: dict[str, Any]) -> None:
        client: Client | None = ctx.get("kling_client")
        shared: RedisAccount | None = ctx.get("kling_account")
        rerun: asyncio.Task[None] | None = ctx.get("kling_rerun")
        await stop_tasks(rerun)
        if client is not None:
            await client.close()
        if shared is not None:
            await shared.close()

    settings: dict[str, Any] = {
        "functions": [generate, *(functions or [])],
        "on_startup": startup,
        "on_shutdown": shutdown,
        "on_job_start": job_started,
        "after_job_end": job_recorded,
        "redis_settings": redis_settings,
        "job_timeout": DEFAULT_JOB_TIMEOUT,
    }
    settings.update(worker_options)
    return settings


def _jobs_key(account: RedisAccount, member: str) -> str:
    return account.key(f"arq-jobs:{member}")


async def _after_an_earlier_run(runs: dict[str, asyncio.Task[Any]], job_id: str) -> None:
    """Hold a run of ``job_id`` until this worker's earlier run of it has ended,
    then note this run (arq's, the task that calls ``on_job_start``).

    arq starts a job whenever its in-progress mark is missing, even in a worker
    that runs it already: the mark of a job another worker took over is deleted
    by the first runner's arq when that run ends or is cancelled (a worker taken
    for dead while stalled, then restarted), and a picked job whose worker died
    before ``on_job_start`` is released by its lapse. Two runs of one job in one
    worker share arq's bookkeeping, and the later to end fails with
    ``KeyError(job_id)`` while its task runs; one after the other, the second
    finds the first's result in the ledger and returns it."""
    while (earlier := runs.get(job_id)) is not None and not earlier.done():
        logger.warning("job %s started again in this worker: it waits for its earlier run", job_id)
        await asyncio.wait({earlier})
    current = asyncio.current_task()
    if current is None:  # pragma: no cover - arq calls it from its job's task
        return
    runs[job_id] = current

    def forget(task: asyncio.Task[Any]) -> None:
        if runs.get(job_id) is task:
            del runs[job_id]

    current.add_done_callback(forget)


async def _rerun_forever(account: RedisAccount, queue_name: str) -> None:
    """Let arq run a dead worker's jobs again now, rather than when their
    in-progress marks expire (the job timeout plus 10 s): each finds its task
    in the ledger (taken over by a survivor, or ended) and waits for it or
    returns its result. Without this nothing is lost, only later."""
    unstarted = _Unstarted(account, queue_name)
    while True:
        await asyncio.sleep(account.lease / 2)
        try:
            await _rerun_dead_jobs(account)
            await unstarted.release()
        except RedisError as error:  # they run again when the marks expire
            logger.warning("cannot release the jobs of dead workers: %s", error)


#: The jobs of the queue (the oldest ``ARGV[2]``: arq picks in score order) that
#: arq marked in progress but no worker says it started (no runner): each with
#: when its mark expires (Redis ms). A mark set again gets a later expiry.
#: KEYS: queue, runner hash; ARGV: mark prefix, how many jobs to look at.
UNSTARTED_JOBS: Final = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local found = {now}
for _, job in ipairs(redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)) do
  if redis.call('HEXISTS', KEYS[2], job) == 0 then
    local ttl = redis.call('PTTL', ARGV[1] .. job)
    if ttl > 0 then
      table.insert(found, job)
      table.insert(found, now + ttl)
    end
  end
end
return found
"""

#: Release one such job: only if still nobody started it and its mark is the one
#: seen a lease ago (its expiry within a few ms). KEYS: runner hash;
#: ARGV: mark prefix, job, the expiry seen.
RELEASE_UNSTARTED_JOB: Final = """
if redis.call('HEXISTS', KEYS[1], ARGV[2]) == 1 then
  return 0
end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local ttl = redis.call('PTTL', ARGV[1] .. ARGV[2])
if ttl <= 0 or math.abs(now + ttl - tonumber(ARGV[3])) > 20 then
  return 0
end
redis.call('DEL', ARGV[1] .. ARGV[2])
return 1
"""

#: How many of the queue's oldest jobs one pass looks at for unstarted marks.
UNSTARTED_SCAN: Final = 1000


class _Unstarted:
    """Jobs arq handed to a worker that died before it started them (between
    arq's pick and ``on_job_start``): no worker's set names them, so the dead
    worker's release misses them, and arq would run them again only when their
    in-progress marks expire (job timeout + 10 s). A mark that stays, the same
    mark, for a lease with no runner is released: a live worker starts a job it
    picked within milliseconds. Released wrongly (a worker stalled for a lease
    right there), the job runs twice: its task is still created once."""

    def __init__(self, account: RedisAccount, queue_name: str) -> None:
        self.account = account
        self.queue_name = queue_name
        #: job -> (its mark's expiry, when it was first seen unstarted), Redis ms.
        self.seen: dict[str, tuple[int, int]] = {}
        self._scan = account.script(UNSTARTED_JOBS)
        self._release = account.script(RELEASE_UNSTARTED_JOB)

    async def release(self) -> int:
        """One pass: release the marks seen unstarted for a lease; returns how many."""
        runner = self.account.key("arq-job-runner")
        flat = await self._scan(
            keys=[self.queue_name, runner], args=[in_progress_key_prefix, UNSTARTED_SCAN]
        )
        now = int(flat[0])
        found = {
            (job.decode() if isinstance(job, bytes) else str(job)): int(expiry)
            for job, expiry in zip(flat[1::2], flat[2::2], strict=True)
        }
        lease_ms = int(self.account.lease * 1000)
        seen: dict[str, tuple[int, int]] = {}
        released = 0
        for job, expiry in found.items():
            before = self.seen.get(job)
            if before is None or abs(before[0] - expiry) > 20:
                seen[job] = (expiry, now)  # a new mark: watched from now
            elif now - before[1] >= lease_ms:
                args: list[str | int] = [in_progress_key_prefix, job, before[0]]
                if int(await self._release(keys=[runner], args=args)):
                    released += 1
            else:
                seen[job] = before
        self.seen = seen
        if released:
            logger.warning("%d jobs picked by a worker that never started them run again", released)
        return released


#: Release a dead worker's jobs in one step: its job set is read, the jobs' arq
#: in-progress marks deleted and the set dropped atomically, and only while the
#: worker has no fence (it did not join again meanwhile). Read and delete apart,
#: a survivor that read the set before another survivor released it deleted,
#: after the fact, the mark of a job a worker had just started again: arq then
#: started that job a second time in the same worker, whose bookkeeping fails
#: the job with ``KeyError(job_id)`` although its task runs. The marks are arq's
#: keys, not declared: arq runs on one Redis (no Cluster), as this module does.
#: A job is released only if the dead worker was the last to start it (the
#: runner hash): its set can name jobs it no longer runs (cancelled at a
#: shutdown while Redis paused, its removal lost) that another worker runs now.
#: KEYS: workers set, the worker's jobs set, fence hash, runner hash;
#: ARGV: worker, mark prefix.
RELEASE_DEAD_WORKER_JOBS: Final = """
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then
  return -1
end
local released = 0
for _, job in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if redis.call('HGET', KEYS[4], job) == ARGV[1] then
    redis.call('DEL', ARGV[2] .. job)
    redis.call('HDEL', KEYS[4], job)
    released = released + 1
  end
end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[1], ARGV[1])
return released
"""


#: A job ended here: out of this worker's set, and out of the runner hash unless
#: another worker started it since. KEYS: jobs set, runner hash; ARGV: job, worker.
JOB_RECORDED: Final = """
redis.call('SREM', KEYS[1], ARGV[1])
if redis.call('HGET', KEYS[2], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[2], ARGV[1])
end
return 1
"""


async def _rerun_dead_jobs(account: RedisAccount) -> None:
    # Only workers that lost their fence (reaped while Redis served, or gone):
    # a job whose worker still holds its fence may still be running there.
    redis = account.redis
    release = account.script(RELEASE_DEAD_WORKER_JOBS)
    workers = await redis.smembers(account.key("arq-workers"))  # type: ignore[misc]
    for raw in workers:
        worker = raw.decode() if isinstance(raw, bytes) else str(raw)
        if worker == account.member:
            continue
        released = int(
            await release(
                keys=[
                    account.key("arq-workers"),
                    _jobs_key(account, worker),
                    account.key("fence"),
                    account.key("arq-job-runner"),
                ],
                args=[worker, in_progress_key_prefix],
            )
        )
        if released > 0:
            logger.warning("worker %s is gone: its %d jobs run again", worker, released)
