"""One owner for every create: nothing lost, nothing created twice, nothing hangs.

Each test reproduces a defect of the create path (../shared/review/ at 100b378)
over loopback and checks the server's own record.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import time
from collections.abc import Iterator

import aiohttp
import pytest

import kling_async
from kling_async import (
    ClientClosedError,
    ConcurrencyLimiter,
    ConfigurationError,
    ContentPolicyError,
    ImageGenerationRequest,
    PollPolicy,
    RetryPolicy,
    TransportError,
    ValidationError,
)
from kling_async._ledger import EntryState, LedgerEntry, MemoryLedger
from kling_async._submissions import new_external_task_id
from kling_async.testing import FakeKlingServer, WireShapes
from tests.helpers import API_KEY, eventually, make_client


def requests(count: int, prefix: str = "p") -> list[ImageGenerationRequest]:
    return [ImageGenerationRequest(prompt=f"{prefix}{i}") for i in range(count)]


def fast_limiter(capacity: int) -> ConcurrencyLimiter:
    return ConcurrencyLimiter(capacity, min_cooldown=0.02, fairness_window=0.1)


def on_kling(server: FakeKlingServer) -> set[str | None]:
    return {task.external_task_id for task in server.tasks.values()}


# --- the README's own pattern: break out of a batch inside `async with Client()` ---


async def test_break_inside_async_with_client_loses_no_created_task() -> None:
    # r12: the batch's cleanup runs after __aexit__ closed the client; creates on
    # the wire were cut off and their tasks were in neither handles nor uncertain.
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.1) as server:
        async with make_client(server, max_concurrency=5) as client:
            batch = client.batch(requests(40))
            async for _result in batch:
                server.inject("delay", route="create", delay=0.3, times=None)
                sent = len(server.requests_for("create"))
                # More creates are on the wire now, their answers slow.
                await eventually(lambda: len(server.requests_for("create")) > sent)  # noqa: B023
                break
        # the client is closed here, by `async with`
        assert len(on_kling(server)) > 5
        known = {handle.external_task_id for handle in batch.handles} | set(batch.uncertain)
        assert on_kling(server) == known
        assert batch.uncertain == []


async def test_close_during_a_create_lets_it_settle() -> None:
    # r08: close() while the POST was on the wire gave ClientClosedError and
    # orphaned the task Kling went on to create.
    async with FakeKlingServer(api_key=API_KEY, task_duration=1.0) as server:
        server.inject("delay", route="create", delay=0.3)
        client = make_client(server)
        create = asyncio.ensure_future(client.images.generate(prompt="a fox"))
        await eventually(lambda: server.requests_for("create"))  # on the wire, answer slow
        await client.close()
        handle = await create
        assert handle.task_id in server.tasks
        assert handle.external_task_id in on_kling(server)
        with pytest.raises(ClientClosedError):
            await handle  # the client is closed: no more polling, but the id is known


async def test_close_during_a_batch_attaches_every_created_task() -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=1.0) as server:
        client = make_client(server)
        batch = client.batch(requests(3))

        async def consume() -> None:
            async for _ in batch:
                pass

        server.inject("delay", route="create", delay=0.3, times=None)
        run = asyncio.ensure_future(consume())
        await eventually(lambda: server.requests_for("create"))  # on the wire, answers slow
        await client.close()
        with pytest.raises(ClientClosedError):
            await run
        assert len(server.tasks) == 3
        assert {handle.external_task_id for handle in batch.handles} == on_kling(server)


async def test_close_drops_creates_still_waiting_for_units() -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=5.0) as server:
        limiter = fast_limiter(1)
        client = make_client(server, max_concurrency=limiter)
        first = await client.images.generate(prompt="holds the only unit")
        waiting = asyncio.ensure_future(client.images.generate(prompt="waits"))
        await eventually(lambda: limiter.waiting == 1)
        await client.close()
        with pytest.raises(ClientClosedError) as caught:
            await waiting
        assert caught.value.external_task_id is not None
        assert caught.value.external_task_id not in on_kling(server)
        assert len(server.requests_for("create")) == 1
        assert first.task_id in server.tasks


# --- 1303 re-queues keep one id and remember a possible landing ----------------------


def lost_then_lagging_then_full(server: FakeKlingServer) -> None:
    server.inject("drop_after", route="create")  # lands; the answer is lost
    server.inject("error", route="get", code=1203)  # the lookup misses once (lag)
    server.inject("error", route="create", code=1303)  # our own orphan holds the units


async def test_a_1303_requeue_never_creates_under_a_fresh_id() -> None:
    # r15b: submit() of a request without an id re-created under a new id after 1303.
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.5) as server:
        lost_then_lagging_then_full(server)
        async with make_client(server, max_concurrency=fast_limiter(4)) as client:
            handle = await client.images.submit(ImageGenerationRequest(prompt="a fox"))
        sent_ids = {r.external_task_id for r in server.requests_for("create")}
        assert sent_ids == {handle.external_task_id}
        assert len(server.tasks) == 1


async def test_a_1303_requeue_remembers_that_an_earlier_try_may_have_landed() -> None:
    # r15: after the re-queue, "external_task_id already exists" was raised as
    # InvalidRequestError while the task ran on Kling.
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.5) as server:
        lost_then_lagging_then_full(server)
        async with make_client(server, max_concurrency=fast_limiter(4)) as client:
            handle = await client.images.generate(prompt="a fox")
            assert handle.task_id in server.tasks
            assert len(server.tasks) == 1
            await handle


# --- ambiguous failures are looked up, the last one included ------------------------


async def test_a_lost_answer_with_one_attempt_is_looked_up() -> None:
    # r03 (a): RetryPolicy(max_attempts=1) and one lost answer orphaned the task.
    async with FakeKlingServer(api_key=API_KEY) as server:
        server.inject("drop_after", route="create")
        async with make_client(server, retry=RetryPolicy(max_attempts=1)) as client:
            handle = await client.images.generate(prompt="a fox")
            assert handle.task_id in server.tasks
            assert len(server.requests_for("create")) == 1


async def test_a_5xx_after_acting_with_no_retries_left_is_looked_up() -> None:
    # r03 (c): a 5xx on the last try was raised without a lookup.
    async with FakeKlingServer(api_key=API_KEY) as server:
        server.inject("error_after", route="create", code=5000)
        async with make_client(server, retry=RetryPolicy(max_attempts=1)) as client:
            handle = await client.images.generate(prompt="a fox")
        assert handle.task_id in server.tasks
        assert len(server.tasks) == 1


async def test_an_outage_leaves_an_uncertain_create_reported_by_its_id() -> None:
    # r03 (b): every answer lost for longer than the retry budget.
    ledger = MemoryLedger()
    async with FakeKlingServer(api_key=API_KEY) as server:
        server.inject("drop_after", route="create", times=None)
        server.inject("drop", route="get", times=None)
        async with make_client(server, ledger=ledger) as client:
            with pytest.raises(TransportError) as caught:
                await client.images.generate(prompt="a fox", external_task_id="order-7")
        assert caught.value.external_task_id == "order-7"
        assert "order-7" in str(caught.value)
        assert "may exist" in str(caught.value)
        assert on_kling(server) == {"order-7"}
        assert len(server.tasks) == 1  # looked up, never re-sent blindly
        entry = await ledger.get("order-7")
        assert entry is not None
        assert entry.state is EntryState.UNCERTAIN


def test_generated_external_task_ids_are_unique_and_in_time_order() -> None:
    # In time order, so that a journal adds each new id at the end of its index
    # of ids (a page per commit) rather than each on a page of its own.
    first = [new_external_task_id() for _ in range(1000)]
    time.sleep(0.002)
    later = new_external_task_id()
    assert len(set(first)) == len(first)
    assert all(re.fullmatch("[0-9a-f]{32}", generated) for generated in [*first, later])
    assert max(first) < later


@pytest.mark.parametrize("external_task_id", ["order#42", "a/b", "a?b=1", "50%off", "ü ö"])
async def test_external_task_ids_are_percent_encoded_in_lookups(external_task_id: str) -> None:
    # r04: the id went into the path raw: "order#42" looked up "order".
    async with FakeKlingServer(api_key=API_KEY) as server:
        server.inject("drop_after", route="create")
        async with make_client(server) as client:
            handle = await client.images.generate(prompt="p", external_task_id=external_task_id)
            assert handle.external_task_id == external_task_id
            task = await client.images.get(external_task_id)
            assert task.task_id == handle.task_id
        assert len(server.tasks) == 1


# --- cancellation never loses a task --------------------------------------------------


async def test_cancelling_generate_on_the_wire_keeps_the_task_attached(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # r09: no handle, nothing logged, and the limiter freed units Kling still held.
    caplog.set_level(logging.WARNING, logger="kling_async")
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.6, concurrency_limit=2) as server:
        server.inject("delay", route="create", delay=0.2)
        async with make_client(server, max_concurrency=2) as client:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(client.images.generate(prompt="a fox", n=2), 0.1)
            # The create settles in the background, and says so.
            await eventually(
                lambda: any(
                    task_id in r.getMessage()
                    for r in caplog.records
                    if r.levelno == logging.WARNING
                    for task_id in server.tasks
                )
            )
            (task,) = server.tasks.values()
            assert isinstance(client.limiter, ConcurrencyLimiter)
            assert client.limiter.in_use == 2  # held until the task ends
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert any(task.task_id in w and str(task.external_task_id) in w for w in warnings)
            # The next create waits for the units instead of running into 1303.
            handle = await client.images.generate(prompt="next", n=2)
            await handle
        assert [r.code for r in server.requests_for("create")] == [0, 0]


async def test_cancelling_generate_while_it_waits_for_units_sends_nothing() -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.3) as server:
        async with make_client(server, max_concurrency=fast_limiter(1)) as client:
            first = await client.images.generate(prompt="holds the unit")
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(client.images.generate(prompt="waits"), 0.05)
            await first
            await asyncio.sleep(0.1)
            assert len(server.requests_for("create")) == 1
            assert isinstance(client.limiter, ConcurrencyLimiter)
            assert client.limiter.in_use == 0


# --- no hang on errors that are not Kling's ---------------------------------------------


class FailingVault:
    """A custom credentials provider whose token service is down."""

    def authorization(self) -> str:
        raise OSError("vault unreachable")

    def resign(self) -> bool:
        return False


async def test_a_failing_credentials_provider_ends_a_batch_instead_of_hanging() -> None:
    # r05 (c)
    async with FakeKlingServer(api_key=API_KEY) as server:
        async with make_client(server, api_key=None, credentials=FailingVault()) as client:
            with pytest.raises(ConfigurationError) as caught:
                await client.images.generate(prompt="single")
            assert isinstance(caught.value.__cause__, OSError)
            with pytest.raises(ConfigurationError):
                await asyncio.wait_for(client.batch(requests(3)).collect(), 5)
        assert server.tasks == {}


async def test_a_closed_caller_session_ends_a_batch_instead_of_hanging() -> None:
    # r05 (b)
    owned = aiohttp.ClientSession()
    await owned.close()
    async with FakeKlingServer(api_key=API_KEY) as server:
        async with make_client(server, session=owned) as client:
            with pytest.raises(ClientClosedError):
                await asyncio.wait_for(client.batch(requests(3)).collect(), 5)
        assert server.tasks == {}


class NewlineToken:
    """A custom provider handing out a header value aiohttp refuses."""

    def authorization(self) -> str:
        return "Bearer bad\ntoken"

    def resign(self) -> bool:
        return False


async def test_a_header_aiohttp_refuses_ends_a_batch_instead_of_hanging() -> None:
    # r05 (a): a key read from a file with its newline made aiohttp raise ValueError,
    # which killed the create silently (keys given as api_key are stripped now).
    async with FakeKlingServer() as server:
        credentials = NewlineToken()
        async with make_client(server, api_key=None, credentials=credentials) as client:
            with pytest.raises(ConfigurationError) as caught:
                await asyncio.wait_for(client.batch(requests(3)).collect(), 5)
            assert "bad\ntoken" not in str(caught.value)
        assert server.tasks == {}


# --- the quota: n above it, and units given back on close ---------------------------------


async def test_a_task_larger_than_max_concurrency_fails_at_once() -> None:
    # r02: it went "alone" and met 1303 for ever.
    async with FakeKlingServer(api_key=API_KEY, concurrency_limit=4) as server:
        async with make_client(server, max_concurrency=4) as client:
            with pytest.raises(ValidationError) as caught:
                await asyncio.wait_for(client.images.generate(prompt="big", n=9), 1)
            assert caught.value.field == "n"
            assert "max_concurrency" in str(caught.value)
        assert server.requests_for("create") == []


async def test_an_oversized_request_is_one_failed_result_not_a_stalled_batch() -> None:
    # r02b
    async with FakeKlingServer(api_key=API_KEY, concurrency_limit=4, task_duration=0.05) as server:
        async with make_client(server, max_concurrency=fast_limiter(4)) as client:
            batch = [*requests(3), ImageGenerationRequest(prompt="big", n=9), *requests(10, "q")]
            results = await asyncio.wait_for(client.batch(batch).collect(), 10)
        assert len(results) == 14
        assert isinstance(results[3].error, ValidationError)
        assert sum(result.ok for result in results) == 13


async def test_close_gives_back_the_units_of_a_shared_limiter() -> None:
    # r07: client A's units were never given back; client B waited for ever.
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.2) as server:
        shared = fast_limiter(4)
        async with make_client(server, max_concurrency=shared) as first:
            await first.images.generate(prompt="a", n=4)
            assert shared.in_use == 4
        assert shared.in_use == 0
        async with make_client(server, max_concurrency=shared) as second:
            handle = await asyncio.wait_for(second.images.generate(prompt="b", n=4), 3)
            await handle


# --- every create error names its external_task_id -----------------------------------------


async def test_every_error_from_a_create_carries_its_external_task_id() -> None:
    async with FakeKlingServer(api_key=API_KEY) as server:
        server.inject("error", route="create", code=1301, message="unsafe prompt")
        async with make_client(server) as client:
            with pytest.raises(ContentPolicyError) as caught:
                await client.images.generate(prompt="x", external_task_id="job-1")
        assert caught.value.external_task_id == "job-1"
        assert "job-1" in str(caught.value)
        assert caught.value.code == 1301


async def test_a_caller_session_raising_for_status_still_gets_typed_errors() -> None:
    # r17: raise_for_status=True turned a 1301 into a retried, ambiguous TransportError.
    async with FakeKlingServer(api_key=API_KEY) as server:
        server.inject("error", route="create", code=1301, message="unsafe prompt")
        async with aiohttp.ClientSession(raise_for_status=True) as session:
            async with make_client(server, session=session) as client:
                with pytest.raises(ContentPolicyError):
                    await client.images.generate(prompt="x")
        assert [r.code for r in server.requests_for("create")] == [1301]
        assert server.requests_for("get") == []


# --- the ledger -----------------------------------------------------------------------------


class RecordingLedger(MemoryLedger):
    """Keeps every entry it is given, with how many creates the server had then."""

    def __init__(self, server: FakeKlingServer) -> None:
        super().__init__()
        self.server = server
        self.history: list[tuple[LedgerEntry, int]] = []
        self.flushed: list[int] = []

    def record(self, entry: LedgerEntry) -> None:
        self.history.append((entry, len(self.server.requests_for("create"))))
        super().record(entry)

    async def flush(self) -> None:
        self.flushed.append(len(self.history))


async def test_the_ledger_follows_a_create_from_intent_to_created() -> None:
    async with FakeKlingServer(api_key=API_KEY) as server:
        ledger = RecordingLedger(server)
        async with make_client(server, ledger=ledger) as client:
            handle = await client.images.generate(prompt="a fox")
        states = [entry.state for entry, _ in ledger.history]
        assert states == [EntryState.INTENDED, EntryState.CREATED]
        intent, creates_then = ledger.history[0]
        assert creates_then == 0  # recorded before anything was sent
        assert ledger.flushed
        assert ledger.flushed[0] == 1
        assert intent.external_task_id == handle.external_task_id
        assert intent.body["prompt"] == "a fox"
        assert ledger.history[-1][0].task_id == handle.task_id
        assert await ledger.unsettled() == []


async def test_a_create_whose_answer_was_lost_is_marked_sent_while_it_is_looked_up() -> None:
    async with FakeKlingServer(api_key=API_KEY) as server:
        server.inject("drop_after", route="create")
        ledger = RecordingLedger(server)
        async with make_client(server, ledger=ledger) as client:
            await client.images.generate(prompt="a fox")
        states = [entry.state for entry, _ in ledger.history]
        assert states == [EntryState.INTENDED, EntryState.SENT, EntryState.CREATED]


async def test_the_ledger_keeps_no_credentials() -> None:
    receiver = kling_async.CallbackReceiver("https://hooks.example.com/kling", secret="s" * 32)
    async with FakeKlingServer(api_key=API_KEY) as server:
        ledger = RecordingLedger(server)
        async with make_client(server, ledger=ledger, callbacks=receiver) as client:
            handle = await client.images.generate(prompt="a fox")
        token = receiver.token_for(str(handle.external_task_id))
        for entry, _ in ledger.history:
            assert token not in repr(entry)
            assert token not in str(entry.body)
            assert API_KEY not in repr(entry)
            assert API_KEY not in str(entry.body)
            assert "callback_url" not in entry.body
            assert entry.receiver_callback


# --- waits and timers -------------------------------------------------------------------------


def scheduled_timers(loop: asyncio.AbstractEventLoop) -> Iterator[asyncio.TimerHandle]:
    return (timer for timer in loop._scheduled if not timer.cancelled())  # type: ignore[attr-defined]


async def test_awaiting_a_handle_on_a_closed_client_leaves_no_timer() -> None:
    # r10: the wait's timer outlived the ClientClosedError and later failed a
    # future nobody awaited ("Future exception was never retrieved").
    loop = asyncio.get_running_loop()
    async with FakeKlingServer(api_key=API_KEY, task_duration=5) as server:
        client = make_client(server, polling=PollPolicy(timeout=0.2))
        handle = await client.images.generate(prompt="a fox")
        await client.close()
        before = len(list(scheduled_timers(loop)))
        with pytest.raises(ClientClosedError):
            await handle
        assert len(list(scheduled_timers(loop))) == before
    gc.collect()


# --- answers that bend the envelope ------------------------------------------------------


async def test_a_create_answered_with_only_a_task_id_is_tracked() -> None:
    # Kling created the task: a parse error must not lose it (it raised APIError).
    shapes = WireShapes(create_answer="task_id_only", request_id=False)
    async with FakeKlingServer(api_key=API_KEY, shapes=shapes) as server:
        async with make_client(server) as client:
            handle = await client.images.generate(prompt="a fox", external_task_id="bent-1")
            assert handle.task_id in server.tasks
            assert handle.external_task_id == "bent-1"
            task = await handle
        assert task.status is kling_async.TaskStatus.SUCCEED
        assert len(server.requests_for("create")) == 1


async def test_a_create_answered_success_without_a_task_id_is_looked_up() -> None:
    # code 0 with no task_id: Kling acted, its answer does not say on what.
    async with FakeKlingServer(api_key=API_KEY) as server:
        body = b'{"code":0,"message":"SUCCEED","data":{}}'
        server.inject("garbage", route="create", http_status=200, body=body)
        async with make_client(server) as client:
            handle = await client.images.generate(prompt="a fox")
        # The bent answer acted on nothing here, so the lookup finds nothing and
        # the create is sent again under the same id.
        sent = {r.external_task_id for r in server.requests_for("create")}
        assert sent == {handle.external_task_id}
        assert len(server.tasks) == 1
