"""The shared limiter, ledger, adoption and callback fan-in, in one process:
several members (as several processes would be) on one real redis-server,
against FakeKlingServer over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from kling_async import (
    CallbackReceiver,
    Client,
    ConfigurationError,
    EntryState,
    ImageGenerationRequest,
    LedgerEntry,
    PollPolicy,
)
from kling_async._models import Endpoint
from kling_async.contrib.redis import (
    CallbackFanIn,
    RedisAccount,
    RedisLedger,
    RedisLimiter,
    submit_once,
)
from kling_async.contrib.redis._account import stop_tasks
from kling_async.testing import FakeKlingServer
from tests.helpers import API_KEY, FAST_POLL, eventually, make_client

SLOW_POLL = PollPolicy(initial_delay=5.0, max_delay=10.0, timeout=30.0, callback_delay=30.0)


@contextlib.asynccontextmanager
async def members(
    redis: Redis, name: str, count: int, **options: Any
) -> AsyncIterator[list[RedisAccount]]:
    """``count`` members of one account, as ``count`` processes would be."""
    async with contextlib.AsyncExitStack() as stack:
        accounts = [
            await stack.enter_async_context(RedisAccount(redis, name=name, **options))
            for _ in range(count)
        ]
        yield accounts


async def stall(account: RedisAccount) -> None:
    """The member stops renewing its lease (a blocked loop, a GC pause, a killed
    process), as if dead; its renewer has ended when this returns."""
    assert account._renewer is not None
    await stop_tasks(account._renewer)


async def until_reaped(survivor: RedisAccount, dead: RedisAccount) -> None:
    """Wait until ``survivor`` reaps the stalled member ``dead``. A lease runs
    out only while Redis serves the account (a gap in its scripts is given
    back), so on a loaded machine it may take longer than the lease."""

    async def reaped() -> bool:
        await survivor.renew()
        return not await survivor.alive(dead.member)

    await eventually(reaped, timeout=10.0)


async def held(redis: Redis, account: RedisAccount) -> dict[str, tuple[str, int, bool]]:
    """What Redis counts, per task: its holder ('' when handed over), units, running."""
    out = {}
    for task, value in (await redis.hgetall(account.key("held"))).items():  # type: ignore[misc]  # redis-py: reply or awaitable
        holder, units, running = value.decode().rsplit("|", 2)
        out[task.decode()] = (holder, int(units), running == "1")
    return out


async def total(redis: Redis, account: RedisAccount) -> int:
    """Units Redis counts for the account, every holder's and the orphans'."""
    return sum(units for _holder, units, _running in (await held(redis, account)).values())


def body(external_task_id: str) -> dict[str, Any]:
    return {"prompt": f"prompt of {external_task_id}", "external_task_id": external_task_id}


# --- the shared limiter ------------------------------------------------------------------


async def test_members_share_one_quota_and_give_every_unit_back(
    redis: Redis, account_name: str
) -> None:
    async with (
        FakeKlingServer(api_key=API_KEY, concurrency_limit=8, task_duration=0.15) as server,
        members(redis, account_name, 2) as (a, b),
    ):
        limiters = [a.limiter(8), b.limiter(8)]
        clients = [make_client(server, max_concurrency=limiter) for limiter in limiters]
        async with clients[0], clients[1]:

            async def run(number: int) -> None:
                handle = await clients[number % 2].images.generate(
                    prompt=f"p{number}", n=1 + number % 4
                )
                await handle

            await asyncio.gather(*(run(number) for number in range(40)))
        for limiter in limiters:
            await limiter.flush()
        stats = server.stats()
        assert stats["creates_accepted"] == 40
        assert stats["tasks"] == 40
        assert stats["creates_rejected_concurrency"] == 0
        assert server.peak_units <= 8
        assert server.peak_units >= 6  # the two members together did fill the quota
        assert await total(redis, a) == 0
        assert "units here" in repr(limiters[0])


async def test_an_unknown_quota_is_learned_from_1303_by_every_member(
    redis: Redis, account_name: str
) -> None:
    async with (
        FakeKlingServer(api_key=API_KEY, concurrency_limit=5, task_duration=0.3) as server,
        members(redis, account_name, 2) as (a, b),
    ):
        limiters = [a.limiter(None, min_cooldown=0.1), b.limiter(None, min_cooldown=0.1)]
        clients = [make_client(server, max_concurrency=limiter) for limiter in limiters]
        async with clients[0], clients[1]:

            async def run(number: int) -> None:
                await (await clients[number % 2].images.generate(prompt=f"p{number}"))

            await asyncio.gather(*(run(number) for number in range(30)))
        stats = server.stats()
        assert stats["tasks"] == 30  # a 1303 is waited out, never created twice
        assert 1 <= stats["creates_rejected_concurrency"] <= 8
        learned = int(await redis.hget(a.key("limiter"), "limit"))  # type: ignore[misc]  # redis-py: reply or awaitable
        assert learned <= 6
        rejected = int(await redis.hget(a.key("limiter"), "rejected"))  # type: ignore[misc]  # redis-py: reply or awaitable
        assert rejected == stats["creates_rejected_concurrency"]  # every member's, counted once


async def test_a_large_task_is_not_starved_by_small_ones_of_another_member(
    redis: Redis, account_name: str
) -> None:
    async with (
        FakeKlingServer(api_key=API_KEY, concurrency_limit=9, task_duration=0.2) as server,
        members(redis, account_name, 2) as (a, b),
    ):
        small = make_client(server, max_concurrency=a.limiter(9, fairness_window=0.3))
        large = make_client(server, max_concurrency=b.limiter(9, fairness_window=0.3))
        async with small, large:
            stop = asyncio.Event()

            async def flood() -> None:
                while not stop.is_set():
                    await (await small.images.generate(prompt="small", n=1))

            flooders = [asyncio.create_task(flood()) for _ in range(12)]
            await asyncio.sleep(0.4)
            started = time.monotonic()
            try:
                handle = await asyncio.wait_for(
                    large.images.generate(prompt="large", n=9), timeout=4.0
                )
                waited = time.monotonic() - started
            finally:
                stop.set()
                await asyncio.gather(*flooders)
            await handle
        assert waited < 4.0
        assert server.peak_units <= 9


async def test_a_dead_members_units_count_until_adopted_or_orphan_ttl(
    redis: Redis, account_name: str
) -> None:
    async with members(redis, account_name, 3, lease=0.3, orphan_ttl=2.0) as (dead, other, third):
        doomed = dead.limiter(4)
        await doomed.acquire(3, task="t-dead")
        await doomed.close()
        await stall(dead)  # the process stops renewing: it is dead

        survivor = other.limiter(4)
        waiting = asyncio.create_task(survivor.acquire(2, task="t-new"))
        await asyncio.sleep(0.8)  # lease over: its units are orphans, still counted
        assert not waiting.done()
        assert await held(redis, other) == {"t-dead": (dead.member, 3, False)}
        await asyncio.wait_for(waiting, 6.0)  # the orphans expired
        assert await held(redis, other) == {"t-new": (other.member, 2, False)}

        # Adoption moves a task's units: counted once; the rest is released.
        survivor.created(2, task="t-new")
        await survivor.acquire(1, task="t-extra")
        taker = third.limiter(10)
        await stall(other)
        await until_reaped(third, other)
        await taker.acquire(1, task="t-taker")
        assert await total(redis, third) == 4
        taker.adopt(2, task="t-new")
        await taker.flush()
        assert (await held(redis, third))["t-new"] == (third.member, 2, True)
        assert await total(redis, third) == 4
        taker.release_orphans(other.member)
        await taker.flush()
        assert await held(redis, third) == {
            "t-new": (third.member, 2, True),
            "t-taker": (third.member, 1, False),
        }


async def test_a_release_counts_only_for_the_tasks_holder_and_once(
    redis: Redis, account_name: str
) -> None:
    # Per-task units: a member taken for dead whose task was adopted releases
    # nothing it no longer holds, and a release repeated is a no-op.
    async with members(redis, account_name, 2) as (first, second):
        mine, theirs = first.limiter(8), second.limiter(8)
        await mine.acquire(4, task="t1")
        mine.created(4, task="t1")
        theirs.adopt(4, task="t1")  # taken over (as an adopter does)
        await theirs.flush()
        mine.release(4, task="t1")
        mine.release(4, task="t1")
        await mine.flush()
        assert await held(redis, first) == {"t1": (second.member, 4, True)}
        theirs.release(4, task="t1")
        await theirs.flush()
        assert await total(redis, first) == 0


async def test_a_call_retried_after_a_lost_answer_is_applied_once(
    redis: Redis, account_name: str
) -> None:
    async with RedisAccount(redis, name=account_name) as account:
        limiter = account.limiter(5)
        first = await limiter._call(1, [["1303", "", 1000]], [])
        again = await limiter._call(1, [["1303", "", 1000]], [])
        assert first == again
        assert int(await redis.hget(account.key("limiter"), "rejected")) == 1  # type: ignore[misc]  # redis-py: reply or awaitable
        await limiter.close()


# --- the shared ledger ------------------------------------------------------------------------


def entry(external_task_id: str, state: EntryState, **fields: Any) -> LedgerEntry:
    return LedgerEntry(
        external_task_id=external_task_id,
        endpoint=Endpoint.GENERATIONS,
        body=body(external_task_id),
        state=state,
        **fields,
    )


async def test_the_ledger_keeps_entries_and_indexes(redis: Redis, account_name: str) -> None:
    async with RedisAccount(redis, name=account_name) as account:
        ledger = account.ledger(retention=60)
        intent = entry("a", EntryState.INTENDED, key="batch#0#x")
        ledger.record(intent)
        ledger.record(intent.moved(EntryState.CREATED, task_id="t-a"))  # the same try
        ledger.record(entry("b", EntryState.UNCERTAIN, error="no answer"))
        ledger.record(entry("c", EntryState.TERMINAL, task_id="t-c", status="succeed"))
        await ledger.flush()
        a = await ledger.get("a")
        assert a is not None
        assert a.state is EntryState.CREATED
        assert a.body["prompt"] == "prompt of a"  # written once, with the intent
        assert a.owner == account.member
        by_key = await ledger.by_key("batch#0#x")
        assert by_key is not None
        assert by_key.task_id == "t-a"
        assert {e.external_task_id for e in await ledger.all_unsettled()} == {"a", "b"}
        assert {e.external_task_id for e in await ledger.owned_by(account.member)} == {"a", "b"}
        assert [e.external_task_id for e in await ledger.unsettled()] == ["b"]  # a is in flight
        assert 0 < await redis.ttl(account.key("e:c")) <= 60  # settled: kept for a while
        assert await redis.ttl(account.key("e:a")) == -1
        assert await ledger.get("missing") is None
        assert await ledger.by_key("missing") is None
        await ledger.close()
        await ledger.flush()  # everything recorded was written
        ledger.record(entry("d", EntryState.INTENDED))  # closed: dropped, logged
        assert await ledger.get("d") is None
        # A create running past the close must not be told its intent is written.
        with pytest.raises(RuntimeError, match="1 entries recorded were not written"):
            await ledger.flush()


async def test_resume_in_another_process_settles_what_a_gone_one_left(
    redis: Redis, account_name: str
) -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=None) as server:
        async with RedisAccount(redis, name=account_name) as gone:
            async with make_client(server, ledger=gone.ledger()) as first:
                handles = [await first.images.generate(prompt=f"p{i}") for i in range(3)]
                first.ledger.record(entry("never-sent", EntryState.INTENDED))
                await first.ledger.flush()
        # The first process is gone (its lease given up); its tasks still run on Kling.
        async with (
            RedisAccount(redis, name=account_name) as survivor,
            make_client(server, ledger=survivor.ledger()) as second,
        ):
            resumed = await second.resume()
            assert sorted(h.task_id for h in resumed) == sorted(
                [h.task_id for h in handles] + [server.task("never-sent").task_id]
            )
            for handle in resumed:
                server.finish(handle.task_id)
            await asyncio.gather(*(asyncio.wait_for(h.wait(), 5) for h in resumed))
            ledger = second.ledger
            assert isinstance(ledger, RedisLedger)
            await ledger.flush()
            for handle in resumed:
                recorded = await ledger.get(str(handle.external_task_id))
                assert recorded is not None
                assert recorded.state is EntryState.TERMINAL
            assert await second.resume() == []  # nothing left, nothing sent again
        assert len(server.tasks) == 4  # each created once


async def test_a_survivor_adopts_a_dead_members_tasks_and_their_units(
    redis: Redis, account_name: str
) -> None:
    async with (
        FakeKlingServer(api_key=API_KEY, task_duration=None) as server,
        members(redis, account_name, 2, lease=0.4) as (dead, survivor),
    ):
        dying_limiter = dead.limiter(10)
        dying = make_client(server, max_concurrency=dying_limiter, ledger=dead.ledger())
        handles = [await dying.images.generate(prompt=f"p{i}", n=2) for i in range(2)]
        await dying.ledger.flush()
        await dying_limiter.flush()
        # Killed: no more renewals, no more Redis calls (its client is left as is).
        await stall(dead)
        await dying_limiter.close()

        limiter = survivor.limiter(10)
        adopted: list[list[LedgerEntry]] = []

        async def note(entries: list[LedgerEntry]) -> None:
            adopted.append(entries)

        async with make_client(server, max_concurrency=limiter, ledger=survivor.ledger()) as client:
            adopter = survivor.adopt(client, interval=0.1, on_adopted=note)
            await eventually(lambda: adopter.reattached == 2)
            await limiter.flush()
            assert await total(redis, survivor) == 4  # counted once
            assert {holder for holder, _, _ in (await held(redis, survivor)).values()} == {
                survivor.member
            }
            assert limiter.in_use == 4
            for handle in handles:
                server.finish(handle.task_id)
            await eventually(lambda: limiter.in_use == 0)
            await limiter.flush()
            assert await total(redis, survivor) == 0
            assert len(adopted) == 1
            assert {e.external_task_id for e in adopted[0]} == {h.external_task_id for h in handles}
            ledger = client.ledger
            assert isinstance(ledger, RedisLedger)
            await eventually(lambda: _all_terminal(ledger, handles))
            assert "reattached=2" in repr(adopter)
        await dying.close()
        assert len(server.tasks) == 2


async def _all_terminal(ledger: RedisLedger, handles: list[Any]) -> bool:
    entries = [await ledger.get(str(h.external_task_id)) for h in handles]
    return all(e is not None and e.state is EntryState.TERMINAL for e in entries)


async def test_submit_once_creates_one_task_per_key_across_members(
    redis: Redis, account_name: str
) -> None:
    request = ImageGenerationRequest(prompt="once")
    async with (
        FakeKlingServer(api_key=API_KEY, task_duration=0.3) as server,
        members(redis, account_name, 2) as (a, b),
        make_client(server, ledger=a.ledger()) as first,
        make_client(server, ledger=b.ledger()) as second,
    ):
        created = await submit_once(first, request, key="job-1")
        followed = await submit_once(second, request, key="job-1")  # held by a live member
        assert followed.task_id == created.task_id
        await asyncio.wait_for(followed.wait(), 5)
        await asyncio.wait_for(created.wait(), 5)
        await first.ledger.flush()
        again = await submit_once(second, request, key="job-1")  # ended: read back
        assert again.task is not None
        assert again.task.task_id == created.task_id
        assert len(server.requests_for("create")) == 1
        with pytest.raises(ConfigurationError, match=r"ledger=account\.ledger"):
            async with make_client(server) as plain:
                await submit_once(plain, request, key="job-2")


# --- callback fan-in ---------------------------------------------------------------------------


async def test_a_callback_received_by_one_replica_resolves_a_handle_in_another(
    redis: Redis, account_name: str
) -> None:
    secret = "a-shared-callback-secret-0123456789"
    public = CallbackReceiver(secret=secret)
    async with (
        FakeKlingServer(api_key=API_KEY, task_duration=0.2) as server,
        public.serve() as url,  # the replica the load balancer sends every callback to
        members(redis, account_name, 2) as (front, back),
    ):
        holder = CallbackReceiver(url, secret=secret)  # same public URL, same secret
        front_in = front.fan_in(public)
        back_in = back.fan_in(holder)
        await front_in.ready()
        await back_in.ready()
        messages: list[bytes] = []
        spy = redis.pubsub()
        await spy.subscribe(front.key("callbacks"))
        async with (
            make_client(server, callbacks=public),
            make_client(server, callbacks=holder, polling=SLOW_POLL) as client,
        ):
            started = time.monotonic()
            handle = await client.images.generate(prompt="fan in")
            task = await asyncio.wait_for(handle.wait(), 4.0)  # polling would take 5 s
            assert time.monotonic() - started < 3.0
            assert task.status.value == "succeed"
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            message = await spy.get_message(ignore_subscribe_messages=True, timeout=0.1)
            if message is not None:
                messages.append(message["data"])
        await spy.aclose()  # type: ignore[no-untyped-call]  # unannotated in redis-py
        assert front_in.forwarded >= 1
        assert back_in.delivered >= 1
        assert isinstance(front_in, CallbackFanIn)
        token = public.token_for(str(handle.external_task_id))
        assert messages
        for raw in messages:
            assert token.encode() not in raw
            assert secret.encode() not in raw
            assert json.loads(raw)["id"] == handle.external_task_id
        await assert_no_secret_in_redis(redis, front, [API_KEY, secret, token])


async def assert_no_secret_in_redis(
    redis: Redis, account: RedisAccount, secrets: list[str]
) -> None:
    """Every value the account keeps in Redis is free of every secret."""
    dump: list[bytes] = []
    async for key in redis.scan_iter(
        match=account.prefix.replace("{", "\\{").replace("}", "\\}") + "*"
    ):
        kind = (await redis.type(key)).decode()
        if kind == "string":
            dump.append(await redis.get(key))
        elif kind == "hash":
            dump.extend(v for pair in (await redis.hgetall(key)).items() for v in pair)  # type: ignore[misc]  # redis-py: reply or awaitable
        elif kind == "set":
            dump.extend(await redis.smembers(key))  # type: ignore[misc]  # redis-py: reply or awaitable
        elif kind == "zset":
            dump.extend(await redis.zrange(key, 0, -1))
        dump.append(key)
    assert dump
    blob = b"\n".join(dump)
    for secret in secrets:
        assert secret.encode() not in blob


async def test_nothing_secret_reaches_redis_from_a_ledgered_callback_client(
    redis: Redis, account_name: str
) -> None:
    secret = "another-callback-secret-0123456789"
    receiver = CallbackReceiver(secret=secret)
    async with (
        FakeKlingServer(api_key=API_KEY, task_duration=0.1) as server,
        receiver.serve(),
        RedisAccount(redis, name=account_name) as account,
    ):
        limiter: RedisLimiter = account.limiter(4)
        async with make_client(
            server, callbacks=receiver, ledger=account.ledger(), max_concurrency=limiter
        ) as client:
            handle = await client.images.generate(prompt="secret-free")
            await asyncio.wait_for(handle.wait(), 5)
            await client.ledger.flush()
        token = receiver.token_for(str(handle.external_task_id))
        await assert_no_secret_in_redis(redis, account, [API_KEY, secret, token])
        recorded = await account.ledger().get(str(handle.external_task_id))
        assert recorded is not None
        assert "callback_url" not in recorded.body
        assert recorded.receiver_callback


def test_client_accepts_a_shared_limiter_without_io(redis_server: object) -> None:
    account = RedisAccount(Redis(), name="no-io")
    limiter = account.limiter(3)
    client = Client(API_KEY, max_concurrency=limiter)
    assert client.limiter is limiter
    assert "not started" in repr(account)
    with pytest.raises(ConfigurationError, match="has a limiter already"):
        account.limiter(3)
    with pytest.raises(ValueError, match="at least 1"):
        RedisAccount(Redis(), name="no-io").limiter(0)
    with pytest.raises(ValueError, match="member"):
        RedisAccount(Redis(), member="a|b")
    assert FAST_POLL is not None


async def test_purge_deletes_its_own_account_only_whatever_its_name(
    redis: Redis, account_name: str
) -> None:
    # "a*" or "eu[1]" as a SCAN pattern would match other accounts' keys too.
    neighbour, greedy = account_name + "-x", account_name + "*"
    async with RedisAccount(redis, name=neighbour):
        pass
    async with RedisAccount(redis, name=greedy) as account:
        pass
    neighbours_keys = await redis.keys(f"kling:{{{neighbour}}}:*")
    assert neighbours_keys
    assert await account.purge() > 0
    assert await redis.keys(f"kling:{{{neighbour}}}:*") == neighbours_keys
