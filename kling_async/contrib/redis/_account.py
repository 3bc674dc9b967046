"""One Kling account shared by processes through Redis: who is alive, and the
keys and scripts everything else uses."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError

from . import _scripts

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

    from kling_async._callbacks import CallbackReceiver
    from kling_async._client import Client
    from kling_async._ledger import LedgerEntry

    from ._adopter import Adopter
    from ._fanin import CallbackFanIn
    from ._ledger import RedisLedger
    from ._limiter import RedisLimiter

__all__ = ["RedisAccount"]

_PartT = TypeVar("_PartT")

logger = logging.getLogger("kling_async")

DEFAULT_LEASE: Final = 10.0
DEFAULT_ORPHAN_TTL: Final = 300.0


def _member_id() -> str:
    """A member id unique to this process: the host and pid say where it runs
    (for people reading logs), the random part keeps a restarted process with a
    reused pid apart from its predecessor."""
    host = socket.gethostname().replace("|", "_")[:40]
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"


def text(value: Any) -> str:
    """A Redis reply as ``str``, whether or not the client decodes responses."""
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisAccount:
    """One Kling account, shared by every process that opens it on the same Redis.

    ::

        redis = redis.asyncio.Redis.from_url("redis://127.0.0.1:6379/0")
        async with RedisAccount(redis, name="main") as account:
            limiter = account.limiter(capacity=50)   # the account's quota, in units
            ledger = account.ledger()
            async with kling_async.Client(max_concurrency=limiter, ledger=ledger) as client:
                account.adopt(client)                 # finish the tasks of dead processes
                ...

    Each process is a *member* with a lease it renews every ``lease / 3``
    seconds; a member whose lease runs out (its process died, or stalled for
    ``lease`` seconds) is dead. Its units of the quota are then counted as
    orphans until a survivor adopts its tasks (moving their units to itself)
    or ``orphan_ttl`` passes, so a dead process's units are never held for
    ever, and never freed while Kling still runs its tasks, as long as a
    survivor adopts them.

    ``name`` keeps accounts apart on one Redis (keys are ``kling:{name}:...``).
    ``member`` names this process (default: host, pid and a random part); it
    must be unique among live processes. The account never writes a credential
    to Redis: ledger entries hold request bodies without callback URLs, and
    forwarded callbacks carry the task, never the URL token or headers.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        name: str = "default",
        member: str | None = None,
        lease: float = DEFAULT_LEASE,
        orphan_ttl: float = DEFAULT_ORPHAN_TTL,
    ) -> None:
        if lease <= 0 or orphan_ttl <= 0:
            raise ValueError("lease and orphan_ttl must be positive")
        if member is not None and ("|" in member or not member):
            raise ValueError("member must be a non-empty string without '|'")
        self.redis = redis
        self.name = name
        self.member = member or _member_id()
        self.lease = lease
        self.orphan_ttl = orphan_ttl
        self.prefix = f"kling:{{{name}}}:"
        #: The keys every script takes first (see ``_scripts``).
        self.member_keys = [self.key(name) for name in ("members", "inuse", "running")] + [
            self.key(name) for name in ("orphan_inuse", "orphan_running", "orphan_deadline")
        ]
        self._renew = redis.register_script(_scripts.RENEW)
        self._renewer: asyncio.Task[None] | None = None
        self._closed = False
        self._parts: list[Any] = []  # limiters, ledgers, fan-ins, adopters: closed with it

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._renewer else "not started"
        return f"<RedisAccount {self.name!r} member={self.member!r} {state}>"

    def key(self, name: str) -> str:
        """The Redis key of ``name`` in this account."""
        return self.prefix + name

    def script(self, source: str) -> AsyncScript:
        """Register one of the account's scripts on its Redis client."""
        return self.redis.register_script(source)

    @property
    def ms(self) -> tuple[int, int]:
        """The lease and the orphans' time to live, in milliseconds."""
        return int(self.lease * 1000), int(self.orphan_ttl * 1000)

    # --- the parts ----------------------------------------------------------------------

    def limiter(self, capacity: int | None, **options: Any) -> RedisLimiter:
        """The account's shared concurrency limiter (see :class:`RedisLimiter`);
        every process must give the same ``capacity``."""
        from ._limiter import RedisLimiter

        return self._own(RedisLimiter(self, capacity, **options))

    def ledger(self, **options: Any) -> RedisLedger:
        """The account's shared ledger (see :class:`RedisLedger`)."""
        from ._ledger import RedisLedger

        return self._own(RedisLedger(self, **options))

    def fan_in(self, receiver: CallbackReceiver) -> CallbackFanIn:
        """Share callbacks between replicas (see :class:`CallbackFanIn`); started
        at once, stopped with the account."""
        from ._fanin import CallbackFanIn

        fan_in = self._own(CallbackFanIn(self, receiver))
        fan_in.start()
        return fan_in

    def adopt(
        self,
        client: Client,
        *,
        ledger: RedisLedger | None = None,
        limiter: RedisLimiter | None = None,
        interval: float | None = None,
        on_adopted: Callable[[list[LedgerEntry]], Awaitable[None]] | None = None,
    ) -> Adopter:
        """Have ``client`` finish the tasks of dead members (see :class:`Adopter`).
        ``ledger`` and ``limiter`` default to the client's own."""
        from ._adopter import Adopter

        adopter = self._own(
            Adopter(
                self,
                client,
                ledger=ledger,
                limiter=limiter,
                interval=interval,
                on_adopted=on_adopted,
            )
        )
        adopter.start()
        return adopter

    def _own(self, part: _PartT) -> _PartT:
        self._parts.append(part)
        return part

    # --- the lease ----------------------------------------------------------------------

    async def start(self) -> None:
        """Join: take the lease, and keep renewing it until :meth:`close`."""
        if self._closed:
            raise RuntimeError("the account is closed")
        if self._renewer is None:
            await self.renew()
            self._renewer = asyncio.get_running_loop().create_task(
                self._renew_forever(), name=f"kling-lease-{self.member}"
            )

    async def renew(self, *, leave: bool = False) -> None:
        """Renew this member's lease now (or, with ``leave``, let it run out)."""
        lease, orphan_ttl = self.ms
        await self._renew(keys=self.member_keys, args=[self.member, lease, orphan_ttl, int(leave)])

    async def alive(self, member: str) -> bool:
        """Whether ``member`` holds a lease that has not run out (Redis's clock)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zscore(self.key("members"), member)
            pipe.time()
            expiry, (seconds, micros) = await pipe.execute()
        return expiry is not None and float(expiry) > seconds * 1000 + micros // 1000

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                await self.renew()
            except RedisError as error:  # the lease may yet be renewed in time
                logger.warning("cannot renew the lease of %s: %s", self.member, error)

    async def close(self) -> None:
        """Stop the parts (adopters, fan-ins, limiters, ledgers, in that order),
        stop renewing and give up the lease, so survivors adopt at once what
        this process leaves unfinished. Idempotent. The Redis client stays the
        caller's."""
        if self._closed:
            return
        self._closed = True
        order = ("Adopter", "CallbackFanIn", "RedisLimiter", "RedisLedger")
        for kind in order:
            for part in self._parts:
                if type(part).__name__ == kind:
                    await part.close()
        renewer, self._renewer = self._renewer, None
        if renewer is not None:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            try:
                await self.renew(leave=True)
            except RedisError as error:  # it runs out by itself
                logger.warning("cannot give up the lease of %s: %s", self.member, error)

    async def __aenter__(self) -> RedisAccount:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
