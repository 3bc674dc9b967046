"""The ledger of creates, shared by every process of the account through Redis."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from typing import TYPE_CHECKING, Any, Final

import attrs
from redis.exceptions import RedisError

from kling_async._budget import Spend, SpendGrouping, spend_of
from kling_async._exceptions import ConfigurationError, KlingError
from kling_async._ledger import EntryState, LedgerEntry
from kling_async._records import records

from . import _scripts
from ._account import credentials_fingerprint, stop_tasks, text

if TYPE_CHECKING:
    from kling_async._client import Client
    from kling_async._submissions import Submissions

    from ._account import RedisAccount

__all__ = ["KeyReusedError", "RedisLedger", "TaskTakenOverError", "request_digest"]

logger = logging.getLogger("kling_async")

#: How long settled entries (ended, or never created) stay readable: a rerun of
#: a job or a batch finds them, and a late report can still be read.
DEFAULT_RETENTION: Final = 7 * 24 * 3600
_RETRY_FIRST, _RETRY_MAX = 0.05, 2.0
#: How long :meth:`RedisLedger.flush` waits for an unreachable Redis.
DEFAULT_FLUSH_TIMEOUT: Final = 10.0
#: Every field of an entry but its body (stored once, apart: it may be megabytes).
_FIELDS: Final = tuple(field.name for field in attrs.fields(LedgerEntry) if field.name != "body")


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


#: Fields of a create body that say nothing about what is asked for.
_NOT_THE_REQUEST: Final = ("external_task_id", "callback_url")


def request_digest(body: Any) -> str:
    """A hash of what a create asks for (its wire body, without its
    external_task_id and callback URL): stored with a key, so a key reused
    for a different request is told apart."""
    asked = {name: value for name, value in dict(body).items() if name not in _NOT_THE_REQUEST}
    canonical = json.dumps(asked, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


class KeyReusedError(KlingError, ValueError):
    """A key was used again for a different request: the task under the key
    is another request's. Use a new key for a new request."""


class TaskTakenOverError(KlingError):
    """This process was taken for dead (stalled past its lease while Redis
    served) and another member of the account took the task over: it runs on
    there, and that member records its result. A handle of this process on the
    task ends with this error, and this process stops polling it; follow the
    task again with ``client.images.attach(task_id)``, or read its result from
    the shared ledger (``submit_once`` with the same key does either)."""

    def __init__(self, task_id: str, external_task_id: str, owner: str, account: str) -> None:
        self.task_id = task_id
        self.external_task_id = external_task_id
        self.owner = owner
        super().__init__(
            f"task {task_id} (external_task_id {external_task_id}) was taken over by member "
            f"{owner} of account {account!r} while this process was taken for dead; it runs "
            f"on there: follow it with client.images.attach({task_id!r})"
        )


def dump_entry(entry: LedgerEntry) -> str:
    """The entry as JSON, without its body (stored once, apart)."""
    data = records.unstructure(entry)
    return _json({name: data[name] for name in _FIELDS})


def load_entry(raw: Any, body: Any, owner: Any = None) -> LedgerEntry:
    """An entry from its JSON and its body's; ``owner`` (from the owner index)
    wins over the one in the JSON, which the owner's last record wrote."""
    data = json.loads(text(raw))
    data["body"] = json.loads(text(body)) if body else {}
    if owner:
        data["owner"] = text(owner)
    entry: LedgerEntry = records.structure(data, LedgerEntry)
    return entry


#: Entries read per round trip when adding up spend.
_SPEND_CHUNK: Final = 500


class RedisLedger:
    """A :class:`~kling_async.Ledger` every process of the account shares.

    Give it to ``Client(ledger=...)``. Entries are written as the journal's
    are: the intent before the create is sent (``flush`` waits for Redis), then
    the task_id, status changes, results and downloads (``records_results``).
    Each unsettled entry belongs to the member (process) that recorded it last;
    when a member dies, :meth:`claim` hands its unsettled entries to one
    survivor, atomically, so no two processes take over the same task.

    ``await client.resume()`` on a client with this ledger settles the entries
    of dead members (claimed for this process) and this process's uncertain
    ones; creates in flight in live processes are theirs. An
    :class:`~kling_async.contrib.redis.Adopter` does the same continuously.

    Writes never block: :meth:`record` queues, and one background task writes
    whatever has queued up in one script call. Settled entries are kept for
    ``retention`` seconds (default 7 days); their request bodies (images
    included) are dropped as soon as the create is settled. Bodies never hold
    a credential: the create owner leaves out callback URLs the receiver made.
    Writes are fenced: an entry a survivor claimed from this process (taken
    for dead while stalled) is not written back by it. :meth:`flush` waits at
    most ``flush_timeout`` seconds for an unreachable Redis, then raises
    :class:`TimeoutError` (a create is then not sent: its intent is not durable).
    """

    records_results: Final = True

    def __init__(
        self,
        account: RedisAccount,
        *,
        retention: float = DEFAULT_RETENTION,
        flush_timeout: float = DEFAULT_FLUSH_TIMEOUT,
    ) -> None:
        self.account = account
        self.retention = int(retention)
        self.flush_timeout = flush_timeout
        self._record = account.script(_scripts.RECORD)
        self._reserve = account.script(_scripts.RESERVE)
        self._claim = account.script(_scripts.CLAIM)
        self._record_keys = [
            account.key("unsettled"),
            account.key("owner"),
            account.key("owners"),
        ]
        self._claim_keys = [account.key("owner"), account.key("owners")]
        self._queue: list[tuple[LedgerEntry, bool]] = []
        #: Bodies written, of creates not settled yet (dropped once settled).
        self._bodies_written: set[str] = set()
        #: This process's unsettled entries as last recorded: re-asserted after
        #: Redis lost the account's state; dropped once settled.
        self._mine: dict[str, LedgerEntry] = {}
        #: The Kling account of the client using this ledger (a fingerprint),
        #: bound to the namespace before the first write.
        self._fingerprint: str | None = None
        self._refused: KlingError | None = None
        #: The create owner of the client this ledger records for.
        self._submissions: Submissions | None = None
        self._queued = 0
        self._written = 0
        #: Entries recorded after the close: never written.
        self._dropped = 0
        self._flushes: list[tuple[int, asyncio.Future[None]]] = []
        self._wake: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<RedisLedger {self.account.name!r} member={self.account.member!r}>"

    @property
    def member(self) -> str:
        """This process's member id: the owner of the entries it records."""
        return self.account.member

    def attach_client(self, client: Client) -> None:
        """Called by ``Client(ledger=...)``: the namespace is bound to the
        client's Kling account (a fingerprint of its credentials) before this
        ledger writes anything; a namespace bound to another account refuses it."""
        self._fingerprint = credentials_fingerprint(client)
        self._submissions = client._submissions
        self.account.attached(self._fingerprint)
        self._start()

    async def open(self) -> None:
        """Bind the namespace to the attached client's Kling account now:
        ``async with Client(ledger=...)`` calls it, so a namespace bound to
        another account refuses the client when it opens
        (:class:`~kling_async.ConfigurationError`), before any create or write."""
        await self.account.check()

    # --- the Ledger protocol -----------------------------------------------------------

    def record(self, entry: LedgerEntry) -> None:
        """Queue ``entry`` to be written (owned by this process); never blocks."""
        if self._closed:
            logger.debug("ledger closed; entry %s not written", entry.external_task_id)
            self._dropped += 1  # a flush from now on says so
            return
        external_task_id = entry.external_task_id
        current = self._mine.get(external_task_id)
        if (
            current is not None
            and current.intended_at != entry.intended_at
            and entry.state not in (EntryState.INTENDED, EntryState.TERMINAL, EntryState.GONE)
        ):
            # News of an older try of a create this process tries again now:
            # not the entry's (Redis refuses it too, see _scripts._WRITE).
            logger.debug("entry %s: an older try's %s not written", external_task_id, entry.state)
            return
        # An intent starts (or restarts) a create: it carries its body, so it
        # can re-open an entry another member settled (see _scripts._WRITE).
        with_body = (
            external_task_id not in self._bodies_written or entry.state is EntryState.INTENDED
        )
        if entry.state.settled:
            self._bodies_written.discard(external_task_id)
            self._mine.pop(external_task_id, None)
            with_body = False
        else:
            self._bodies_written.add(external_task_id)
            self._mine[external_task_id] = entry
        self._queue.append((entry, with_body))
        self._queued += 1
        self._start()
        if self._wake is not None:
            self._wake.set()

    async def flush(self) -> None:
        """Return once every entry recorded so far is written to Redis; raise
        :class:`TimeoutError` when Redis could not be reached for ``flush_timeout``,
        :class:`RuntimeError` once closed with entries recorded and not written."""
        target = self._queued
        if self._closed:
            unwritten = self._dropped + max(0, target - self._written)
            if unwritten:
                raise RuntimeError(
                    f"the shared ledger is closed: {unwritten} entries recorded were not written"
                )
        if self._written >= target:
            return
        self._start()
        if self._refused is not None:
            raise self._refused
        future = asyncio.get_running_loop().create_future()
        self._flushes.append((target, future))
        try:
            await asyncio.wait_for(future, self.flush_timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"the shared ledger could not be written for {self.flush_timeout:g} s "
                "(Redis unreachable?)"
            ) from None

    async def fenced(self) -> list[str]:
        """This member was taken for dead and joined again: stop following the
        tasks survivors took over meanwhile (their entries are another
        member's now). Their handles end with :class:`TaskTakenOverError`;
        nothing is written or released for them here (it is the new owner's).
        Returns their external_task_ids."""
        ids = list(self._mine)
        if not ids:
            return []
        owners = await self.account.redis.hmget(self.account.key("owner"), ids)  # type: ignore[misc]
        lost = {
            external_task_id: text(owner)
            for external_task_id, owner in zip(ids, owners, strict=True)
            if owner is not None and text(owner) != self.member
        }
        for external_task_id, owner in lost.items():
            entry = self._mine.pop(external_task_id, None)
            self._bodies_written.discard(external_task_id)
            for part in self.account._parts:
                drop = getattr(part, "drop", None)
                if drop is not None:
                    drop(external_task_id)
            if self._submissions is not None and entry is not None:
                error = TaskTakenOverError(
                    entry.task_id or "", external_task_id, owner, self.account.name
                )
                self._submissions.relinquish(external_task_id, error)
        if lost:
            logger.warning(
                "member %s was taken for dead: %d of its tasks are other members' now; it "
                "stops following them (%s)",
                self.member,
                len(lost),
                ", ".join(sorted(lost)),
            )
        return sorted(lost)

    def reassert(self) -> None:
        """Redis lost the account's state: write this process's unsettled
        entries again, bodies included (called by the account on a reset)."""
        for entry in self._mine.values():
            self._queue.append((entry, True))
            self._queued += 1
        self._start()
        if self._wake is not None:
            self._wake.set()

    async def reserve(self, key: str, entry: LedgerEntry, digest: str) -> tuple[str, str] | None:
        """Reserve ``key`` for ``entry`` and write its intent, atomically:
        ``None`` when this call reserved it, else the external_task_id and the
        request digest already reserved under it."""
        self._mine[entry.external_task_id] = entry
        self._bodies_written.add(entry.external_task_id)
        reply = await self.account.call(
            self._reserve,
            self._record_keys,
            [
                self.account.prefix,
                key,
                entry.external_task_id,
                digest,
                dump_entry(attrs.evolve(entry, owner=self.member)),
                _json(dict(entry.body)),
                entry.intended_at,
            ],
        )
        if not reply:
            return None
        self._mine.pop(entry.external_task_id, None)
        self._bodies_written.discard(entry.external_task_id)
        reserved, _, digest_then = text(reply[0]).partition(" ")
        return reserved, digest_then

    async def reserved(self, key: str) -> tuple[str, str] | None:
        """The external_task_id and request digest reserved under ``key``, if any."""
        raw = await self.account.redis.get(self.account.key(f"k:{key}"))
        if raw is None:
            return None
        reserved, _, digest = text(raw).partition(" ")
        return reserved, digest

    async def get(self, external_task_id: str) -> LedgerEntry | None:
        redis = self.account.redis
        async with redis.pipeline(transaction=False) as pipe:
            pipe.get(self.account.key(f"e:{external_task_id}"))
            pipe.get(self.account.key(f"b:{external_task_id}"))
            pipe.hget(self.account.key("owner"), external_task_id)
            raw, body, owner = await pipe.execute()
        return None if raw is None else load_entry(raw, body, owner)

    async def by_key(self, key: str) -> LedgerEntry | None:
        reserved = await self.reserved(key)
        return None if reserved is None else await self.get(reserved[0])

    async def unsettled(self) -> list[LedgerEntry]:
        """What ``client.resume()`` settles here: the unsettled entries of dead
        members (claimed for this process by this call) and this process's
        uncertain ones. Creates in flight in live processes are not listed."""
        claimed = [entry for _owner, entry in await self.claim()]
        uncertain = [
            entry
            for entry in await self.owned_by(self.member)
            if entry.state is EntryState.UNCERTAIN
        ]
        known = {entry.external_task_id for entry in claimed}
        return claimed + [entry for entry in uncertain if entry.external_task_id not in known]

    async def close(self) -> None:
        """Write what is queued, then stop. Idempotent."""
        if self._closed:
            return
        try:
            await asyncio.wait_for(self.flush(), self.account.close_timeout)
        except KlingError as error:  # refused: the namespace is another account's
            logger.warning("shared ledger closed unwritten: %s", error)
        except (TimeoutError, asyncio.TimeoutError):
            logger.warning(
                "shared ledger closed with %d entries not written (Redis unreachable): %s",
                len(self._queue),
                ", ".join(sorted({entry.external_task_id for entry, _ in self._queue})),
            )
        self._closed = True
        await stop_tasks(self._writer)
        for _target, future in self._flushes:
            if not future.done():
                future.set_exception(RuntimeError("the ledger closed before the write"))

    # --- sharing ------------------------------------------------------------------------

    async def claim(self, owner: str | None = None) -> list[tuple[str, LedgerEntry]]:
        """Take over the unsettled entries of dead members (of ``owner`` only,
        if given) for this process; return each with the member it came from.
        Atomic: two processes claiming at once never get the same entry."""
        await self.flush()
        flat = await self.account.call(
            self._claim, self._claim_keys, [self.account.prefix, owner or ""]
        )
        pairs = [(text(flat[i]), text(flat[i + 1])) for i in range(0, len(flat), 2)]
        entries = await asyncio.gather(*(self.get(ext) for _owner, ext in pairs))
        claimed = [
            (owner_id, entry)
            for (owner_id, _ext), entry in zip(pairs, entries, strict=True)
            if entry is not None
        ]
        for _owner_id, entry in claimed:
            self._mine[entry.external_task_id] = entry  # its current try is ours now
        return claimed

    async def owned_by(self, member: str) -> list[LedgerEntry]:
        """The unsettled entries ``member`` owns."""
        members: set[Any] = await self.account.redis.smembers(  # type: ignore[misc]
            self.account.key(f"owned:{member}")
        )
        entries = await asyncio.gather(*(self.get(text(ext)) for ext in members))
        return sorted(
            (entry for entry in entries if entry is not None), key=lambda e: e.intended_at
        )

    async def all_unsettled(self) -> list[LedgerEntry]:
        """Every unsettled entry of the account, whoever owns it (read only)."""
        ids = await self.account.redis.zrange(self.account.key("unsettled"), 0, -1)
        entries = await asyncio.gather(*(self.get(text(ext)) for ext in ids))
        return [entry for entry in entries if entry is not None]

    async def spend(self, by: SpendGrouping = "total") -> list[Spend]:
        """What the account's creates cost, as every process recorded them, grouped
        ``by`` ``"batch"``, ``"day"``, ``"endpoint"``, ``"model"`` or in ``"total"``:
        estimated against what Kling deducted (see :class:`~kling_async.Spend`).

        Entries are kept ``retention`` seconds (7 days by default), and a settled
        create's body is dropped, so its model reads ``"-"``: for spend by model over
        any period, keep a :class:`~kling_async.Journal` as well.
        """
        await self.flush()
        redis = self.account.redis
        pattern = self.account.keys_matching("e:")
        keys = [key async for key in redis.scan_iter(match=pattern, count=500)]
        entries: list[LedgerEntry] = []
        for start in range(0, len(keys), _SPEND_CHUNK):
            chunk = keys[start : start + _SPEND_CHUNK]
            raws = await redis.mget(chunk)
            entries.extend(load_entry(raw, None) for raw in raws if raw is not None)
        return spend_of(entries, by)

    # --- the writer ---------------------------------------------------------------------

    def _start(self) -> None:
        if self._writer is not None or self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # recorded outside a loop: written by the next flush
            return
        self._wake = asyncio.Event()
        self._wake.set()
        self._writer = loop.create_task(self._write_forever(), name="kling-redis-ledger")

    async def _bind(self) -> bool:
        """Bind the namespace to this ledger's Kling account; False if it is another's."""
        retry = _RETRY_FIRST
        while self._fingerprint is not None:
            try:
                await self.account.bind_fingerprint(self._fingerprint)
                return True
            except ConfigurationError as error:
                logger.error("shared ledger refused: %s", error)
                self._refused = error
                for _target, future in self._flushes:
                    if not future.done():
                        future.set_exception(error)
                self._flushes = []
                return False
            except RedisError as error:
                logger.warning("shared ledger: Redis unreachable (%s); retrying", error)
                await asyncio.sleep(retry)
                retry = min(_RETRY_MAX, retry * 2)
        return True

    async def _write_forever(self) -> None:
        assert self._wake is not None
        if not await self._bind():
            return
        retry = _RETRY_FIRST
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch = list(self._queue)
                try:
                    await asyncio.wait_for(self._write(batch), max(1.0, self.account.lease))
                except (RedisError, asyncio.TimeoutError) as error:
                    # The same writes are sent again: writing an entry twice is harmless.
                    logger.warning("shared ledger: Redis unreachable (%s); retrying", error)
                    await asyncio.sleep(retry)
                    retry = min(_RETRY_MAX, retry * 2)
                    continue
                retry = _RETRY_FIRST
                del self._queue[: len(batch)]
                self._written += len(batch)
                self._settle_flushes()

    async def _write(self, batch: list[tuple[LedgerEntry, bool]]) -> None:
        records = []
        for entry, with_body in batch:
            owned = entry if entry.owner == self.member else attrs.evolve(entry, owner=self.member)
            records.append(
                [
                    entry.external_task_id,
                    dump_entry(owned),
                    _json(dict(entry.body)) if with_body else "",
                    entry.key or "",
                    request_digest(entry.body) if entry.key else "",
                    int(entry.state.settled),
                    entry.intended_at,
                    entry.state.value,
                ]
            )
        refused = await self.account.call(
            self._record, self._record_keys, [self.account.prefix, self.retention, _json(records)]
        )
        tries = {entry.external_task_id: entry.intended_at for entry, _ in batch}
        for raw in refused:
            # A survivor claimed it while this process was taken for dead (it is
            # theirs), or another try of the create is the current one.
            external_task_id = text(raw)
            mine = self._mine.get(external_task_id)
            if mine is not None and mine.intended_at == tries.get(external_task_id):
                del self._mine[external_task_id]
            logger.warning(
                "entry %s is another member's or another try's now; not written by %s",
                external_task_id,
                self.member,
            )

    def _settle_flushes(self) -> None:
        still = []
        for target, future in self._flushes:
            if self._written >= target:
                if not future.done():
                    future.set_result(None)
            else:
                still.append((target, future))
        self._flushes = still
