"""The ledger: what the client knows of every create, keyed by external_task_id.

A create is money: Kling bills a task from the moment it accepts it, whether or
not its answer reaches us. So the create's owner (``_submissions``) writes an
entry for each create *before* anything is sent, and keeps it current as the
create settles: sent, created (with the task_id), not created, or uncertain
(sent, and nobody could tell whether it landed), then terminal.

:class:`Ledger` is the protocol; :class:`MemoryLedger` the default, which keeps
only what a running process needs (creates not yet settled). A durable journal
(SQLite) and a shared one (Redis) implement the same protocol, so resuming
after a crash, or adopting another process's tasks, reads the same entries.

Writes are synchronous and never block (``record``); a durable implementation
queues them and makes them durable in batches. ``flush`` is the barrier: once it
returns, everything recorded before it survives a crash; while anything recorded
before it is not durable (a failed commit), it raises instead, so the owner, which
awaits it after recording an intent and before sending the create, never sends a
create the ledger does not hold. A ledger that cannot work any more (it cannot be
opened, its writer failed) raises from every call rather than leave one waiting,
and ``close`` always returns.

Entries never hold credentials: the request body is stored without a callback
URL the receiver made (its path is a token; it is made again from the id).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, Protocol, runtime_checkable

import attrs

from ._models import Cost, Endpoint, ImageResult

__all__ = ["EntryState", "Ledger", "LedgerEntry", "MemoryLedger"]


class EntryState(str, enum.Enum):
    """Where a create stands."""

    INTENDED = "intended"
    """Recorded, not sent yet."""
    SENT = "sent"
    """Sent, and the answer did not tell whether Kling created it (lost, a
    timeout, a 5xx): being looked up. Like an intent, it is looked up before
    anything is sent again."""
    CREATED = "created"
    """Kling created the task; ``task_id`` is known."""
    NOT_CREATED = "not_created"
    """Kling refused it, confirmed it has no such task, or it was never sent."""
    UNCERTAIN = "uncertain"
    """Sent, and it could not be told whether Kling created it: look it up by
    external_task_id (``client.images.get`` or ``client.resume()``)."""
    TERMINAL = "terminal"
    """The task ended (``succeed`` or ``failed``)."""
    GONE = "gone"
    """Kling answered "not found" (1203) for the task's ``task_id``: it belongs to
    another account or base_url, was purged, or was only simulated. Settled: a
    rerun reports it (:class:`~kling_async.TaskNotFoundError`) and creates nothing."""

    @property
    def settled(self) -> bool:
        """True when nothing more will happen to the create: it ended, never was,
        or Kling no longer knows it."""
        return self in (EntryState.NOT_CREATED, EntryState.TERMINAL, EntryState.GONE)

    def __str__(self) -> str:
        return self.value


@attrs.frozen(kw_only=True)
class LedgerEntry:
    """One create, as the ledger holds it.

    ``body`` is the create's JSON body (Kling's wire names) without a callback
    URL the client's receiver made; ``receiver_callback`` says one was made, so
    that a re-send gets a fresh one. ``units`` is the task's share of the
    concurrency quota (its ``n``). ``status`` and ``images`` are the task's last
    known status and results; ``error`` says why a create was not made or is
    uncertain. ``key`` identifies the request inside a batch (its position and
    content) so a rerun finds it; ``owner`` names the process that holds it.
    Times are Unix seconds.

    Money: ``estimate`` is what the price table said the create would cost, in
    resource-pack units (``None`` when the table has no price for it); ``cost``
    what Kling deducted once the task ended (``None`` until then, or when Kling
    did not say). ``pack`` is the resource-pack type whose concurrency the
    ``units`` came from, ``units_used`` how many the task turned out to need
    (less than ``units`` for an ``auto`` series). ``batch`` names the batch the
    create belongs to, if any.
    """

    external_task_id: str
    endpoint: Endpoint
    body: Mapping[str, Any] = attrs.field(repr=False)
    units: int = 1
    state: EntryState = EntryState.INTENDED
    task_id: str | None = None
    status: str | None = None
    images: tuple[ImageResult, ...] = ()
    error: str | None = None
    receiver_callback: bool = False
    key: str | None = None
    owner: str | None = None
    downloaded: tuple[str, ...] = ()
    estimate: Decimal | None = None
    cost: Cost | None = None
    pack: str = "image"
    units_used: int | None = None
    batch: str | None = None
    intended_at: float = attrs.field(factory=time.time)
    updated_at: float = attrs.field(factory=time.time)

    def moved(self, state: EntryState, **changes: Any) -> LedgerEntry:
        """This entry in ``state`` (with ``changes``), stamped now."""
        return attrs.evolve(self, state=state, updated_at=time.time(), **changes)


@runtime_checkable
class Ledger(Protocol):
    """Where a client records its creates. Implementations: :class:`MemoryLedger`
    (the default), :class:`~kling_async.Journal` (SQLite), the Redis ledger of
    ``kling_async.contrib.redis``.

    Every member below is one callers rely on; a ledger that is not a subclass
    declares them all, :attr:`records_results` included.
    """

    @property
    def records_results(self) -> bool:
        """Whether the create's owner also keeps the ledger's entries current
        with each task's status changes, results and downloads: True for a
        durable ledger (``resume()`` wants them); False, the default, for one
        that only tracks creates until they settle, as :class:`MemoryLedger`.
        A plain class attribute declares it (``records_results: Final = True``)."""
        return False

    def record(self, entry: LedgerEntry) -> None:
        """Insert or replace the entry for ``entry.external_task_id``. Never blocks:
        a durable ledger queues the write; :meth:`flush` waits for it."""

    async def flush(self) -> None:
        """Return once every entry recorded so far is durable; raise (and keep
        raising) while any of them is not."""

    async def get(self, external_task_id: str) -> LedgerEntry | None:
        """The entry for ``external_task_id``, if the ledger holds one."""

    async def by_key(self, key: str) -> LedgerEntry | None:
        """The latest entry recorded under a batch request's ``key``, if any."""

    async def unsettled(self) -> list[LedgerEntry]:
        """Entries whose create or task has not reached an end: intended, sent,
        created or uncertain. What ``client.resume()`` settles."""

    async def close(self) -> None:
        """Flush and release the ledger's resources; always returns."""


class MemoryLedger:
    """The default ledger: this process's unsettled creates, in memory.

    Once a task is created the client's tracker knows it, and nothing in memory
    outlives the process anyway, so created, terminal and not-created entries are
    dropped: what stays are creates in progress and uncertain ones, which is what
    ``close()`` reports and :meth:`unsettled` lists.
    """

    #: Created tasks are the tracker's business, not this ledger's (a subclass
    #: that wants results kept current says True).
    records_results: bool = False

    def __init__(self) -> None:
        self._entries: dict[str, LedgerEntry] = {}

    def __repr__(self) -> str:
        return f"<MemoryLedger {len(self._entries)} unsettled>"

    def record(self, entry: LedgerEntry) -> None:
        if entry.state in (EntryState.INTENDED, EntryState.SENT, EntryState.UNCERTAIN):
            self._entries[entry.external_task_id] = entry
        else:
            self._entries.pop(entry.external_task_id, None)

    async def flush(self) -> None:
        return None

    async def get(self, external_task_id: str) -> LedgerEntry | None:
        return self._entries.get(external_task_id)

    async def by_key(self, key: str) -> LedgerEntry | None:
        matches = [entry for entry in self._entries.values() if entry.key == key]
        return max(matches, key=lambda entry: entry.intended_at) if matches else None

    async def unsettled(self) -> list[LedgerEntry]:
        return list(self._entries.values())

    async def close(self) -> None:
        return None
