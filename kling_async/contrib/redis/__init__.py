"""Scale-out through Redis: one account quota, one ledger and one callback
endpoint shared by processes and hosts.

Needs the ``redis`` extra (``pip install '.[redis]'`` in the checkout) and a Redis
server (6.2 or later)::

    import redis.asyncio
    import kling_async
    from kling_async.contrib.redis import RedisAccount

    redis_client = redis.asyncio.Redis.from_url("redis://127.0.0.1:6379/0")
    async with RedisAccount(redis_client, name="main") as account:
        limiter = account.limiter(capacity=50)
        async with kling_async.Client(max_concurrency=limiter, ledger=account.ledger()) as client:
            account.adopt(client)
            handle = await client.images.generate(prompt="a red fox")

- :class:`RedisAccount`: the processes sharing one account, each under a
  lease it renews;
- :class:`RedisLimiter`: the n-weighted, adaptive concurrency limiter, for
  the whole account (Lua scripts, atomic);
- :class:`RedisLedger`: the ledger every process shares; ``client.resume()``
  in any process settles what dead ones left;
- :class:`Adopter`: a survivor finishes the tasks of dead processes;
- :class:`CallbackFanIn`: a callback any replica receives reaches the one
  whose handle awaits it;
- :class:`RedisBudget`: a budget in resource-pack units every process shares
  (``Client(budget=...)``), each reservation one atomic script;
- :func:`submit_once`: a request created at most once for a key, across
  processes and reruns (the key reserved atomically; a key reused for another
  request raises :class:`KeyReusedError`).

Ownership is fenced (a token per member incarnation, checked by every script),
units are counted per task, a gap in which Redis did not serve does not count
against leases, and a Redis that lost the account's state is noticed (an epoch
key). Redis must run with AOF (``appendonly yes``, ``appendfsync everysec`` or
``always``) and ``maxmemory-policy noeviction``.
"""

from ._account import (
    DEFAULT_CLOSE_TIMEOUT,
    DEFAULT_LEASE,
    DEFAULT_ORPHAN_TTL,
    RedisAccount,
    credentials_fingerprint,
)
from ._adopter import Adopter, keyed_external_task_id, submit_once
from ._budget import RedisBudget
from ._fanin import CallbackFanIn
from ._ledger import KeyReusedError, RedisLedger, TaskTakenOverError, request_digest
from ._limiter import RedisLimiter, TaskUnits
from ._steps import Step, adoption_step, keyed_step

__all__ = [
    "DEFAULT_CLOSE_TIMEOUT",
    "DEFAULT_LEASE",
    "DEFAULT_ORPHAN_TTL",
    "Adopter",
    "CallbackFanIn",
    "KeyReusedError",
    "RedisAccount",
    "RedisBudget",
    "RedisLedger",
    "RedisLimiter",
    "Step",
    "TaskTakenOverError",
    "TaskUnits",
    "adoption_step",
    "credentials_fingerprint",
    "keyed_external_task_id",
    "keyed_step",
    "request_digest",
    "submit_once",
]
