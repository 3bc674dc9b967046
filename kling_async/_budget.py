"""Budgets: a cap on the resource-pack units a client or a batch may spend.

A create is money, and Kling bills it from the moment it accepts it, so a
budget must be checked *before* sending and must count what is on its way:

- at intent, the create's estimate (from the price table, the most it can
  cost) is **reserved**; a create whose estimate would take ``spent +
  reserved`` past the limit is refused with :class:`BudgetExceededError`, and
  nothing is sent. Reserving is one atomic step, so N concurrent creates
  cannot all see the same room;
- when the task ends, its reservation is **settled**: replaced by what Kling
  deducted (the estimate stays when Kling did not say);
- a create that did not land (refused, confirmed absent, dropped before it
  was sent) is **released**; one that may have landed (uncertain) keeps its
  reservation, as it may be billed;
- a task that exists already (resumed after a crash, re-attached) is
  **adopted**: counted, never refused, since it is billed whatever the budget.

Every call names the create by its external_task_id, so each is idempotent:
a second reserve of the same id (a re-queue, a second resume) counts nothing
more, and a settle after a settle changes nothing. That is what lets a shared
implementation (``contrib.redis``) keep the same rules across processes with
one script per step, as the quota does.

:class:`Budget` is the protocol; :class:`UnitBudget` the in-process budget.
:func:`spend_of` reads back what a journal's creates were estimated at and
billed (``Journal.spend``).
"""

from __future__ import annotations

import collections
import datetime
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any, Final, Literal, Protocol, runtime_checkable

import attrs

from ._exceptions import BudgetExceededError
from ._ledger import EntryState, LedgerEntry

__all__ = ["Budget", "BudgetState", "Spend", "SpendGrouping", "UnitBudget", "spend_of"]

#: How many settled creates a :class:`UnitBudget` remembers, to count each once.
SETTLED_REMEMBERED: Final = 16_384


@attrs.frozen(kw_only=True)
class BudgetState:
    """A budget at one moment: its ``limit``, what ended tasks were billed
    (``spent``), what running creates and tasks hold (``reserved``), and what is
    ``left`` (never below zero)."""

    limit: Decimal
    spent: Decimal
    reserved: Decimal

    @property
    def left(self) -> Decimal:
        """The units a new create may still reserve."""
        return max(self.limit - self.spent - self.reserved, Decimal(0))


@runtime_checkable
class Budget(Protocol):
    """What the create owner needs of a budget (see the module docstring).

    ``reserve`` is the only call that may wait (a shared budget asks Redis);
    the others never block, so they can run from a task's end callbacks (a
    shared budget queues them and applies them in order).
    """

    #: What the refusal calls it: ``"budget"`` (the client's), ``"max_units"`` (a batch's).
    name: str

    async def reserve(self, key: str, units: Decimal) -> None:
        """Hold ``units`` for the create ``key``, or raise
        :class:`BudgetExceededError` when ``spent + reserved + units`` would be
        over the limit. A key already held or settled holds nothing more."""

    def adopt(self, key: str, units: Decimal) -> None:
        """Count ``units`` for a create that may exist already, or a task that
        does: never refused, since it is billed whatever the budget says."""

    def settle(self, key: str, units: Decimal) -> None:
        """The task of ``key`` ended and was billed ``units``: they replace its
        reservation (a key never reserved, a task that ended in an earlier
        run, is counted as spent)."""

    def release(self, key: str) -> None:
        """The create of ``key`` did not land: its reservation is given back."""

    async def state(self) -> BudgetState:
        """The budget now."""


def _units(value: Decimal | int | str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (Decimal, int, str)):
        raise TypeError(f"a budget is a number of units, got {type(value).__name__}")
    units = Decimal(value)
    if not units.is_finite() or units < 0:
        raise ValueError(f"a budget must be a finite number of units >= 0, got {value!r}")
    return units


class UnitBudget:
    """A budget of ``limit`` resource-pack units, kept in this process.

    ``Client(budget=1000)`` makes one; pass one instance to several clients to
    share it between them. All its steps run without awaiting anything, so on
    one event loop each is atomic. Its memory is bounded: it remembers the
    16,384 most recent settled creates (a create settled
    again after that many others is counted twice: refused early, never over).
    """

    def __init__(self, limit: Decimal | int | str, *, name: str = "budget") -> None:
        self.limit = _units(limit)
        self.name = name
        self._reserved: dict[str, Decimal] = {}
        # The most recent settled keys, for idempotency; bounded, since a service
        # settles millions over its life. A key forgotten and settled or reserved
        # again is counted again: the safe side (refusing early, never overrunning).
        self._spent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._reserved_total = Decimal(0)
        self._spent_total = Decimal(0)

    def __repr__(self) -> str:
        return (
            f"<UnitBudget {self.name} {self.limit} units: {self._spent_total} spent, "
            f"{self._reserved_total} reserved>"
        )

    @property
    def spent(self) -> Decimal:
        """Units ended tasks were billed."""
        return self._spent_total

    @property
    def reserved(self) -> Decimal:
        """Units held by creates and tasks that have not ended."""
        return self._reserved_total

    @property
    def left(self) -> Decimal:
        """Units a new create may still reserve."""
        return max(self.limit - self._spent_total - self._reserved_total, Decimal(0))

    async def reserve(self, key: str, units: Decimal) -> None:
        self.take(key, units)

    def take(self, key: str, units: Decimal) -> None:
        """:meth:`reserve`, synchronously (this budget never waits)."""
        if key in self._reserved or key in self._spent:
            return
        if self._spent_total + self._reserved_total + units > self.limit:
            raise BudgetExceededError(
                budget=self.limit,
                spent=self._spent_total,
                reserved=self._reserved_total,
                estimate=units,
                name=self.name,
            )
        self._hold(key, units)

    def adopt(self, key: str, units: Decimal) -> None:
        if key not in self._reserved and key not in self._spent:
            self._hold(key, units)

    def settle(self, key: str, units: Decimal) -> None:
        if key in self._spent:
            return
        self._reserved_total -= self._reserved.pop(key, Decimal(0))
        self._spent[key] = None
        if len(self._spent) > SETTLED_REMEMBERED:
            self._spent.popitem(last=False)
        self._spent_total += units

    def release(self, key: str) -> None:
        self._reserved_total -= self._reserved.pop(key, Decimal(0))

    async def state(self) -> BudgetState:
        return BudgetState(limit=self.limit, spent=self._spent_total, reserved=self._reserved_total)

    def _hold(self, key: str, units: Decimal) -> None:
        self._reserved[key] = units
        self._reserved_total += units


def as_budget(value: Budget | Decimal | int | str | None, name: str) -> Budget | None:
    """``Client(budget=...)``'s and ``batch(max_units=...)``'s argument as a
    :class:`Budget`: a number makes a :class:`UnitBudget` called ``name``."""
    if value is None or isinstance(value, Budget):
        return value
    return UnitBudget(value, name=name)


# --- what was spent ---------------------------------------------------------------

#: How :func:`spend_of` groups entries.
SpendGrouping = Literal["total", "batch", "day", "endpoint", "model"]
_GROUPINGS: Final = ("total", "batch", "day", "endpoint", "model")
#: Entries of creates that exist, or may: the ones that cost something.
_BILLABLE: Final = frozenset(
    (
        EntryState.SENT,
        EntryState.CREATED,
        EntryState.UNCERTAIN,
        EntryState.TERMINAL,
        EntryState.GONE,
    )
)


@attrs.frozen(kw_only=True)
class Spend:
    """What the creates of one ``group`` cost, in resource-pack units.

    ``tasks`` counts the creates that exist or may (created, ended, uncertain,
    gone; not those refused or never sent). ``estimated`` adds up their
    estimates (``unpriced`` had none), ``deducted`` what Kling billed the ended
    ones (``unreported`` ended without a deduction: an older journal, or Kling
    did not say), ``running`` counts those not ended yet, whose bill is still
    to come.
    """

    group: str
    tasks: int = 0
    estimated: Decimal = Decimal(0)
    deducted: Decimal = Decimal(0)
    running: int = 0
    unreported: int = 0
    unpriced: int = 0


def _group_of(entry: LedgerEntry, by: SpendGrouping) -> str:
    if by == "batch":
        return entry.batch or "-"
    if by == "day":
        return (
            datetime.datetime.fromtimestamp(entry.intended_at, datetime.timezone.utc)
            .date()
            .isoformat()
        )
    if by == "endpoint":
        return entry.endpoint.value
    if by == "model":
        model = entry.body.get("model_name") if isinstance(entry.body, Mapping) else None
        return model if isinstance(model, str) and model else "-"
    return "total"


def spend_of(entries: Iterable[LedgerEntry], by: SpendGrouping = "total") -> list[Spend]:
    """What ``entries`` (a journal's) cost, grouped ``by`` batch (its name;
    ``"-"`` for creates of no batch), day (UTC, of the intent), endpoint, model
    (``"-"`` for endpoints that name none) or in ``"total"``; groups sorted by
    name. Estimated against deducted, as the CLI's ``costs`` command prints."""
    if by not in _GROUPINGS:
        raise ValueError(f"by must be one of {', '.join(_GROUPINGS)}; got {by!r}")
    # Added up in lists, a Spend made once per group: a journal holds many thousands.
    groups: dict[str, list[Any]] = {}
    for entry in entries:
        if entry.state not in _BILLABLE:
            continue
        group = _group_of(entry, by)
        totals = groups.get(group)
        if totals is None:
            totals = groups[group] = [0, Decimal(0), Decimal(0), 0, 0, 0]
        ended = entry.state is EntryState.TERMINAL
        units = entry.cost.units if entry.cost is not None else None
        totals[0] += 1
        if entry.estimate is None:
            totals[5] += 1
        else:
            totals[1] += entry.estimate
        if ended and units is not None:
            totals[2] += units
        totals[3] += not entry.state.settled
        totals[4] += ended and units is None
    if by == "total" and not groups:
        return [Spend(group="total")]
    return [
        Spend(
            group=name,
            tasks=totals[0],
            estimated=totals[1],
            deducted=totals[2],
            running=totals[3],
            unreported=totals[4],
            unpriced=totals[5],
        )
        for name, totals in sorted(groups.items())
    ]
