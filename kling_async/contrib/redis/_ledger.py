"""The ledger of creates, shared by every process of the account through Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING, Any, Final

import attrs
from redis.exceptions import RedisError

from kling_async._ledger import EntryState, LedgerEntry
from kling_async._wire import converter

from . import _scripts
from ._account import text

if TYPE_CHECKING:
    from ._account import RedisAccount

__all__ = ["RedisLedger"]

logger = logging.getLogger("kling_async")

#: How long settled entries (ended, or never created) stay readable: a rerun of
#: a job or a batch finds them, and a late report can still be read.
DEFAULT_RETENTION: Final = 7 * 24 * 3600
_RETRY_FIRST, _RETRY_MAX = 0.05, 2.0
#: Every field of an entry but its body (stored once, apart: it may be megabytes).
_FIELDS: Final = tuple(field.name for field in attrs.fields(LedgerEntry) if field.name != "body")


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def dump_entry(entry: LedgerEntry) -> str:
    """The entry as JSON, without its body (stored once, apart)."""
    data = converter.unstructure(entry)
    return _json({name: data[name] for name in _FIELDS})


def load_entry(raw: Any, body: Any, owner: Any = None) -> LedgerEntry:
    """An entry from its JSON and its body's; ``owner`` (from the owner index)
    wins over the one in the JSON, which the owner's last record wrote."""
    data = json.loads(text(raw))
    data["body"] = json.loads(text(body)) if body else {}
    if owner:
        data["owner"] = text(owner)
    entry: LedgerEntry = converter.structure(data, LedgerEntry)
    return entry


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
    ``retention`` seconds (default 7 days). Bodies never hold a credential: the
    create owner leaves out callback URLs the receiver made.
    """

    records_results: Final = True

    def __init__(self, account: RedisAccount, *, retention: float = DEFAULT_RETENTION) -> None:
        self.account = account
        self.retention = int(retention)
        self._record = account.script(_scripts.RECORD)
        self._claim = account.script(_scripts.CLAIM)
        self._record_keys = [
            *account.member_keys,
            account.key("unsettled"),
            account.key("owner"),
            account.key("owners"),
        ]
        self._claim_keys = [*account.member_keys, account.key("owner"), account.key("owners")]
        self._queue: list[tuple[LedgerEntry, bool]] = []
        self._bodies_written: set[str] = set()
        self._queued = 0
        self._written = 0
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

    # --- the Ledger protocol -----------------------------------------------------------

    def record(self, entry: LedgerEntry) -> None:
        """Queue ``entry`` to be written (owned by this process); never blocks."""
        if self._closed:
            logger.debug("ledger closed; entry %s not written", entry.external_task_id)
            return
        with_body = entry.external_task_id not in self._bodies_written
        self._bodies_written.add(entry.external_task_id)
        self._queue.append((entry, with_body))
        self._queued += 1
        self._start()
        if self._wake is not None:
            self._wake.set()

    async def flush(self) -> None:
        """Return once every entry recorded so far is written to Redis."""
        target = self._queued
        if self._written >= target:
            return
        self._start()
        future = asyncio.get_running_loop().create_future()
        self._flushes.append((target, future))
        await future

    async def get(self, external_task_id: str) -> LedgerEntry | None:
        redis = self.account.redis
        async with redis.pipeline(transaction=False) as pipe:
            pipe.get(self.account.key(f"e:{external_task_id}"))
            pipe.get(self.account.key(f"b:{external_task_id}"))
            pipe.hget(self.account.key("owner"), external_task_id)
            raw, body, owner = await pipe.execute()
        return None if raw is None else load_entry(raw, body, owner)

    async def by_key(self, key: str) -> LedgerEntry | None:
        external_task_id = await self.account.redis.get(self.account.key(f"k:{key}"))
        return None if external_task_id is None else await self.get(text(external_task_id))

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
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.flush(), 10.0)
        self._closed = True
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        for _target, future in self._flushes:
            if not future.done():
                future.set_exception(RuntimeError("the ledger closed before the write"))

    # --- sharing ------------------------------------------------------------------------

    async def claim(self, owner: str | None = None) -> list[tuple[str, LedgerEntry]]:
        """Take over the unsettled entries of dead members (of ``owner`` only,
        if given) for this process; return each with the member it came from.
        Atomic: two processes claiming at once never get the same entry."""
        await self.flush()
        lease, orphan_ttl = self.account.ms
        flat = await self._claim(
            keys=self._claim_keys,
            args=[self.account.prefix, self.member, lease, orphan_ttl, owner or ""],
        )
        pairs = [(text(flat[i]), text(flat[i + 1])) for i in range(0, len(flat), 2)]
        entries = await asyncio.gather(*(self.get(ext) for _owner, ext in pairs))
        return [
            (owner_id, entry)
            for (owner_id, _ext), entry in zip(pairs, entries, strict=True)
            if entry is not None
        ]

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

    async def _write_forever(self) -> None:
        assert self._wake is not None
        retry = _RETRY_FIRST
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch = list(self._queue)
                try:
                    await self._write(batch)
                except RedisError as error:
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
                    int(entry.state.settled),
                    entry.intended_at,
                ]
            )
        await self._record(
            keys=self._record_keys,
            args=[self.account.prefix, self.member, self.retention, _json(records)],
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
