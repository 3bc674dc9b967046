"""A budget shared by every process of an account, through Redis.

The same rules as :class:`~kling_async.UnitBudget` (see ``kling_async._budget``),
with every step one Lua script, so it is atomic across processes: two members
reserving at once never both see the same room. Amounts are kept in
micro-units (integers, exact in Redis and in Lua); an estimate or a deduction
with more than six decimals is rounded up, never down.

Keys (``P`` is the account's prefix, ``N`` the budget's name):

``P budget:N``           hash  ``spent`` and ``reserved``, in micro-units
``P budget:N:reserved``  hash  external_task_id -> micro-units reserved
``P budget:N:spent``     hash  external_task_id -> micro-units billed

Each script acts for a member under the account's fencing (its token and the
account's epoch are checked first, as every script of the account does). A
step names its create by external_task_id, so it is idempotent: a step retried
after its answer was lost, a task settled by the member that adopted it and by
its first holder, count once. Should Redis lose the account's state (its epoch
key gone), what the budget had spent is lost with it: the budget then refuses
every create until it is opened afresh, rather than spend the same money twice.
"""

from __future__ import annotations

import asyncio
import logging
from decimal import ROUND_CEILING, Decimal
from typing import TYPE_CHECKING, Final

from redis.exceptions import RedisError

from kling_async._budget import BudgetState
from kling_async._exceptions import BudgetExceededError, KlingError

from ._account import stop_tasks, text
from ._scripts import _PRELUDE

if TYPE_CHECKING:
    from ._account import RedisAccount

__all__ = ["BUDGET", "RedisBudget"]

logger = logging.getLogger("kling_async")

#: The unit the budget counts in Redis: a millionth of a resource-pack unit.
MICRO: Final = Decimal("0.000001")
#: Bounds of the pause between tries of a queued step while Redis cannot be reached.
_RETRY_FIRST, _RETRY_MAX = 0.05, 2.0

BUDGET: Final = (
    _PRELUDE
    + r"""
-- KEYS[7..9]: the budget's totals, reservations, settlements.
-- ARGV: 6 op (reserve, adopt, settle, release, state), 7 external_task_id,
--       8 micro-units (an integer, as text), 9 the limit in micro-units
local B, R, S = KEYS[7], KEYS[8], KEYS[9]
reap()
local status = standing()
if status ~= 'ok' then
  return {status}
end
local op, task, units, limit = ARGV[6], ARGV[7], ARGV[8], tonumber(ARGV[9])
local function totals(word)
  return {'ok', word, n(redis.call('HGET', B, 'spent')), n(redis.call('HGET', B, 'reserved'))}
end
if op == 'state' then
  return totals('state')
end
local reserved = redis.call('HGET', R, task)
local settled = redis.call('HEXISTS', S, task) == 1
if op == 'reserve' or op == 'adopt' then
  if reserved or settled then
    return totals('held')
  end
  local spent, held = n(redis.call('HGET', B, 'spent')), n(redis.call('HGET', B, 'reserved'))
  if op == 'reserve' and spent + held + tonumber(units) > limit then
    return totals('over')
  end
  redis.call('HSET', R, task, units)
  redis.call('HINCRBY', B, 'reserved', units)
  return totals('held')
end
-- The task's reservation, if it holds one, goes (settled or released alike).
local function unreserve()
  if reserved then
    redis.call('HDEL', R, task)
    redis.call('HINCRBY', B, 'reserved', '-' .. reserved)
  end
end
if op == 'settle' then
  if settled then
    return totals('done')
  end
  unreserve()
  redis.call('HSET', S, task, units)
  redis.call('HINCRBY', B, 'spent', units)
  return totals('done')
end
if op == 'release' then
  unreserve()
  return totals('done')
end
return redis.error_reply('unknown budget step ' .. op)
"""
)
"""One step of a shared budget: reply ``['ok', word, spent, reserved]`` (micro-units)."""


def _micro(units: Decimal) -> int:
    """``units`` in micro-units, rounded up: a budget never under-counts."""
    return int((units / MICRO).to_integral_value(rounding=ROUND_CEILING))


def _units(micro: object) -> Decimal:
    """Micro-units from Redis as units, without the trailing zeros of six decimals."""
    units = Decimal(int(text(micro))) * MICRO
    return units.quantize(Decimal(1)) if units == units.to_integral_value() else units.normalize()


class RedisBudget:
    """A :class:`~kling_async.Budget` of ``limit`` resource-pack units shared by
    every process that opens it under ``name`` in one :class:`RedisAccount`::

        budget = RedisBudget(account, 1000)
        async with kling_async.Client(budget=budget) as client:
            ...

    Every process must give the same ``limit``. :meth:`reserve` asks Redis and
    waits for its answer; should Redis be unreachable, the create is refused
    (a :class:`~kling_async.KlingError`; nothing is sent), never let through
    unchecked. ``adopt``, ``settle`` and ``release`` are queued and applied in
    order by a background task, retried until Redis answers; :meth:`flush`
    waits for them, :meth:`close` (also done by the account's ``close()``)
    applies what it can within the account's ``close_timeout``.
    """

    def __init__(
        self, account: RedisAccount, limit: Decimal | int | str, *, name: str = "budget"
    ) -> None:
        units = Decimal(limit)
        if not units.is_finite() or units < 0:
            raise ValueError(f"a budget must be a finite number of units >= 0, got {limit!r}")
        self.account = account
        self.limit = units
        self.name = name
        self._script = account.script(BUDGET)
        base = f"budget:{name}"
        self._keys = [
            account.key(base),
            account.key(base + ":reserved"),
            account.key(base + ":spent"),
        ]
        self._queue: asyncio.Queue[tuple[str, str, Decimal]] | None = None
        self._writer: asyncio.Task[None] | None = None
        #: Set when Redis lost the account's state: every create is refused.
        self._lost = False
        self._closed = False
        account._own(self)

    @property
    def lost(self) -> bool:
        """True once Redis lost the account's state: every create is refused."""
        return self._lost

    def __repr__(self) -> str:
        return f"<RedisBudget {self.account.name!r}/{self.name} of {self.limit} units>"

    async def _step(self, op: str, key: str, units: Decimal) -> tuple[str, Decimal, Decimal]:
        reply = await self.account.call(
            self._script, self._keys, [op, key, _micro(units), _micro(self.limit)]
        )
        return text(reply[0]), _units(reply[1]), _units(reply[2])

    # --- the Budget protocol ----------------------------------------------------------

    async def reserve(self, key: str, units: Decimal) -> None:
        """Hold ``units`` for the create ``key`` in one script, or raise
        :class:`~kling_async.BudgetExceededError`; a Redis that cannot be
        reached, or lost the budget, refuses the create too."""
        if self.lost:
            raise self._lost_error()
        try:
            word, spent, reserved = await self._step("reserve", key, units)
        except RedisError as error:
            raise KlingError(
                f"the shared budget {self.name!r} cannot be reached ({error}); the create is "
                "refused rather than let through unchecked"
            ) from error
        if self._lost_meanwhile():  # Redis lost the account's state during this call
            self._enqueue("release", key, units)
            raise self._lost_error()
        if word == "over":
            raise BudgetExceededError(
                budget=self.limit, spent=spent, reserved=reserved, estimate=units, name=self.name
            )

    def adopt(self, key: str, units: Decimal) -> None:
        self._enqueue("adopt", key, units)

    def settle(self, key: str, units: Decimal) -> None:
        self._enqueue("settle", key, units)

    def release(self, key: str) -> None:
        self._enqueue("release", key, Decimal(0))

    async def state(self) -> BudgetState:
        """The budget as Redis holds it now, for every process."""
        _word, spent, reserved = await self._step("state", "", Decimal(0))
        return BudgetState(limit=self.limit, spent=spent, reserved=reserved)

    # --- the queue of steps that do not wait --------------------------------------------

    def _enqueue(self, op: str, key: str, units: Decimal) -> None:
        if self._closed:
            logger.warning("budget %s is closed; %s of %s not applied", self.name, op, key)
            return
        if self._queue is None:
            self._queue = asyncio.Queue()
        self._queue.put_nowait((op, key, units))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(
                self._write_forever(self._queue), name=f"kling-budget-{self.name}"
            )

    async def _write_forever(self, queue: asyncio.Queue[tuple[str, str, Decimal]]) -> None:
        while True:
            op, key, units = await queue.get()
            pause = _RETRY_FIRST
            while True:
                try:
                    await self._step(op, key, units)
                    break
                except RedisError as error:  # applied once Redis answers again
                    logger.warning(
                        "budget %s: %s of %s waits for Redis: %s", self.name, op, key, error
                    )
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, _RETRY_MAX)
            queue.task_done()

    async def flush(self) -> None:
        """Return once every step queued so far is applied in Redis."""
        if self._queue is not None:
            await self._queue.join()

    async def close(self) -> None:
        """Apply the queued steps (within the account's ``close_timeout``; those
        left are logged) and stop. Idempotent."""
        if self._closed:
            return
        try:
            await asyncio.wait_for(self.flush(), self.account.close_timeout)
        except asyncio.TimeoutError:
            left = self._queue.qsize() if self._queue is not None else 0
            logger.error("budget %s closed with %d steps not applied in Redis", self.name, left)
        self._closed = True
        writer, self._writer = self._writer, None
        await stop_tasks(writer)

    def reassert(self) -> None:
        """Called by the account when Redis lost its state: what was spent is
        gone, so every create is refused from now on."""
        self._lost = True
        logger.error(
            "Redis lost the state of account %r: budget %s no longer knows what was spent "
            "and refuses every create; open it afresh once you know what remains",
            self.account.name,
            self.name,
        )

    def _lost_meanwhile(self) -> bool:
        # A method, not the attribute: the account's rejoin sets it during an await.
        return self._lost

    def _lost_error(self) -> KlingError:
        return KlingError(
            f"the shared budget {self.name!r} was lost with the account's state in Redis; "
            "nothing was sent: open a new budget once you know what remains"
        )
