"""The nemesis harness: arq workers on one Kling account, faults injected into them
and into Redis on a seeded schedule, and a checker over what the fake Kling server
saw (never over what the clients believe).

Three parts, each usable alone:

- :func:`make_schedule` (pure): a seed and fault kinds give the fault events, with
  their times and targets; the same seed gives the same schedule.
- The processes: :class:`PersistentRedis` (``redis-server`` with the append-only
  file, on a port that survives a restart, pausable) and :class:`WorkerPool`
  (``python nemesis.py worker``: an arq worker built by
  ``kling_async.contrib.arq.worker_settings``, as a deployment runs it, under a
  supervisor that starts a replacement when one exits, as systemd or Kubernetes do).
- :func:`check` (pure): the invariants over the fake server's tasks and requests:
  units in flight, creates refused with 1303, tasks per job, the account each task
  was created on, and every job's end as arq recorded it.

Run as ``python nemesis.py worker``, this file is one worker; its settings come from
the environment (``NEMESIS_*``, ``REDIS_URL``, ``KLING_API_KEY``, ``KLING_BASE_URL``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import attrs
from redis.exceptions import RedisError

from kling_async.testing._redis import _free_port as free_port

HERE: Final = Path(__file__).resolve().parent
#: A worker prints this once its startup (joining the account) is through.
READY: Final = "NEMESIS-WORKER-READY"
#: What a worker the account refused writes (the namespace bound to another account).
REFUSAL: Final = "kling_async.ConfigurationError: the Redis namespace"

#: The fault kinds a schedule can combine (``two_apps`` is a topology: a second
#: application, with its own Kling account, its own fake server and its own arq
#: queue, on the same Redis, under the default namespace as a first deployment has it).
KINDS: Final = (
    "worker_pause",
    "worker_kill",
    "rolling_restart",
    "redis_pause",
    "redis_restart",
    "two_apps",
)


# --- schedules (pure) ---------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Event:
    """One fault: ``action`` at ``at`` seconds after the jobs were enqueued, on worker
    ``target`` (an index into the first app's workers) when it names one, for
    ``duration`` seconds when it lasts (a pause; the gap before a restart)."""

    at: float
    action: str
    target: int | None = None
    duration: float = 0.0

    def describe(self) -> str:
        """One line for a failure report."""
        who = "redis" if self.target is None else f"worker {self.target}"
        lasting = f" for {self.duration:.1f}s" if self.duration else ""
        return f"t={self.at:5.2f}s {self.action} {who}{lasting}"


@attrs.frozen(kw_only=True)
class Schedule:
    """A reproducible run: the seed, the fault kinds, the events in time order and
    the load (jobs per app, each of ``n`` 1..4, tasks lasting ``durations``)."""

    seed: int
    kinds: tuple[str, ...]
    events: tuple[Event, ...]
    workers: int
    jobs: int
    quota: int
    lease: float
    appendfsync: str

    @property
    def apps(self) -> tuple[str, ...]:
        """The applications sharing the Redis: ``a``, and ``b`` with ``two_apps``."""
        return ("a", "b") if "two_apps" in self.kinds else ("a",)

    @property
    def jobs_per_app(self) -> int:
        """``jobs`` shared between the apps: the same load with a second app, so that
        the deadline measures faults, not a doubled load."""
        return max(1, self.jobs // len(self.apps))

    def job_n(self, app: str, number: int) -> int:
        """The ``n`` of one job: seeded, so a rerun asks for the same units."""
        return random.Random(f"{self.seed}:{app}:{number}").randint(1, 4)

    def describe(self) -> str:
        """The schedule, for a failure report."""
        lines = [
            f"seed={self.seed} kinds={','.join(self.kinds)} workers={self.workers} "
            f"jobs={self.jobs} quota={self.quota} lease={self.lease}s "
            f"appendfsync={self.appendfsync}"
        ]
        lines += ["  " + event.describe() for event in self.events]
        return "\n".join(lines)


def make_schedule(
    seed: int,
    kinds: Sequence[str] | None = None,
    *,
    workers: int = 3,
    jobs: int = 16,
    quota: int = 8,
    lease: float = 1.0,
) -> Schedule:
    """The schedule of ``seed``: with ``kinds`` those faults, else one to three kinds
    drawn from the seed. Pauses last 2.5 to 4 leases (beyond the lease, as a GC pause
    or a blocked loop can); every fault starts in the first seconds, while tasks run."""
    rng = random.Random(seed)
    drawn = sorted(rng.sample(KINDS, rng.randint(1, 3)))  # drawn always: a replay naming
    if kinds is None:  # the kinds then gets the same times as the seed alone
        kinds = drawn
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {KINDS}")
    events: list[Event] = []
    for kind in kinds:
        start = round(rng.uniform(0.8, 3.0), 2)
        if kind == "worker_pause":
            stall = round(rng.uniform(2.5, 4.0) * lease, 2)
            events.append(
                Event(at=start, action="pause", target=rng.randrange(workers), duration=stall)
            )
        elif kind == "worker_kill":
            gap = round(rng.uniform(0.2, 1.5), 2)
            events.append(
                Event(at=start, action="kill", target=rng.randrange(workers), duration=gap)
            )
        elif kind == "rolling_restart":
            for position, target in enumerate(rng.sample(range(workers), workers)):
                events.append(
                    Event(
                        at=round(start + position * rng.uniform(0.8, 1.6), 2),
                        action="restart",
                        target=target,
                    )
                )
        elif kind == "redis_pause":
            stall = round(rng.uniform(2.5, 4.0) * lease, 2)
            events.append(Event(at=start, action="pause_redis", duration=stall))
        elif kind == "redis_restart":
            gap = round(rng.uniform(0.1, 1.0), 2)
            events.append(Event(at=start, action="restart_redis", duration=gap))
    return Schedule(
        seed=seed,
        kinds=tuple(kinds),
        events=tuple(sorted(events, key=lambda event: event.at)),
        workers=workers,
        jobs=jobs,
        quota=quota,
        lease=lease,
        appendfsync=rng.choice(("always", "everysec")),
    )


# --- the checker (pure) ---------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class TaskRecord:
    """One task as the fake server holds it: Unix milliseconds of its create and of its
    end (``None`` while it runs)."""

    task_id: str
    prompt: str
    n: int
    created_ms: float
    ended_ms: float | None


@attrs.frozen(kw_only=True)
class Refusal:
    """One create the fake refused with 1303: when (Unix ms) and for how many units."""

    at_ms: float
    n: int


@attrs.frozen(kw_only=True)
class AccountLog:
    """What one fake server (one Kling account) saw."""

    app: str
    quota: int
    tasks: tuple[TaskRecord, ...]
    refusals: tuple[Refusal, ...]
    creates: int
    #: Creates answered with another error, by Kling code (1201: a duplicate
    #: external_task_id, a second create for one key that Kling's own check stopped).
    other_errors: Mapping[int, int] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class JobOutcome:
    """How arq recorded one job: ``finished`` with the task's status, ``error`` (the
    job raised: reported), or ``None`` (no result: lost, or still running)."""

    job_id: str
    prompt: str
    status: str | None = None
    error: str | None = None
    task_id: str | None = None


def units_in_flight(tasks: Iterable[TaskRecord], at_ms: float) -> int:
    """Units held at ``at_ms`` by the tasks created at or before it and not yet ended."""
    return sum(
        task.n
        for task in tasks
        if task.created_ms <= at_ms and (task.ended_ms is None or task.ended_ms > at_ms)
    )


def peak_in_flight(tasks: Iterable[TaskRecord]) -> tuple[int, float]:
    """The most units held at once, and when (Unix ms). An end and a create in the same
    millisecond: the end first, as the server, which ordered them, saw it."""
    changes = []
    for task in tasks:
        changes.append((task.created_ms, 1, task.n))
        if task.ended_ms is not None:
            changes.append((task.ended_ms, 0, -task.n))
    held, peak, when = 0, 0, 0.0
    for at, _order, delta in sorted(changes):
        held += delta
        if held > peak:
            peak, when = held, at
    return peak, when


def check(
    logs: Sequence[AccountLog],
    outcomes: Mapping[str, Sequence[JobOutcome]],
    *,
    learning: bool = False,
    refused_apps: Iterable[str] = (),
) -> list[str]:
    """Every invariant the run broke, one line each (empty: none).

    - units in flight on an account never above its quota, at any instant;
    - no create refused with 1303 (``learning``: the members were not told the quota,
      and learn it from 1303, so refusals are expected): a refusal means the members
      together asked for more units than the quota; the line gives the most they asked;
    - at most one task per job (a job's prompt is unique);
    - every task on the account of the app that created it;
    - every job finished (arq recorded the task's end, and the fake holds that task
      ended so) or reported (arq recorded an error, and truly: no task exists for
      it), unless its app was refused at start (``refused_apps``: its workers exited
      with an error, which reports it).
    """
    violations: list[str] = []
    for log in logs:
        peak, when = peak_in_flight(log.tasks)
        if peak > log.quota:
            violations.append(
                f"[quota] app {log.app}: {peak} units in flight on a quota of {log.quota} "
                f"at {when:.0f} ms"
            )
        if log.refusals and not learning:
            asked = max(units_in_flight(log.tasks, r.at_ms) + r.n for r in log.refusals)
            violations.append(
                f"[over-commit] app {log.app}: {len(log.refusals)} of {log.creates} creates "
                f"refused with 1303: the members asked for up to {asked} units on a quota "
                f"of {log.quota}"
            )
        by_prompt: dict[str, list[TaskRecord]] = {}
        for task in log.tasks:
            by_prompt.setdefault(task.prompt, []).append(task)
        for prompt, tasks in sorted(by_prompt.items()):
            if len(tasks) > 1:
                ids = ", ".join(task.task_id for task in tasks)
                violations.append(
                    f"[duplicate] app {log.app}: job {prompt!r} created {len(tasks)} tasks ({ids})"
                )
            owner = prompt.split("-", 1)[0]
            if owner != log.app:
                violations.append(
                    f"[wrong account] job {prompt!r} of app {owner} created on app {log.app}'s "
                    f"account ({len(tasks)} tasks)"
                )
    tasks_by_id = {task.task_id: (log.app, task) for log in logs for task in log.tasks}
    tasks_by_prompt: dict[tuple[str, str], list[TaskRecord]] = {}
    for log in logs:
        for task in log.tasks:
            tasks_by_prompt.setdefault((log.app, task.prompt), []).append(task)
    refused = set(refused_apps)
    for app, jobs in sorted(outcomes.items()):
        if app in refused:
            continue
        for job in jobs:
            if job.error is not None:
                held = tasks_by_prompt.get((app, job.prompt))
                if held:  # reported, but untruly: a task runs (or ran) for it
                    violations.append(
                        f"[misreported] app {app}: job {job.job_id} reported an error while "
                        f"its account holds task {held[0].task_id} for it: {job.error[:120]}"
                    )
                continue  # reported
            if job.status is None:
                violations.append(
                    f"[lost] app {app}: job {job.job_id} neither finished nor reported"
                )
                continue
            found = tasks_by_id.get(job.task_id or "")
            if found is None or found[1].prompt != job.prompt:
                violations.append(
                    f"[phantom] app {app}: job {job.job_id} returned task {job.task_id}, "
                    "which its account does not hold for its prompt"
                )
            elif found[1].ended_ms is None:
                violations.append(
                    f"[early] app {app}: job {job.job_id} returned {job.status!r} for task "
                    f"{job.task_id}, still running on the server"
                )
    return violations


# --- the processes ----------------------------------------------------------------------


def ensure_stopped(process: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """Stop ``process`` (this one only, by its id): continued if paused, then
    SIGTERM, then SIGKILL after ``grace`` seconds."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGCONT)
        process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class PersistentRedis:
    """``redis-server`` as README's scale-out section asks a deployment to run it:
    the append-only file on (``appendfsync`` ``always`` or ``everysec``), nothing
    evicted; on a port kept across :meth:`restart`, in ``folder``."""

    def __init__(self, executable: str, folder: Path, *, appendfsync: str = "always") -> None:
        self.executable = executable
        self.folder = folder
        self.appendfsync = appendfsync
        self.port = free_port()  # the one RedisServer uses
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        """The server's URL, the same after a restart."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start it (again, after :meth:`crash`) and wait until it answers PING."""
        log = (self.folder / f"redis-{self.restarts}.log").open("wb")
        self.process = subprocess.Popen(
            [self.executable, "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.folder), "--save", "", "--appendonly", "yes",
             "--appendfsync", self.appendfsync, "--maxmemory-policy", "noeviction"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: see {self.folder}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return
            time.sleep(0.02)
        raise RuntimeError("redis-server did not answer PING in 10 s")

    def pause(self) -> None:
        """SIGSTOP: connections stay open, nothing answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def crash(self) -> None:
        """SIGKILL, as a crash or an OOM kill: only the append-only file remains."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self.restarts += 1

    def stop(self) -> None:
        """Stop it for good. Idempotent."""
        if self.process is not None:
            ensure_stopped(self.process)


@attrs.define(eq=False)
class WorkerSlot:
    """One worker's place in a deployment: its current process, and every log it wrote."""

    app: str
    index: int
    process: subprocess.Popen[bytes] | None = None
    generation: int = 0
    logs: list[Path] = attrs.field(factory=list)
    started_at: float = 0.0
    #: Exits before the startup was through, in a row: the app is refused.
    quick_exits: int = 0
    #: Set while the nemesis holds it down (killed, restarting): not to be replaced.
    held: bool = False


class WorkerPool:
    """The arq workers of one app, each ``python nemesis.py worker``, started with
    ``env`` and supervised: one that exits unasked is replaced, as a process
    supervisor would, unless it exits twice in a row before its startup is through
    (the account refused the app: that reports its jobs)."""

    def __init__(self, app: str, count: int, env: Mapping[str, str], folder: Path) -> None:
        self.app = app
        self.env = dict(env)
        self.folder = folder
        self.slots = [WorkerSlot(app=app, index=index) for index in range(count)]

    def start(self, slot: WorkerSlot) -> None:
        """Start (or replace) the slot's process."""
        slot.generation += 1
        path = self.folder / f"worker-{self.app}{slot.index}-{slot.generation}.log"
        slot.logs.append(path)
        with path.open("wb") as log:
            slot.process = subprocess.Popen(
                [sys.executable, str(HERE / "nemesis.py"), "worker"],
                env={**self.env, "NEMESIS_MEMBER": f"{self.app}{slot.index}-{slot.generation}"},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        slot.started_at = time.monotonic()

    def start_all(self) -> None:
        """Start every worker."""
        for slot in self.slots:
            self.start(slot)

    @property
    def refused(self) -> bool:
        """Whether the account refused the app: every worker keeps exiting at start,
        or its latest process wrote the refusal (a ``ConfigurationError`` before it
        joined). The log decides as soon as it is written: on a loaded machine the
        second start of a refused worker may end after the deadline, and the
        verdict must not depend on that."""
        return all(slot.quick_exits >= 2 or self.refused_at_start(slot) for slot in self.slots)

    @staticmethod
    def refused_at_start(slot: WorkerSlot) -> bool:
        """Whether one of the slot's processes was refused before it joined, and
        none of them joined: a replacement still starting (its log not written
        yet) does not undo its predecessor's refusal."""
        texts = [path.read_text(errors="replace") for path in slot.logs if path.exists()]
        joined = any(READY in text for text in texts)
        return not joined and any(REFUSAL in text for text in texts)

    def supervise(self) -> None:
        """Replace the workers that exited unasked (call it often)."""
        for slot in self.slots:
            process = slot.process
            if slot.held or process is None or process.poll() is None:
                continue
            slot.quick_exits = 0 if self.joined(slot) else slot.quick_exits + 1
            if slot.quick_exits < 2:
                self.start(slot)
            else:
                slot.process = None

    @staticmethod
    def joined(slot: WorkerSlot) -> bool:
        """Whether the slot's latest process got through its startup (joined the account)."""
        path = slot.logs[-1]
        return path.exists() and READY in path.read_text(errors="replace")

    def signal(self, index: int, signum: int) -> None:
        """Send ``signum`` to worker ``index``'s current process."""
        process = self.slots[index].process
        if process is not None and process.poll() is None:
            process.send_signal(signum)

    async def kill_and_replace(self, index: int, gap: float) -> None:
        """SIGKILL, then a replacement ``gap`` seconds later."""
        slot = self.slots[index]
        slot.held = True
        process = slot.process
        self.signal(index, signal.SIGKILL)
        await asyncio.sleep(gap)
        if process is not None:
            await asyncio.to_thread(process.wait)
        # A restart of the same slot at the same moment may have replaced it
        # already: one replacement, never two (the second would be left running).
        if slot.process is process:
            self.start(slot)
        slot.held = False

    async def restart(self, index: int, grace: float = 15.0) -> None:
        """A graceful restart, as a deploy does it: SIGTERM, wait for the exit (SIGKILL
        after ``grace``), start the new version."""
        slot = self.slots[index]
        slot.held = True
        process = slot.process
        if process is not None:
            await asyncio.to_thread(ensure_stopped, process, grace)
        if slot.process is process:  # not replaced by a kill meanwhile
            self.start(slot)
        slot.held = False

    def stop_all(self, grace: float = 5.0) -> None:
        """Stop every worker, this pool's processes only: all asked at once (SIGTERM),
        then each waited for (SIGKILL after ``grace`` seconds)."""
        running = [slot.process for slot in self.slots if slot.process is not None]
        for process in running:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGCONT)
                    process.terminate()
        for process in running:
            ensure_stopped(process, grace)

    def tail(self, lines: int = 12) -> str:
        """The last lines of each worker's logs with a traceback or a warning."""
        parts = []
        for slot in self.slots:
            for path in slot.logs:
                text = path.read_text(errors="replace").splitlines() if path.exists() else []
                notable = [line for line in text if "Error" in line or "WARNING" in line]
                if notable:
                    parts.append(f"--- {path.name}\n" + "\n".join(notable[-lines:]))
        return "\n".join(parts)


def worker_env(
    *, redis_url: str, fake_url: str, api_key: str, queue: str, lease: float, capacity: int | None
) -> dict[str, str]:
    """The environment of one app's workers: no ``KLING_*`` of the caller's."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("KLING_")}
    env.update(
        REDIS_URL=redis_url,
        KLING_API_KEY=api_key,
        KLING_BASE_URL=fake_url,
        NEMESIS_QUEUE=queue,
        NEMESIS_LEASE=str(lease),
        NEMESIS_CAPACITY="none" if capacity is None else str(capacity),
        PYTHONUNBUFFERED="1",
    )
    return env


# --- one run ----------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class RunReport:
    """What one schedule did: the invariants it broke, and figures."""

    schedule: Schedule
    violations: tuple[str, ...]
    seconds: float
    creates: int
    refusals: int
    peak: int
    refused_apps: tuple[str, ...]
    other_errors: Mapping[int, int]
    worker_logs: str

    @property
    def refusal_share(self) -> float:
        """The share of create requests the fake refused with 1303."""
        return self.refusals / self.creates if self.creates else 0.0

    def summary(self) -> dict[str, Any]:
        """The run as plain data, for a long run's record."""
        return {
            "seed": self.schedule.seed,
            "kinds": list(self.schedule.kinds),
            "violations": list(self.violations),
            "seconds": round(self.seconds, 1),
            "creates": self.creates,
            "refusals": self.refusals,
            "other_errors": {str(code): times for code, times in self.other_errors.items()},
            "peak": self.peak,
        }

    def describe(self) -> str:
        """The failure report: schedule, violations, figures, how to replay it."""
        lines = [self.schedule.describe(), "violations:"]
        lines += [f"  {violation}" for violation in self.violations] or ["  none"]
        lines.append(
            f"figures: {self.seconds:.1f}s, {self.creates} creates, {self.refusals} refused "
            f"(1303), other create errors by code {dict(self.other_errors)}, peak {self.peak} "
            f"units, refused apps {list(self.refused_apps)}"
        )
        lines.append(
            f"replay: KLING_NEMESIS_SEED={self.schedule.seed} "
            f"KLING_NEMESIS_KINDS={','.join(self.schedule.kinds)} "
            f"KLING_NEMESIS_JOBS={self.schedule.jobs} "
            "python -m pytest tests/scaleout/test_nemesis.py -k replay -s"
        )
        if self.worker_logs:
            lines += ["worker log lines with errors or warnings:", self.worker_logs[-6000:]]
        return "\n".join(lines)


def _task_duration(task: Any) -> float:
    """1.5 to 4 s (long beside a lease, as Kling's tens of seconds are beside the
    default 10 s lease, so that faults land while tasks run), fixed by the prompt, so
    a replay runs the same tasks."""
    return 1.5 + (zlib.crc32(str(task.prompt).encode()) % 250) / 100


#: What :func:`_quietly` returns when Redis did not answer.
UNANSWERED: Final = object()


async def _quietly(awaitable: Any, timeout: float) -> Any:
    """``awaitable``'s result, or :data:`UNANSWERED` if Redis did not answer in
    ``timeout`` (paused, restarting): the harness's reads must not fail a run."""
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except (asyncio.TimeoutError, OSError, RedisError):
        return UNANSWERED


async def run_schedule(
    schedule: Schedule,
    folder: Path,
    redis_executable: str,
    *,
    capacity: int | str | None = "quota",
    deadline: float = 30.0,
) -> RunReport:
    """Run ``schedule``: Redis, one fake Kling server (one account) per app, the
    workers, the jobs, the faults at their times; then check the fakes' logs.
    ``capacity`` is what workers are told (``"quota"``: the fake's limit; ``None``:
    learn it from 1303). Every job must end within ``deadline`` seconds of the first
    create; every process started here is stopped here."""
    from arq import create_pool
    from arq.connections import RedisSettings
    from arq.jobs import Job

    from kling_async.testing import FakeKlingServer

    told = schedule.quota if capacity == "quota" else capacity
    assert told is None or isinstance(told, int)
    learning = told is None
    redis = PersistentRedis(redis_executable, folder, appendfsync=schedule.appendfsync)
    await asyncio.to_thread(redis.start)
    pools: dict[str, WorkerPool] = {}
    fakes: dict[str, FakeKlingServer] = {}
    outcomes: dict[str, dict[str, JobOutcome]] = {}
    arq_pool = None
    started = time.monotonic()
    try:
        for app in schedule.apps:
            fake = FakeKlingServer(
                api_key=f"sk-nemesis-{app}-0123456789",
                concurrency_limit=schedule.quota,
                task_duration=_task_duration,
                processing_delay=0.05,
            )
            await fake.start()
            fakes[app] = fake
            env = worker_env(
                redis_url=redis.url,
                fake_url=fake.url,
                api_key=f"sk-nemesis-{app}-0123456789",
                queue=f"nemesis:{app}",
                lease=schedule.lease,
                capacity=told,
            )
            pools[app] = WorkerPool(app, schedule.workers, env, folder)
        # The first app joins first: with a namespace bound to the account it joined
        # with, the second app is the one to be refused.
        pools["a"].start_all()
        while not any(pools["a"].joined(slot) for slot in pools["a"].slots):
            if time.monotonic() - started > 30:
                raise RuntimeError("no worker of app a started in 30 s:\n" + pools["a"].tail())
            pools["a"].supervise()
            await asyncio.sleep(0.05)
        for app, pool in pools.items():
            if app != "a":
                pool.start_all()
        arq_pool = await create_pool(
            RedisSettings.from_dsn(redis.url), default_queue_name="nemesis:a"
        )
        for app in schedule.apps:
            outcomes[app] = {}
            for number in range(schedule.jobs_per_app):
                job_id = f"{app}-{schedule.seed}-{number}"
                prompt = f"{app}-job-{number}"
                outcomes[app][job_id] = JobOutcome(job_id=job_id, prompt=prompt)
                await arq_pool.enqueue_job(
                    "generate",
                    {"prompt": prompt, "n": schedule.job_n(app, number)},
                    _job_id=job_id,
                    _queue_name=f"nemesis:{app}",
                )
        # Faults are timed from the first create, so slow worker starts shift nothing.
        while not fakes["a"].tasks and time.monotonic() - started < 20:
            for pool in pools.values():
                pool.supervise()
            await asyncio.sleep(0.02)
        zero = time.monotonic()
        nemesis = asyncio.create_task(_inflict(schedule, redis, pools["a"], zero))
        pending = {app: set(jobs) for app, jobs in outcomes.items()}
        while time.monotonic() - zero < deadline:
            for pool in pools.values():
                pool.supervise()
            for app, waiting in pending.items():
                if pools[app].refused:
                    waiting.clear()
                for job_id in sorted(waiting):
                    info = await _quietly(
                        Job(job_id, arq_pool, _queue_name=f"nemesis:{app}").result_info(), 0.5
                    )
                    if info is UNANSWERED:
                        break  # Redis is paused or restarting: next round
                    if info is None:
                        continue
                    waiting.discard(job_id)
                    outcomes[app][job_id] = _outcome(outcomes[app][job_id], info)
            if not any(pending.values()) and nemesis.done():
                break
            await asyncio.sleep(0.1)
        seconds = time.monotonic() - zero
        print(f"nemesis: first create {zero - started:.1f}s after start; jobs {seconds:.1f}s")
        if not nemesis.done():
            nemesis.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await nemesis
        stopping = time.monotonic()
        await asyncio.gather(*(asyncio.to_thread(pool.stop_all) for pool in pools.values()))
        print(f"nemesis: workers stopped in {time.monotonic() - stopping:.1f}s")
        offset = time.time() - time.monotonic()
        logs = [_account_log(app, fake, schedule.quota, offset) for app, fake in fakes.items()]
        refused_apps = tuple(app for app, pool in pools.items() if pool.refused)
        violations = check(
            logs,
            {app: list(jobs.values()) for app, jobs in outcomes.items()},
            learning=learning,
            refused_apps=refused_apps,
        )
        late = sum(len(waiting) for waiting in pending.values())
        if late:
            violations.append(
                f"[unbounded] {late} jobs without a result {deadline:.0f}s after the first create"
            )
        if "a" in refused_apps:
            violations.append("[refused] app a, the only or first app, could not start")
        return RunReport(
            schedule=schedule,
            violations=tuple(violations),
            seconds=seconds,
            creates=sum(log.creates for log in logs),
            refusals=sum(len(log.refusals) for log in logs),
            peak=max(peak_in_flight(log.tasks)[0] for log in logs),
            refused_apps=refused_apps,
            other_errors=_merged(log.other_errors for log in logs),
            worker_logs="\n".join(pool.tail() for pool in pools.values()).strip(),
        )
    finally:
        for process_pool in pools.values():
            await asyncio.to_thread(process_pool.stop_all)
        if arq_pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(arq_pool.aclose(), 5)
        for fake in fakes.values():
            await fake.close()
        await asyncio.to_thread(redis.stop)


def _merged(counts: Iterable[Mapping[int, int]]) -> dict[int, int]:
    merged: dict[int, int] = {}
    for count in counts:
        for code, times in count.items():
            merged[code] = merged.get(code, 0) + times
    return merged


def _outcome(job: JobOutcome, info: Any) -> JobOutcome:
    result = info.result
    if info.success and isinstance(result, dict):
        return attrs.evolve(
            job, status=str(result.get("status")), task_id=str(result.get("task_id"))
        )
    return attrs.evolve(job, error=repr(result)[:200])


def _account_log(app: str, fake: Any, quota: int, offset: float) -> AccountLog:
    tasks = tuple(
        TaskRecord(
            task_id=task.task_id,
            prompt=str(task.prompt),
            n=task.n,
            created_ms=float(task.created_at_ms),
            ended_ms=float(task.updated_at_ms) if task.is_terminal else None,
        )
        for task in fake.tasks.values()
    )
    creates = fake.requests_for("create")
    refusals = tuple(
        Refusal(
            at_ms=(request.arrived_at + offset) * 1000,
            n=int(request.json.get("n", 1)) if isinstance(request.json, dict) else 1,
        )
        for request in creates
        if request.code == 1303
    )
    other_errors: dict[int, int] = {}
    for request in creates:
        if request.code not in (None, 0, 1303):
            other_errors[request.code] = other_errors.get(request.code, 0) + 1
    return AccountLog(
        app=app,
        quota=quota,
        tasks=tasks,
        refusals=refusals,
        creates=len(creates),
        other_errors=other_errors,
    )


async def _inflict(
    schedule: Schedule, redis: PersistentRedis, pool: WorkerPool, zero: float
) -> None:
    """Every fault of ``schedule`` at its time; a rolling restart one worker after the
    other, each waiting for the previous one to be back."""

    async def at(moment: float) -> None:
        await asyncio.sleep(max(0.0, zero + moment - time.monotonic()))

    async def one(event: Event) -> None:
        await at(event.at)
        if event.action == "pause":
            assert event.target is not None
            pool.signal(event.target, signal.SIGSTOP)
            await asyncio.sleep(event.duration)
            pool.signal(event.target, signal.SIGCONT)
        elif event.action == "kill":
            assert event.target is not None
            await pool.kill_and_replace(event.target, event.duration)
        elif event.action == "pause_redis":
            redis.pause()
            try:
                await asyncio.sleep(event.duration)
            finally:
                redis.resume()
        elif event.action == "restart_redis":
            redis.crash()
            await asyncio.sleep(event.duration)
            await asyncio.to_thread(redis.start)

    async def rolling(events: list[Event]) -> None:
        for event in events:
            await at(event.at)
            assert event.target is not None
            await pool.restart(event.target)

    restarts = [event for event in schedule.events if event.action == "restart"]
    others = [one(event) for event in schedule.events if event.action != "restart"]
    await asyncio.gather(rolling(restarts), *others)


# --- one worker process ------------------------------------------------------------------------


def run_worker() -> None:
    """An arq worker of ``kling_async.contrib.arq``, configured from the environment
    as a deployment would configure it (the account's default namespace; Redis
    reached with retries, so a restart of Redis is a pause, not a crash)."""
    import logging

    from arq.connections import RedisSettings
    from arq.worker import run_worker as run_arq_worker
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    import kling_async
    from kling_async.contrib.arq import worker_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    base = RedisSettings.from_dsn(os.environ["REDIS_URL"])
    redis_settings = _replaced(
        base,
        conn_timeout=2,
        conn_retries=30,
        conn_retry_delay=1,
        retry_on_error=[RedisConnectionError, RedisTimeoutError, ConnectionError, OSError],
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 40),
    )
    capacity_text = os.environ["NEMESIS_CAPACITY"]
    settings = worker_settings(
        capacity=None if capacity_text == "none" else int(capacity_text),
        redis_settings=redis_settings,
        member=os.environ.get("NEMESIS_MEMBER") or None,
        lease=float(os.environ["NEMESIS_LEASE"]),
        client_options={"polling": kling_async.PollPolicy(initial_delay=0.05, max_delay=0.3)},
        queue_name=os.environ["NEMESIS_QUEUE"],
        max_jobs=20,
        job_timeout=120,
        poll_delay=0.05,
    )
    library_startup = settings["on_startup"]

    async def startup(ctx: dict[str, Any]) -> None:
        await library_startup(ctx)
        print(READY, flush=True)  # the supervisor's sign that this worker joined

    settings["on_startup"] = startup
    run_arq_worker(settings)


def _replaced(settings: Any, **changes: Any) -> Any:
    """A copy of arq's ``RedisSettings`` (a dataclass) with ``changes``."""
    import dataclasses

    return dataclasses.replace(settings, **changes)


if __name__ == "__main__":
    if sys.argv[1:] != ["worker"]:
        raise SystemExit("usage: python nemesis.py worker")
    run_worker()


__all__ = [
    "KINDS",
    "AccountLog",
    "Event",
    "JobOutcome",
    "PersistentRedis",
    "Refusal",
    "Schedule",
    "TaskRecord",
    "WorkerPool",
    "check",
    "make_schedule",
    "units_in_flight",
    "worker_env",
]
