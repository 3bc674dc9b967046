"""Fenced leases, per-task units, atomic keys, resets and bounded closes of the
shared account (issue 25; the review scripts s01..s15), in one process: members
as processes would be, on a real redis-server, against FakeKlingServer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from kling_async import (
    ConfigurationError,
    EntryState,
    ImageGenerationRequest,
    KlingError,
    LedgerEntry,
)
from kling_async._models import Endpoint
from kling_async.contrib.redis import (
    KeyReusedError,
    RedisAccount,
    RedisLedger,
    TaskTakenOverError,
    keyed_external_task_id,
    submit_once,
)
from kling_async.testing import FakeKlingServer, RedisServer
from tests.helpers import API_KEY, eventually, make_client
from tests.scaleout.test_redis_shared import body, entry, held, members, stall, total, until_reaped


@pytest.fixture
async def own_redis() -> AsyncIterator[RedisServer]:
    """A redis-server of the test's own, to stop, pause or restart."""
    with RedisServer() as server:
        yield server


# --- close hands over, never frees (s01) ----------------------------------------------------


async def test_a_closing_client_hands_its_running_tasks_units_over(
    redis: Redis, account_name: str
) -> None:
    async with (
        FakeKlingServer(api_key=API_KEY, task_duration=None) as server,
        members(redis, account_name, 2, lease=0.4) as (leaving, staying),
    ):
        async with make_client(
            server, max_concurrency=leaving.limiter(8), ledger=leaving.ledger()
        ) as client:
            handles = [await client.images.generate(prompt=f"a{i}", n=4) for i in range(2)]
        await leaving.close()  # a deploy: the client, then the account
        limiter = staying.limiter(8)
        async with make_client(server, max_concurrency=limiter, ledger=staying.ledger()) as other:
            waiting = asyncio.ensure_future(other.images.generate(prompt="b", n=4))
            adopter = staying.adopt(other, interval=0.05)
            await eventually(lambda: adopter.reattached == 2)
            await asyncio.sleep(0.3)
            assert not waiting.done()  # Kling still runs 8 units of the quota of 8
            assert await total(redis, staying) == 8
            for handle in handles:
                server.finish(handle.task_id)
            await asyncio.wait_for(waiting, 5)
        assert server.peak_units == 8


# --- an adopter keeps an in-flight create's units (s02) -------------------------------------


async def test_an_adopter_keeps_the_units_of_a_create_that_may_have_landed(
    redis: Redis, account_name: str
) -> None:
    async with (
        FakeKlingServer(api_key=API_KEY, task_duration=None) as server,
        members(redis, account_name, 2, lease=0.3) as (dead, survivor),
    ):
        # The dead member recorded its intent and holds the units: its create is on the wire.
        dead_limiter, dead_ledger = dead.limiter(8), dead.ledger()
        intent = LedgerEntry(
            external_task_id="in-flight",
            endpoint=Endpoint.GENERATIONS,
            body={"prompt": "d", "n": 4, "external_task_id": "in-flight"},
            units=4,
            state=EntryState.SENT,
        )
        dead_ledger.record(intent)
        await dead_ledger.flush()
        await dead_limiter.acquire(4, task="in-flight")
        await stall(dead)
        await dead_limiter.close()
        await until_reaped(survivor, dead)

        limiter = survivor.limiter(8)
        server.inject("delay", route="get", delay=0.5, times=1)  # the look-up takes a while
        async with make_client(server, max_concurrency=limiter, ledger=survivor.ledger()) as client:
            adopter = survivor.adopt(client, interval=0.05)
            await eventually(lambda: adopter.settled == 1)
            await limiter.flush()
            # While it is looked up, its units stay counted, moved to the survivor.
            assert await held(redis, survivor) == {"in-flight": (survivor.member, 4, False)}
            await eventually(lambda: len(server.tasks) == 1)

            async def running() -> bool:
                # Created on Kling; the survivor marks it running once its answer is in.
                await limiter.flush()
                return await held(redis, survivor) == {"in-flight": (survivor.member, 4, True)}

            await eventually(running)


async def test_an_adopted_create_that_never_had_units_waits_for_room(
    redis: Redis, account_name: str
) -> None:
    # The dead member recorded its intent but was still queued for units (the
    # quota was full): its create was never sent. The adopter held units for it
    # all the same, so the create it sent again was admitted past the quota and
    # refused with 1303 (nemesis seed 3032: 4 such creates on a full quota).
    async with (
        FakeKlingServer(api_key=API_KEY, task_duration=None, concurrency_limit=8) as server,
        members(redis, account_name, 2, lease=0.3) as (dead, survivor),
    ):
        limiter = survivor.limiter(8)
        async with make_client(server, max_concurrency=limiter, ledger=survivor.ledger()) as client:
            running = [await client.images.generate(prompt=f"r{i}", n=4) for i in range(2)]
            dead_ledger = dead.ledger()
            dead_ledger.record(
                LedgerEntry(
                    external_task_id="queued",
                    endpoint=Endpoint.GENERATIONS,
                    body={"prompt": "q", "n": 4, "external_task_id": "queued"},
                    units=4,
                    state=EntryState.INTENDED,
                )
            )
            await dead_ledger.flush()
            await stall(dead)
            await until_reaped(survivor, dead)
            adopter = survivor.adopt(client, interval=0.05)
            await eventually(lambda: adopter.settled == 1)
            await asyncio.sleep(0.3)
            await limiter.flush()
            codes = [request.code for request in server.requests_for("create")]
            assert 1303 not in codes  # it waits for room instead of being refused
            assert await total(redis, survivor) == 8
            server.finish(running[0].task_id)
            await eventually(lambda: len(server.tasks) == 3)
        assert server.peak_units == 8
        assert 1303 not in [request.code for request in server.requests_for("create")]


# --- a stalled member is fenced (s03) --------------------------------------------------------


async def test_a_member_taken_for_dead_releases_nothing_it_no_longer_holds(
    redis: Redis, account_name: str
) -> None:
    async with (
        FakeKlingServer(api_key=API_KEY, task_duration=None) as server,
        members(redis, account_name, 2, lease=0.3) as (stalled, survivor),
    ):
        stalled_limiter = stalled.limiter(8)
        async with make_client(
            server, max_concurrency=stalled_limiter, ledger=stalled.ledger()
        ) as stalled_client:
            t1 = await stalled_client.images.generate(prompt="t1", n=4)
            await stalled_client.ledger.flush()
            await stall(stalled)
            survivor_limiter = survivor.limiter(8)
            async with make_client(
                server, max_concurrency=survivor_limiter, ledger=survivor.ledger()
            ) as client:
                adopter = survivor.adopt(client, interval=0.05)
                await eventually(lambda: adopter.reattached == 1)
                # Alive again: its next call learns it was reaped; it joins anew.
                await stalled.renew()
                assert stalled.rejoins == 1
                server.finish(t1.task_id)
                await eventually(lambda: stalled_limiter.in_use == 0)
                await stalled_limiter.flush()
                await eventually(lambda: survivor_limiter.in_use == 0)
                # A release is written to Redis after in_use drops: wait for it.
                await survivor_limiter.flush()
                assert await total(redis, survivor) == 0
                # Released once: two creates of 4 fill the quota of 8, no more.
                t2 = await stalled_client.images.generate(prompt="t2", n=4)
                t3 = await client.images.generate(prompt="t3", n=4)
                late = asyncio.ensure_future(client.images.generate(prompt="t4", n=4))
                await asyncio.sleep(0.3)
                assert not late.done()
                assert server.peak_units <= 8
                server.finish(t2.task_id)
                server.finish(t3.task_id)
                await asyncio.wait_for(late, 5)


# --- atomic keys (s04, s05, s09) ---------------------------------------------------------------


async def test_submit_once_racing_members_create_one_task_per_key(
    redis: Redis, account_name: str
) -> None:
    async with (
        FakeKlingServer(api_key=API_KEY, task_duration=0.2) as server,
        members(redis, account_name, 2) as (first, second),
    ):
        clients = [
            make_client(server, max_concurrency=a.limiter(50), ledger=a.ledger())
            for a in (first, second)
        ]
        for i in range(5):
            request = ImageGenerationRequest(prompt=f"race {i}")
            handles = await asyncio.gather(
                *(submit_once(c, request, key=f"order-{i}") for c in clients)
            )
            assert handles[0].task_id == handles[1].task_id
            assert handles[0].external_task_id == keyed_external_task_id(first, f"order-{i}")
        assert len(server.tasks) == 5
        for client in clients:
            await client.close()


async def test_a_key_reused_for_another_request_raises(redis: Redis, account_name: str) -> None:
    async with (
        FakeKlingServer(api_key=API_KEY, task_duration=0.05) as server,
        RedisAccount(redis, name=account_name) as account,
    ):
        async with make_client(
            server, max_concurrency=account.limiter(8), ledger=account.ledger()
        ) as client:
            first = await submit_once(client, ImageGenerationRequest(prompt="a fox"), key="k")
            again = await submit_once(client, ImageGenerationRequest(prompt="a fox"), key="k")
            assert again.task_id == first.task_id
            with pytest.raises(KeyReusedError, match="another request"):
                await submit_once(client, ImageGenerationRequest(prompt="a whale", n=3), key="k")
        assert len(server.tasks) == 1


# --- a Redis reset (s06) and a Redis pause (s07) -----------------------------------------------


async def test_a_redis_reset_is_noticed_and_members_reassert_what_they_hold(
    own_redis: RedisServer,
) -> None:
    redis = Redis.from_url(own_redis.url)
    async with (
        FakeKlingServer(api_key=API_KEY, task_duration=None) as server,
        members(redis, "reset", 2, lease=0.6) as (holder, waiter),
    ):
        holder_limiter = holder.limiter(8)
        async with make_client(
            server, max_concurrency=holder_limiter, ledger=holder.ledger()
        ) as client:
            handles = [await client.images.generate(prompt=f"h{i}", n=4) for i in range(2)]
            await client.ledger.flush()
            waiter_limiter = waiter.limiter(8)
            own_redis.restart()  # no persistence: everything is gone
            waiting = asyncio.ensure_future(waiter_limiter.acquire(4, task="w"))
            await eventually(lambda: holder.resets + waiter.resets >= 1)
            await eventually(lambda: total(redis, holder), timeout=5)
            await asyncio.sleep(1.0)  # beyond the quiet period: the re-asserted units count
            assert not waiting.done()
            assert await total(redis, holder) == 8
            entries = await RedisLedger(holder).all_unsettled()
            assert {e.external_task_id for e in entries} == {h.external_task_id for h in handles}
            waiting.cancel()
    await redis.aclose()


async def test_a_redis_pause_longer_than_the_lease_reaps_nobody(own_redis: RedisServer) -> None:
    redis = Redis.from_url(own_redis.url)
    async with members(redis, "pause", 3, lease=0.4) as accounts:
        own_redis.pause()
        await asyncio.sleep(1.0)
        own_redis.resume()
        await asyncio.sleep(0.3)
        for account in accounts:
            assert all([await account.alive(a.member) for a in accounts])
            assert account.rejoins == 0
    await redis.aclose()


# --- the namespace belongs to one Kling account (s10) -------------------------------------------


async def test_a_namespace_refuses_a_second_kling_account(redis: Redis, account_name: str) -> None:
    async with (
        FakeKlingServer(api_key=API_KEY) as server,
        members(redis, account_name, 2) as (mine, theirs),
    ):
        async with make_client(server, ledger=mine.ledger()) as client:
            await mine.bind(client)
            other = make_client(
                server, api_key="sk-test-another-account-42", ledger=theirs.ledger()
            )
            with pytest.raises(ConfigurationError, match="another Kling account"):
                await theirs.bind(other)
            other.ledger.record(_intent("x"))
            with pytest.raises(ConfigurationError, match="another Kling account"):
                await other.ledger.flush()
            await other.close()
            fingerprint = (await redis.get(mine.key("account"))).decode()
            assert API_KEY not in fingerprint


async def test_a_client_of_another_account_is_refused_when_it_opens(
    redis: Redis, account_name: str
) -> None:
    # Refused at its first ledger write only, it had already queued for and
    # held units of the other account's quota in the namespace.
    async with (
        FakeKlingServer(api_key=API_KEY) as server,
        members(redis, account_name, 2) as (mine, theirs),
    ):
        async with make_client(server, ledger=mine.ledger()):
            pass  # the namespace is bound to API_KEY's account as the client opens
        assert await redis.get(mine.key("account")) is not None
        other = make_client(
            server,
            api_key="sk-test-another-account-42",
            max_concurrency=theirs.limiter(8),
            ledger=theirs.ledger(),
        )
        with pytest.raises(ConfigurationError, match="another Kling account"):
            await other.__aenter__()
        with pytest.raises(KlingError, match="nothing was sent") as raised:
            await other.images.generate(prompt="on the wrong account")
        assert isinstance(raised.value.__cause__, ConfigurationError)
        await other.close()
        assert await held(redis, theirs) == {}
        assert server.requests_for("create") == []


def _intent(external_task_id: str) -> LedgerEntry:
    return LedgerEntry(
        external_task_id=external_task_id,
        endpoint=Endpoint.GENERATIONS,
        body={"prompt": "p"},
        state=EntryState.INTENDED,
    )


# --- bounded and leak-free (s11, s12, s14) --------------------------------------------------------


async def test_members_that_leave_remove_their_state(redis: Redis, account_name: str) -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.05) as server:
        for i in range(3):
            async with RedisAccount(redis, name=account_name) as account:
                limiter = account.limiter(8)
                async with make_client(
                    server, max_concurrency=limiter, ledger=account.ledger()
                ) as client:
                    await (await client.images.generate(prompt=f"p{i}"))
        for key in ("members", "fence", "last", "owners", "held"):
            assert await redis.exists(f"kling:{{{account_name}}}:{key}") == 0, key


async def test_close_returns_while_redis_is_down(own_redis: RedisServer) -> None:
    redis = Redis.from_url(own_redis.url)
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.05) as server:
        account = RedisAccount(redis, name="down", close_timeout=0.3)
        await account.start()
        client = make_client(
            server, max_concurrency=account.limiter(8), ledger=account.ledger(flush_timeout=0.3)
        )
        handle = await client.images.generate(prompt="p")
        own_redis.stop()
        await handle
        started = time.monotonic()
        await asyncio.wait_for(client.close(), 5)
        await asyncio.wait_for(account.close(), 5)
        assert time.monotonic() - started < 3
    await redis.aclose()


async def test_a_settled_creates_body_is_dropped(redis: Redis, account_name: str) -> None:
    async with (
        FakeKlingServer(api_key=API_KEY, task_duration=0.05) as server,
        RedisAccount(redis, name=account_name) as account,
    ):
        async with make_client(
            server, max_concurrency=account.limiter(8), ledger=account.ledger()
        ) as client:
            handle = await client.images.generate(prompt="p " * 1000)
            body_key = account.key(f"b:{handle.external_task_id}")
            assert await redis.exists(body_key) == 1
            await handle
            await client.ledger.flush()
            assert await redis.exists(body_key) == 0
            ledger = client.ledger
            assert isinstance(ledger, RedisLedger)
            assert not ledger._bodies_written
            assert not ledger._mine


# --- resume() in a survivor (s13), the limiter after 1303s (s15) ---------------------------


async def test_resume_in_a_survivor_moves_the_dead_members_units(
    redis: Redis, account_name: str
) -> None:
    async with (
        FakeKlingServer(api_key=API_KEY, task_duration=None) as server,
        members(redis, account_name, 2, lease=0.3) as (dead, survivor),
    ):
        dead_limiter = dead.limiter(8)
        dying = make_client(server, max_concurrency=dead_limiter, ledger=dead.ledger())
        await dying.images.generate(prompt="d", n=4)
        await dying.ledger.flush()
        await dead_limiter.flush()
        await stall(dead)
        await until_reaped(survivor, dead)
        limiter = survivor.limiter(8)
        async with make_client(server, max_concurrency=limiter, ledger=survivor.ledger()) as client:
            handles = await client.resume()
            assert len(handles) == 1
            await limiter.flush()
            assert await held(redis, survivor) == {
                str(handles[0].external_task_id): (survivor.member, 4, True)
            }
            await asyncio.wait_for(client.images.generate(prompt="r", n=4), 2)
        await dying.close()


@pytest.mark.parametrize("capacity", [12, None])
async def test_the_shared_limiter_learns_the_quota_and_admits_every_create(
    redis: Redis, account_name: str, capacity: int | None
) -> None:
    async with (
        FakeKlingServer(api_key=API_KEY, task_duration=0.1, concurrency_limit=6) as server,
        RedisAccount(redis, name=account_name) as account,
    ):
        limiter = account.limiter(capacity, min_cooldown=0.05, fairness_window=0.2)
        async with make_client(server, max_concurrency=limiter, ledger=account.ledger()) as client:

            async def one(i: int) -> None:
                await (await client.images.generate(prompt=f"p{i}", n=1 + i % 3))

            await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(30))), 30)
        assert len(server.tasks) == 30


async def test_an_uncertain_create_keeps_its_units_counted(redis: Redis, account_name: str) -> None:
    # Kling created the task but neither the answer nor a look-up got through:
    # it may run, so its units stay counted (handed over) rather than freed.
    async with (
        FakeKlingServer(api_key=API_KEY, task_duration=None) as server,
        RedisAccount(redis, name=account_name) as account,
    ):
        limiter = account.limiter(8)
        async with make_client(server, max_concurrency=limiter, ledger=account.ledger()) as client:
            server.inject("drop_after", route="create", times=1)
            server.inject("error", route="get", times=None, http_status=500)
            with pytest.raises(Exception, match="may exist on Kling"):
                await client.images.generate(prompt="p", n=3)
            await limiter.flush()
            assert len(server.tasks) == 1
            assert list((await held(redis, account)).values()) == [("", 3, False)]


# --- a stale writer never re-opens a settled entry (nemesis seed 5022) ----------------------


async def test_a_member_taken_for_dead_does_not_reopen_an_entry_a_survivor_settled(
    redis: Redis, account_name: str
) -> None:
    # The stalled member's late record of a create (state CREATED, no body: it
    # wrote the body with the intent) came after the survivor that claimed the
    # entry had settled it (body dropped, owner index cleared): it re-opened the
    # entry without a body, and the next adopter could not rebuild the request
    # ("cannot take over ...: prompt: is required"), while the job reran.
    async with members(redis, account_name, 2, lease=0.3) as (stalled, survivor):
        stale = stalled.ledger()
        intent = entry("e1", EntryState.INTENDED)
        stale.record(intent)
        await stale.flush()
        await stall(stalled)
        ledger = survivor.ledger()
        claimed: list[tuple[str, LedgerEntry]] = []

        async def claim() -> bool:
            claimed.extend(await ledger.claim())
            return bool(claimed)

        await eventually(claim)
        ledger.record(claimed[0][1].moved(EntryState.TERMINAL, task_id="t1", status="succeed"))
        await ledger.flush()
        await stalled.renew()  # alive again: it joins anew
        stale.record(intent.moved(EntryState.CREATED, task_id="t1"))
        await stale.flush()
        settled = await ledger.get("e1")
        assert settled is not None
        assert settled.state is EntryState.TERMINAL
        assert await ledger.all_unsettled() == []
        # A fresh intent (a rerun re-sending a create that never landed) does
        # re-open a settled entry: it carries its body.
        ledger.record(settled.moved(EntryState.INTENDED, body=body("e1")))
        await ledger.flush()
        reopened = await ledger.get("e1")
        assert reopened is not None
        assert reopened.body["prompt"] == "prompt of e1"


# --- a fenced member stops following what it lost --------------------------------------------


async def test_a_member_taken_for_dead_stops_following_the_tasks_it_lost(
    redis: Redis, account_name: str
) -> None:
    # It kept polling (and, were the task ended, recording) a task a survivor
    # had taken over; a survivor's later claim of the task then found it held
    # here already and moved no units (released with the survivor's orphans).
    async with (
        FakeKlingServer(api_key=API_KEY, task_duration=None) as server,
        members(redis, account_name, 2, lease=0.3) as (stalled, survivor),
    ):
        stalled_limiter = stalled.limiter(8)
        async with make_client(
            server, max_concurrency=stalled_limiter, ledger=stalled.ledger()
        ) as stalled_client:
            lost = await stalled_client.images.generate(prompt="lost", n=3)
            await stalled_client.ledger.flush()
            await stall(stalled)
            async with make_client(
                server, max_concurrency=survivor.limiter(8), ledger=survivor.ledger()
            ) as client:
                adopter = survivor.adopt(client, interval=0.05)
                await eventually(lambda: adopter.reattached == 1)
                await stalled.renew()  # alive again: it learns it was reaped
                with pytest.raises(TaskTakenOverError) as raised:
                    await asyncio.wait_for(lost.wait(), 5)
                assert raised.value.task_id == lost.task_id
                assert raised.value.owner == survivor.member
                again = stalled_client.images.attach(lost.task_id)  # followed afresh, read only
                assert stalled_limiter.in_use == 0
                await stalled_limiter.flush()
                assert await total(redis, survivor) == 3  # the survivor's, not released
                polls = len(server.requests_for("get")) + len(server.requests_for("list"))
                await asyncio.sleep(0.5)
                # the survivor alone polls it now: at most a few polls in 0.5 s
                after = len(server.requests_for("get")) + len(server.requests_for("list"))
                server.finish(lost.task_id)
                await eventually(lambda: client.limiter.in_use == 0)  # type: ignore[union-attr]
                assert (await asyncio.wait_for(again, 5)).task_id == lost.task_id
            ended = await survivor.ledger().get(str(lost.external_task_id))
            assert ended is not None
            assert ended.state is EntryState.TERMINAL
            assert after - polls < 12


async def test_a_second_create_of_a_running_task_frees_none_of_its_units(
    redis: Redis, account_name: str
) -> None:
    # Nemesis seed 6023: a survivor re-sent a dead member's create (same id)
    # while its rerun job re-attached the task the dead member's late create
    # had made; the re-send heard "already exists", found the task and, the
    # task holding units already, gave "its own" back with created=False: per
    # task, those were the running task's units, and Kling answered the next
    # create with 1303.
    async with RedisAccount(redis, name=account_name) as account:
        limiter = account.limiter(8)
        task = limiter.for_task("t1")
        await task.acquire(3)
        task.created(3)
        await task.acquire(3)  # another try of the same id: admitted, holds nothing more
        task.release(3, created=False)
        await limiter.flush()
        assert await held(redis, account) == {"t1": (account.member, 3, True)}
        assert limiter.in_use == 3
        task.release(3)  # the task ends
        await limiter.flush()
        assert await held(redis, account) == {}
        assert limiter.in_use == 0
        other = limiter.for_task("t2")
        await other.acquire(2)
        other.release(2, created=False)  # a create that failed: nothing was created
        await limiter.flush()
        assert await held(redis, account) == {}
        await limiter.close()


async def test_an_older_try_of_a_create_does_not_settle_the_current_one(
    redis: Redis, account_name: str
) -> None:
    # Nemesis seed 5022: a stalled member's create, queued for units, was
    # claimed and sent again by a survivor; the member, back, claimed the entry
    # again (the survivor died), then its old try, cancelled at its shutdown,
    # recorded "not created": the entry settled, its body dropped, and the
    # adopter could not rebuild the request ("cannot take over ...: prompt: is
    # required") while the survivor's create had landed.
    async with RedisAccount(redis, name=account_name) as account:
        ledger = account.ledger()
        first = entry("e1", EntryState.INTENDED, intended_at=1000.25)
        ledger.record(first)
        second = entry("e1", EntryState.INTENDED, intended_at=1002.5)  # sent again
        ledger.record(second)
        ledger.record(first.moved(EntryState.NOT_CREATED, error="cancelled"))
        ledger.record(first.moved(EntryState.UNCERTAIN, error="no answer"))
        await ledger.flush()
        current = await ledger.get("e1")
        assert current is not None
        assert current.state is EntryState.INTENDED
        assert current.intended_at == 1002.5
        assert current.body["prompt"] == "prompt of e1"
        ledger.record(second.moved(EntryState.CREATED, task_id="t1"))
        ledger.record(first.moved(EntryState.TERMINAL, task_id="t1", status="succeed"))
        await ledger.flush()  # a task's end is a fact, whichever try saw it
        ended = await ledger.get("e1")
        assert ended is not None
        assert ended.state is EntryState.TERMINAL


async def test_a_dead_members_units_for_another_members_unsettled_entry_stay_counted(
    redis: Redis, account_name: str
) -> None:
    # Nemesis seed 5022: a member that had re-attached a task whose entry was
    # another member's died; the survivor's pass released every unit it still
    # held, those of that running task too, and Kling answered a create 1303.
    async with members(redis, account_name, 3, lease=0.3) as (dead, owner, survivor):
        owner_ledger = owner.ledger()
        owner_ledger.record(entry("t-x", EntryState.CREATED, task_id="task-x"))
        await owner_ledger.flush()
        dead_limiter = dead.limiter(8)
        dead_limiter.adopt(2, task="t-x")  # runs on Kling; its entry is the owner's
        await dead_limiter.for_task("t-y").acquire(1)  # a create that never landed
        await dead_limiter.flush()
        await stall(dead)
        limiter = survivor.limiter(8)
        await until_reaped(survivor, dead)
        limiter.release_orphans(dead.member)
        await limiter.flush()
        assert set(await held(redis, survivor)) == {"t-x"}
        await limiter.close()
