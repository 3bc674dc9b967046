"""One Kling account shared by processes through Redis: who is alive, and the
keys and scripts everything else uses."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import secrets
import socket
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from kling_async._exceptions import ConfigurationError

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
#: How long ``close()`` tries to reach Redis before it gives up (and logs what
#: it could not write): a deploy must not hang on a Redis that is down.
DEFAULT_CLOSE_TIMEOUT: Final = 5.0


class Fenced(RedisError):
    """This member cannot act now: it was reaped (its incarnation is over) or
    Redis lost the account's state; :meth:`RedisAccount.call` joins again."""


def credentials_fingerprint(client: Client) -> str:
    """A fingerprint of the Kling account ``client`` uses: a hash of its base
    URL and its key (the access key, for JWT credentials), never the key itself.
    Two apps with different accounts on one Redis namespace are told apart."""
    credentials = client._transport._credentials
    identity = getattr(credentials, "access_key", None) or getattr(credentials, "token", None) or ""
    material = f"kling-account\0{client.base_url}\0{identity}".encode()
    return hashlib.sha256(material).hexdigest()[:32]


def _member_id() -> str:
    """A member id unique to this process: the host and pid say where it runs
    (for people reading logs), the random part keeps a restarted process with a
    reused pid apart from its predecessor."""
    host = socket.gethostname().replace("|", "_")[:40]
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"


def text(value: Any) -> str:
    """A Redis reply as ``str``, whether or not the client decodes responses."""
    return value.decode() if isinstance(value, bytes) else str(value)


#: How long :func:`stop_tasks` lets a cancelled task finish before cancelling it
#: again: time for its cleanup (closing a connection) on a loaded machine, which a
#: second cancellation would cut short; a lost cancellation delays a close this much.
_RECANCEL_AFTER: Final = 1.0


async def stop_tasks(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel ``tasks`` and return once each has ended (their exceptions are
    retrieved, not raised). A task still running after a while is cancelled
    again: redis-py on Python 3.10 loses a cancellation that lands in its
    zero-timeout connection check (async-timeout turns it into a timeout that
    redis-py ignores), and a background loop that lost one would run, and
    its closer wait, for ever."""
    running = {task for task in tasks if task is not None}
    while running:
        for task in running:
            task.cancel()
        ended, running = await asyncio.wait(running, timeout=_RECANCEL_AFTER)
        for task in ended:
            if not task.cancelled():
                task.exception()


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
    seconds. A member whose lease runs out while Redis serves (its process
    died, or stalled for ``lease`` seconds) is reaped: its incarnation is over
    (its fencing token is withdrawn, so nothing it sends afterwards acts for
    it; it joins again as a new incarnation), and its tasks' units stay
    counted as orphans until a survivor adopts the tasks (moving their units
    to itself) or ``orphan_ttl`` passes. A gap in which Redis itself did not
    serve (stopped, failing over) does not count against leases.

    ``name`` keeps accounts apart on one Redis (keys are ``kling:{name}:...``);
    the first client bound to it (:meth:`bind`, done by :meth:`adopt`,
    ``submit_once`` and ``contrib.arq``) ties it to its Kling account by a
    fingerprint of the credentials, and a client of another account is refused.
    ``member`` names this process (default: host, pid and a random part); a
    member id held by a live process is refused. The account never writes a
    credential to Redis.

    Redis must keep what it is told (AOF, ``maxmemory-policy noeviction``): a
    Redis that lost the account's data is noticed (the epoch key is gone), and
    live members re-assert what they hold before anyone is admitted, but what a
    dead member held is lost with it.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        name: str = "default",
        member: str | None = None,
        lease: float = DEFAULT_LEASE,
        orphan_ttl: float = DEFAULT_ORPHAN_TTL,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
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
        self.close_timeout = close_timeout
        self.prefix = f"kling:{{{name}}}:"
        #: The keys every script takes first (see ``_scripts``).
        self.member_keys = [
            self.key(name)
            for name in ("members", "fence", "held", "orphan_deadline", "heartbeat", "epoch")
        ]
        #: This incarnation's fencing token and the account state's epoch.
        self.token = ""
        self.epoch = ""
        #: How often this member found itself reaped, or Redis reset.
        self.rejoins = 0
        self.resets = 0
        self._join = redis.register_script(_scripts.JOIN)
        self._renew = redis.register_script(_scripts.RENEW)
        self._joining = asyncio.Lock()
        self._renewer: asyncio.Task[None] | None = None
        self._closed = False
        self._bound: str | None = None
        #: The Kling account a client attached with (a fingerprint), to bind
        #: before anything of this member acts; and why it was refused, if it was.
        self._attached: str | None = None
        self._refusal: ConfigurationError | None = None
        self._parts: list[Any] = []  # limiters, ledgers, fan-ins, adopters: closed with it
        self._chores: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._renewer else "not started"
        return f"<RedisAccount {self.name!r} member={self.member!r} {state}>"

    def key(self, name: str) -> str:
        """The Redis key of ``name`` in this account."""
        return self.prefix + name

    def keys_matching(self, start: str) -> str:
        """A ``SCAN`` pattern for this account's keys that begin with ``start``: the
        prefix is escaped, so an account named ``a*`` or ``eu[1]`` matches its own
        keys only, never another account's."""
        return re.sub(r"([*?\[\]\\])", r"\\\1", self.key(start)) + "*"

    def script(self, source: str) -> AsyncScript:
        """Register one of the account's scripts on its Redis client."""
        return self.redis.register_script(source)

    @property
    def ms(self) -> tuple[int, int]:
        """The lease and the orphans' time to live, in milliseconds."""
        return int(self.lease * 1000), int(self.orphan_ttl * 1000)

    # --- fenced calls -------------------------------------------------------------------

    async def call(self, script: AsyncScript, keys: list[str], args: list[Any]) -> list[Any]:
        """Run one of the account's scripts for this member: its standing
        (member, token, epoch, lease) goes first. A member that was reaped
        meanwhile, or a Redis that lost the account's state, is answered
        ``fenced`` / ``reset``: the member joins again (re-asserting what it
        holds after a reset) and the call is made once more."""
        for attempt in range(2):
            lease, orphan_ttl = self.ms
            standing: list[Any] = [self.member, self.token, self.epoch, lease, orphan_ttl]
            reply = list(await script(keys=[*self.member_keys, *keys], args=[*standing, *args]))
            status = text(reply[0])
            if status == "ok":
                return reply[1:]
            if attempt == 0:
                await self._rejoin(status, self.token)
        raise Fenced(f"member {self.member} could not act: {status}")

    async def _rejoin(self, reason: str, seen_token: str) -> None:
        async with self._joining:
            if self.token != seen_token:
                return  # another call joined again meanwhile
            if reason == "fenced":
                logger.warning(
                    "member %s was taken for dead (its lease ran out while Redis served): "
                    "it joins again; what survivors took over is theirs",
                    self.member,
                )
            await self._join_now()
            if reason == "fenced":
                # Drop what survivors took over: not inline, since this runs
                # inside the call of the part that learned it was fenced.
                for part in self._parts:
                    fenced = getattr(part, "fenced", None)
                    if fenced is not None:
                        self._spawn(fenced())

    async def _join_now(self) -> None:
        lease, orphan_ttl = self.ms
        reply = list(
            await self._join(
                keys=[*self.member_keys, self.key("limiter")],
                args=[
                    self.member,
                    self.token,
                    self.epoch,
                    lease,
                    orphan_ttl,
                    secrets.token_hex(8),
                ],
            )
        )
        if text(reply[0]) == "taken":
            raise ConfigurationError(
                f"member id {self.member!r} is held by a live process of account {self.name!r}: "
                "give each process its own (or leave member unset)"
            )
        first = not self.token
        self.token, self.epoch = text(reply[1]), text(reply[2])
        if not first:
            self.rejoins += 1
        if int(reply[3]):
            self.resets += 1
            logger.error(
                "Redis lost the state of account %r (its epoch key is gone: a restart without "
                "persistence, an eviction?); member %s re-asserts what it holds. Run Redis "
                "with AOF and maxmemory-policy noeviction",
                self.name,
                self.member,
            )
            for part in self._parts:
                reassert = getattr(part, "reassert", None)
                if reassert is not None:
                    reassert()

    # --- binding to a Kling account -----------------------------------------------------

    async def bind(self, client: Client) -> None:
        """Tie the namespace to ``client``'s Kling account (a fingerprint of its
        credentials, never the credentials); a client of another account is
        refused with :class:`~kling_async.ConfigurationError`, so two apps with
        different accounts never adopt each other's work."""
        await self.bind_fingerprint(credentials_fingerprint(client))

    async def bind_fingerprint(self, fingerprint: str) -> None:
        """:meth:`bind`, given the fingerprint (:func:`credentials_fingerprint`)."""
        if self._bound == fingerprint:
            return
        key = self.key("account")
        await self.redis.set(key, fingerprint, nx=True)
        stored = await self.redis.get(key)
        if stored is not None and text(stored) != fingerprint:
            refusal = ConfigurationError(
                f"the Redis namespace {self.name!r} belongs to another Kling account (another "
                "key or base_url): give this one its own RedisAccount(name=...)"
            )
            if fingerprint == self._attached:
                self._refusal = refusal
            raise refusal
        self._bound = fingerprint

    def attached(self, fingerprint: str) -> None:
        """A client of the Kling account ``fingerprint`` attached to this member
        (``Client(ledger=account.ledger())`` tells it): :meth:`check` binds the
        namespace to it before this member's limiter admits or its ledger writes."""
        if self._attached is None:
            self._attached = fingerprint

    async def check(self) -> None:
        """Bind the namespace to the Kling account a client attached with (once),
        or raise :class:`~kling_async.ConfigurationError` if it is another
        account's. ``async with Client(...)`` calls it through the ledger, so a
        client of the wrong account is refused when it opens, before any create."""
        if self._refusal is not None:
            raise self._refusal
        if self._attached is not None and self._bound != self._attached:
            await self.bind_fingerprint(self._attached)

    # --- the parts ----------------------------------------------------------------------

    def limiter(self, capacity: int | None, **options: Any) -> RedisLimiter:
        """The account's shared concurrency limiter (see :class:`RedisLimiter`);
        every process must give the same ``capacity``. One per member: a second
        is refused (share the first between clients)."""
        from ._limiter import RedisLimiter

        if any(isinstance(part, RedisLimiter) for part in self._parts):
            raise ConfigurationError(
                "this member has a limiter already: share it between clients, or open "
                "another RedisAccount (another member) for another limiter"
            )
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
        ``ledger`` and ``limiter`` default to the client's own. The account is
        bound to the client's Kling account first (:meth:`bind`); the first
        pass waits for it."""
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

    def _spawn(self, work: Awaitable[Any]) -> None:
        async def quietly() -> None:
            try:
                await work
            except RedisError as error:  # the writes are fenced: nothing is lost
                logger.warning("member %s could not drop what it lost: %s", self.member, error)

        task = asyncio.get_running_loop().create_task(quietly())
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    def _own(self, part: _PartT) -> _PartT:
        self._parts.append(part)
        return part

    # --- the lease ----------------------------------------------------------------------

    async def start(self) -> None:
        """Join: take the lease, and keep renewing it until :meth:`close`."""
        if self._closed:
            raise RuntimeError("the account is closed")
        if self._renewer is None:
            async with self._joining:
                await self._join_now()
            await self._check_persistence()
            self._renewer = asyncio.get_running_loop().create_task(
                self._renew_forever(), name=f"kling-lease-{self.member}"
            )

    async def _check_persistence(self) -> None:
        """Warn when Redis may forget or evict the account's state (where
        ``CONFIG GET`` is allowed; managed services often refuse it)."""
        try:
            config: dict[Any, Any] = await self.redis.config_get("appendonly")
            config.update(await self.redis.config_get("maxmemory-policy"))
        except ResponseError:
            return
        values = {text(key): text(value) for key, value in config.items()}
        if values.get("appendonly") != "yes":
            logger.warning(
                "Redis runs without AOF (appendonly no): a restart forgets the units "
                "and the ledger of account %r; run it with appendonly yes",
                self.name,
            )
        if values.get("maxmemory-policy", "noeviction") != "noeviction":
            logger.warning(
                "Redis may evict keys (maxmemory-policy %s): the account's state must "
                "not be evicted; use noeviction",
                values["maxmemory-policy"],
            )

    async def renew(self, *, leave: bool = False) -> None:
        """Renew this member's lease now (or, with ``leave``, give it up and
        hand what it holds over to survivors)."""
        await self.call(self._renew, [], [int(leave)])

    async def alive(self, member: str) -> bool:
        """Whether ``member``'s incarnation still holds its fence: it was not
        reaped. Death needs evidence: a lease that looks expired (Redis paused,
        say) counts only once a script, which gives back the time Redis did not
        serve, has reaped it; nothing is taken from a member before that."""
        return bool(await self.redis.hexists(self.key("fence"), member))  # type: ignore[misc]

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                await self.renew()
            except RedisError as error:  # the lease may yet be renewed in time
                logger.warning("cannot renew the lease of %s: %s", self.member, error)

    async def close(self) -> None:
        """Stop the parts (adopters, fan-ins, limiters, ledgers, budgets, in that order),
        stop renewing and give up the lease, so survivors adopt at once what
        this process leaves unfinished (its tasks' units stay counted until
        then). Each step is bounded by ``close_timeout`` when Redis cannot be
        reached. Idempotent. The Redis client stays the caller's."""
        if self._closed:
            return
        self._closed = True
        for chore in tuple(self._chores):
            chore.cancel()
        order = ("Adopter", "CallbackFanIn", "RedisLimiter", "RedisLedger", "RedisBudget")
        for kind in order:
            for part in self._parts:
                if type(part).__name__ == kind:
                    await part.close()
        renewer, self._renewer = self._renewer, None
        if renewer is not None:
            await stop_tasks(renewer)
            try:
                await asyncio.wait_for(self.renew(leave=True), self.close_timeout)
            except (RedisError, asyncio.TimeoutError) as error:  # it runs out by itself
                logger.warning("cannot give up the lease of %s: %s", self.member, error)

    async def purge(self) -> int:
        """Delete every key of this account (``kling:{name}:*``) from Redis: the
        quota state, the ledger, the members. For an account no process uses
        any more; returns how many keys were deleted."""
        deleted = 0
        async for key in self.redis.scan_iter(match=self.keys_matching("")):
            deleted += int(await self.redis.delete(key))
        return deleted

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
