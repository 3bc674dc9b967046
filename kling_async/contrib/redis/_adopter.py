"""Survivors finish what dead processes started; requests keyed once across
processes."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import attrs
from redis.exceptions import RedisError

from kling_async._endpoints import by_request_type
from kling_async._exceptions import ConfigurationError, KlingError
from kling_async._handle import TaskHandle
from kling_async._ledger import LedgerEntry, MemoryLedger
from kling_async._models import TaskRequest
from kling_async._submissions import CLIENT_LIMITER, Submission
from kling_async._wire import create_request

from ._account import stop_tasks
from ._ledger import KeyReusedError, RedisLedger, request_digest
from ._limiter import RedisLimiter
from ._steps import Step, adoption_step, keyed_step

if TYPE_CHECKING:
    from kling_async._client import Client

    from ._account import RedisAccount

__all__ = ["Adopter", "keyed_external_task_id", "submit_once"]

logger = logging.getLogger("kling_async")

#: How often a request waits to see a live process settle its create.
_WAIT_POLL: Final = 0.25


class Adopter:
    """Finishes the tasks of dead members of the account, in this process.

    Every ``interval`` seconds (default: half the account's lease) it claims
    the unsettled entries of members whose lease ran out (atomically: one
    survivor per entry), then, through ``client``'s create owner:

    - a task Kling created is re-attached and polled to its end, its units
      moved from the dead member's orphans to this process (Kling still
      counts them) and given back when it ends;
    - a create that may or may not have landed keeps its units (moved from
      the dead member to this process: it may have landed), is looked up by
      its external_task_id, and sent again (same id) only if Kling has none;
      its units are freed only once it is known not to exist. A create the
      dead member was still queued for (it held no units: never sent) is sent
      again through admission, waiting for room like any create.

    Then the dead member's remaining units (of creates that never landed and
    of tasks that had ended) are released. Before its first pass it binds the
    account to the client's Kling account (:meth:`RedisAccount.bind`): an
    adopter of another Kling account never takes anything over. Results are recorded in the ledger,
    so a job or batch run again reads them. Start it with ``account.adopt(client)``.
    """

    def __init__(
        self,
        account: RedisAccount,
        client: Client,
        *,
        ledger: RedisLedger | None = None,
        limiter: RedisLimiter | None = None,
        interval: float | None = None,
        on_adopted: Callable[[list[LedgerEntry]], Awaitable[None]] | None = None,
    ) -> None:
        chosen = ledger if ledger is not None else client.ledger
        if not isinstance(chosen, RedisLedger):
            raise ConfigurationError(
                "adoption needs a RedisLedger: Client(ledger=account.ledger())"
            )
        self.account = account
        self.client = client
        self.ledger = chosen
        if limiter is None and isinstance(client.limiter, RedisLimiter):
            limiter = client.limiter
        self.limiter = limiter
        self.interval = interval if interval is not None else account.lease / 2
        #: Awaited with the entries of each pass that took something over (a
        #: job queue lets their jobs run again at once: ``contrib.arq``).
        self.on_adopted = on_adopted
        self._loop: asyncio.Task[None] | None = None
        self._follows: set[asyncio.Task[None]] = set()
        self._pass = asyncio.Lock()
        #: Entries taken over so far: re-attached tasks and settled creates.
        self.reattached = 0
        self.settled = 0

    def __repr__(self) -> str:
        return (
            f"<Adopter {self.account.member!r} reattached={self.reattached} settled={self.settled}>"
        )

    def start(self) -> None:
        """Adopt every ``interval`` seconds until :meth:`close`."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop().create_task(
                self._adopt_forever(), name=f"kling-adopter-{self.account.member}"
            )

    async def _adopt_forever(self) -> None:
        try:
            await self.account.bind(self.client)
        except ConfigurationError as error:
            logger.error("adoption stopped: %s", error)
            return
        while True:
            try:
                await self.run_once()
            except (RedisError, KlingError) as error:
                logger.warning("adopting dead members' tasks failed for now: %s", error)
            except Exception:  # a bug must be seen, and must not stop adoption
                logger.exception("adopting dead members' tasks failed")
            await asyncio.sleep(self.interval)

    async def run_once(self) -> list[TaskHandle]:
        """One pass: claim what dead members left, take it over; returns the
        handles of the re-attached tasks."""
        async with self._pass:
            await self.account.bind(self.client)
            claimed = await self.ledger.claim()
            if not claimed:
                return []
            by_owner: dict[str, list[LedgerEntry]] = defaultdict(list)
            for owner, entry in claimed:
                by_owner[owner].append(entry)
            handles: list[TaskHandle] = []
            for owner, entries in by_owner.items():
                handles.extend(self._take_over(owner, entries))
            if self.on_adopted is not None:
                await self.on_adopted([entry for _owner, entry in claimed])
            return handles

    def _take_over(self, owner: str, entries: list[LedgerEntry]) -> list[TaskHandle]:
        submissions = self.client._submissions
        handles: list[TaskHandle] = []
        settling = 0
        for entry in entries:
            try:
                if adoption_step(entry) is Step.REATTACH:
                    limiter: Any = self.limiter if self.limiter is not None else CLIENT_LIMITER
                    handle = submissions.reattach(entry, ledger=self.ledger, limiter=limiter)
                    handles.append(handle)
                    self._follow(handle)
                    self.reattached += 1
                else:
                    if self.limiter is not None:
                        # It may have landed: its units stay counted, now here;
                        # the create owner's acquire finds them held already.
                        self.limiter.hold(entry.units, task=entry.external_task_id)
                    limiter = self.limiter if self.limiter is not None else CLIENT_LIMITER
                    submission = submissions.resume_entry(
                        entry, ledger=self.ledger, limiter=limiter
                    )
                    self._follow_submission(submission)
                    settling += 1
                    self.settled += 1
            except KlingError as error:  # a body that no longer validates, a closed client
                logger.warning("cannot take over %s: %s", entry.external_task_id, error)
        if self.limiter is not None:
            self.limiter.release_orphans(owner)
        logger.warning(
            "member %s is gone: took over %d of its tasks and %d creates to settle",
            owner,
            len(handles),
            settling,
        )
        return handles

    def _follow(self, handle: TaskHandle) -> None:
        """Poll the task to its end, even with no units held to keep it polled."""
        follow = asyncio.get_running_loop().create_task(_wait_quietly(handle))
        self._follows.add(follow)
        follow.add_done_callback(self._follows.discard)

    def _follow_submission(self, submission: Submission) -> None:
        async def settle() -> None:
            try:
                handle = await asyncio.shield(submission.result)
            except (KlingError, asyncio.CancelledError):
                return  # logged by the create owner
            await _wait_quietly(handle)

        follow = asyncio.get_running_loop().create_task(settle())
        self._follows.add(follow)
        follow.add_done_callback(self._follows.discard)

    async def close(self) -> None:
        """Stop adopting; tasks taken over stay attached to the client. Idempotent."""
        tasks = [*self._follows, *([self._loop] if self._loop is not None else [])]
        self._loop = None
        await stop_tasks(*tasks)


async def _wait_quietly(handle: TaskHandle) -> None:
    try:
        await handle
    except KlingError:  # failed, or the client closed: the ledger says which
        return


def keyed_external_task_id(account: RedisAccount, key: str) -> str:
    """The external_task_id of the request under ``key``: derived from the key,
    so two processes racing for one key send one id, and Kling's own duplicate
    check backs up the reservation."""
    return hashlib.sha256(f"kling-key\0{account.name}\0{key}".encode()).hexdigest()[:32]


async def submit_once(
    client: Client,
    request: TaskRequest,
    *,
    key: str,
    adopter: Adopter | None = None,
) -> TaskHandle:
    """Create ``request`` at most once for ``key``, across processes and reruns.

    The client's ledger must be a :class:`RedisLedger`. The first call reserves
    the key and records the intent in one atomic step, then creates the task
    (its external_task_id derived from the key); a call with the same key, in
    this or any process (an arq job run again after its worker died, say),
    finds the entry and returns a handle on the same task: read back if it
    ended, followed if a live process holds it, taken over if its process
    died, looked up (and sent again, same external_task_id, only if Kling has
    none) if its create may not have landed. Nothing is created twice.

    A key reused for a different request raises :class:`KeyReusedError` (a
    hash of the request is stored with the key).
    """
    ledger = client.ledger
    if not isinstance(ledger, RedisLedger):
        raise ConfigurationError("submit_once needs Client(ledger=account.ledger())")
    account = ledger.account
    await account.bind(client)
    submissions = client._submissions
    me = account.member
    if request.external_task_id is None:
        request = attrs.evolve(request, external_task_id=keyed_external_task_id(account, key))
    body = dict(create_request(request).body or {})
    digest = request_digest(body)
    while True:
        entry = await ledger.by_key(key)
        if entry is None:
            intent = LedgerEntry(
                external_task_id=str(request.external_task_id),
                endpoint=request.endpoint,
                body={name: value for name, value in body.items() if name != "callback_url"}
                if request.callback_url is None
                else body,
                units=by_request_type(request).units.held(request),
                receiver_callback=request.callback_url is None
                and submissions._receiver is not None,
                key=key,
                owner=me,
            )
            taken = await ledger.reserve(key, intent, digest)
            if taken is None:
                return await _settled(submissions.start(request, ledger=ledger, key=key), client)
            _check_same_request(key, taken[1], digest)
            entry = await ledger.get(taken[0])
            if entry is None:
                await asyncio.sleep(_WAIT_POLL)
                continue
        else:
            reserved = await ledger.reserved(key)
            if reserved is not None:
                _check_same_request(key, reserved[1], digest)
        alive = True
        if entry.owner is not None and entry.owner != me:
            alive = await account.alive(entry.owner)
        step = keyed_step(entry, me=me, owner_alive=alive)
        if step is Step.CREATE:  # pragma: no cover - an entry was found
            continue
        if step is Step.SETTLE:
            submission = submissions.resume_entry(entry, ledger=ledger, request=request)
            return await _settled(submission, client)
        if step is Step.ADOPT:
            await (adopter or Adopter(account, client, ledger=ledger)).run_once()
            continue
        if step is Step.WAIT:
            await asyncio.sleep(_WAIT_POLL)
            continue
        if step is Step.FOLLOW:
            # A live process holds it and its units: poll it, hold nothing,
            # record nothing (the holder records).
            return submissions.reattach(entry, ledger=MemoryLedger(), limiter=None, request=request)
        return submissions.reattach(entry, ledger=ledger, request=request)  # RESULT, REATTACH


def _check_same_request(key: str, reserved_digest: str, digest: str) -> None:
    if reserved_digest and reserved_digest != digest:
        raise KeyReusedError(
            f"key {key!r} was used for another request: its task is that request's. "
            "Use a new key for a new request"
        )


async def _settled(submission: Submission, client: Client) -> TaskHandle:
    try:
        return await asyncio.shield(submission.result)
    except asyncio.CancelledError:
        client._submissions._left(submission)
        raise
