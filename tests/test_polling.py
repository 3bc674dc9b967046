"""The shared poller over loopback: the learned schedule in use, list pages sized to
what is in flight, and no unexpected error ever stranding a task."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

import kling_async
from kling_async import CallbackReceiver, ImageGenerationRequest, PollPolicy, TaskStatus
from kling_async import _polling as polling
from kling_async._durations import kind_of
from kling_async._polling import Poller
from kling_async._schedule import Durations
from kling_async._wire import parse_task
from kling_async.testing import CallbackFaults, FakeKlingServer
from tests.helpers import API_KEY, eventually, make_client

#: Fast enough for tests, cold schedule included; learning on, as by default.
POLICY = PollPolicy(initial_delay=0.05, max_delay=1.0, timeout=10.0)


class FlakyCredentials:
    """A credentials provider (the ``Credentials`` protocol) that raises on demand:
    a token service hiccup, the kind of error no poll expects."""

    def __init__(self, secret: str = API_KEY) -> None:
        self.secret = secret
        self.failures = 0  # how many of the next calls raise (-1: all of them)

    def authorization(self) -> str:
        if self.failures:
            self.failures -= 1
            raise OSError(f"token service said no to {self.secret}")
        return f"Bearer {API_KEY}"

    def resign(self) -> bool:
        return False


def asked_one_by_one(server: FakeKlingServer) -> set[str]:
    """The task_ids the server was asked for with a single GET."""
    return {r.path.rsplit("/", 1)[-1] for r in server.requests_for("get")}


# --- review defect r06: an unexpected error in a sweep strands no task --------------------


async def test_an_unexpected_error_in_a_list_sweep_hands_its_tasks_to_single_gets(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # r06: anything but a KlingError escaping a sweep left its tasks marked as
    # being polled for ever. The transport turns what it meets into KlingErrors,
    # so the fault is a bug of ours, reading a page, injected once.
    read_page = Poller._take_page
    failures = [RuntimeError("a bug reading a list page")]
    failed_sweep: list[str] = []  # the task_ids the sweep that failed was reading for

    def take_page_once(self: Poller, items: Any, envelope: Any, missing: Any, *rest: Any) -> Any:
        if failures:
            # ``missing`` is every task of this sweep: the due ones and those taken along.
            failed_sweep.extend(state.task_id for state in missing)
            raise failures.pop()
        return read_page(self, items, envelope, missing, *rest)

    monkeypatch.setattr(Poller, "_take_page", take_page_once)
    async with FakeKlingServer(
        api_key=API_KEY, task_duration=None, processing_delay=0.01
    ) as server:
        async with make_client(server) as client:
            handles = [await client.images.generate(prompt=f"p{i}") for i in range(25)]
            with caplog.at_level(logging.ERROR, logger="kling_async"):
                waits = [asyncio.ensure_future(h.wait(timeout=30)) for h in handles]
                # On a slow machine the first sweep may hold only the tasks due by
                # then, and others may be polled meanwhile: each of its tasks is asked
                # for on its own.
                await eventually(
                    lambda: failed_sweep and set(failed_sweep) <= asked_one_by_one(server),
                    timeout=20,
                )
            for handle in handles:
                server.finish(handle.task_id)  # every task is done on Kling
            tasks = await asyncio.gather(*waits)
    assert not failures
    assert len(failed_sweep) >= polling.MIN_SWEEP  # a sweep, not single GETs
    assert {task.status for task in tasks} == {TaskStatus.SUCCEED}
    assert any("unexpected error in a list sweep" in r.getMessage() for r in caplog.records)


async def test_an_unexpected_error_that_persists_ends_the_waits_chained_and_without_secrets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*_args: Any) -> Any:
        raise RuntimeError("a bug, quoting sk-do-not-log-me")

    monkeypatch.setattr(Poller, "_take_page", broken)
    monkeypatch.setattr(polling, "parse_task", broken)
    async with FakeKlingServer(api_key=API_KEY, task_duration=None) as server:
        async with make_client(server) as client:
            handles = [await client.images.generate(prompt=f"p{i}") for i in range(25)]
            server.finish(handles[0].task_id)  # a changed task: its answer must be read
            results = await asyncio.gather(
                *(h.wait(timeout=5) for h in handles[:1]), return_exceptions=True
            )
    (result,) = results
    assert type(result) is kling_async.KlingError  # not a timeout: the wait ended
    assert isinstance(result.__cause__, RuntimeError)
    assert "sk-do-not-log-me" not in str(result)
    assert "RuntimeError" in str(result)


async def test_a_failing_credentials_provider_ends_the_waits_chained_and_without_secrets() -> None:
    credentials = FlakyCredentials(secret="sk-do-not-log-me")
    async with FakeKlingServer(api_key=API_KEY, task_duration=None) as server:
        async with make_client(server, api_key=None, credentials=credentials) as client:
            handles = [await client.images.generate(prompt=f"p{i}") for i in range(25)]
            credentials.failures = -1  # from now on every request fails
            results = await asyncio.gather(
                *(h.wait(timeout=5) for h in handles), return_exceptions=True
            )
    for result in results:
        assert isinstance(result, kling_async.ConfigurationError)  # the wait ended
        assert isinstance(result.__cause__, OSError)
        assert "sk-do-not-log-me" not in str(result)
        assert "OSError" in str(result)


async def test_a_sweep_failing_for_a_reason_not_about_listing_keeps_sweeps_on() -> None:
    credentials = FlakyCredentials()
    async with FakeKlingServer(
        api_key=API_KEY, task_duration=None, processing_delay=0.01
    ) as server:
        async with make_client(server, api_key=None, credentials=credentials) as client:
            handles = [await client.images.generate(prompt=f"p{i}") for i in range(25)]
            credentials.failures = 1  # the first sweep's request fails, once
            waits = [asyncio.ensure_future(h.wait(timeout=5)) for h in handles]
            # Not a refusal of listing: a later sweep is sent and answered.
            await eventually(lambda: any(r.code == 0 for r in server.requests_for("list")))
            for handle in handles:
                server.finish(handle.task_id)
            tasks = await asyncio.gather(*waits)
        assert {task.status for task in tasks} == {TaskStatus.SUCCEED}


# --- the learned schedule in use ------------------------------------------------------------


async def test_once_tasks_of_a_kind_finished_the_next_is_not_polled_while_it_surely_runs() -> None:
    # 0.6 s tasks: long enough that the cold schedule, even shaped by the endpoint's
    # prior (it skips the earliest polls), polls a first task more than 4 times.
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.6, processing_delay=0.01) as server:
        async with make_client(server, polling=POLICY) as client:
            cold = await client.images.generate(prompt="first")
            await cold
            cold_gets = len(server.requests_for("get"))
            for index in range(3):  # a handful of the same kind
                await (await client.images.generate(prompt=f"learn {index}"))
            durations = client._tracker.durations_for(cold._state)
            assert isinstance(durations, Durations)
            assert durations.median == pytest.approx(0.6, abs=0.05)
            before = len(server.requests_for("get"))
            handle = await client.images.generate(prompt="learned")
            created = time.monotonic()
            task = await handle
    assert task.status is TaskStatus.SUCCEED
    gets = server.requests_for("get")[before:]
    # Nothing while it surely runs (the window opens ~0.5 s), then few polls:
    # the cold schedule polled it every 0.05 s from the start.
    assert gets[0].arrived_at - created >= 0.3
    assert len(gets) <= 4 < cold_gets


async def test_a_handle_knows_the_kind_of_its_task(server: FakeKlingServer) -> None:
    request = ImageGenerationRequest(prompt="p", n=2, resolution="2k")
    async with make_client(server, max_concurrency=4) as limited, make_client(server) as plain:
        for client in (limited, plain):
            handle = await client.images.submit(request)
            assert handle._state.kind == kind_of(request)
            await handle
        assert plain.images.attach(handle.task_id)._state.kind is not None  # the same state
        other = await plain.images.get(handle.task_id)
    assert other.status is TaskStatus.SUCCEED


async def test_an_attached_tasks_age_counts_from_its_creation_on_kling() -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=None) as server:
        async with make_client(server) as creator:
            created = await creator.images.generate(prompt="p")
            await asyncio.sleep(0.5)
            async with make_client(server) as restarted:
                handle = restarted.images.attach(created.task_id)
                with pytest.raises(kling_async.TaskTimeoutError):
                    await handle.wait(timeout=0.2)  # polled at once, then on schedule
                age = time.monotonic() - handle._state.first_seen
    assert age >= 0.6  # not the 0.2 s since the attach


async def test_list_pages_are_sized_to_what_is_in_flight() -> None:
    async with FakeKlingServer(
        api_key=API_KEY, task_duration=None, processing_delay=0.01
    ) as server:
        async with make_client(server) as client:
            for index in range(300):  # an account with history: 300 older tasks
                server.finish((await client.images.generate(prompt=f"old {index}")).task_id)
            handles = [await client.images.generate(prompt=f"p{i}") for i in range(10)]
            waits = [asyncio.ensure_future(h.wait(timeout=5)) for h in handles]
            await eventually(lambda: len(server.requests_for("list")) >= 3)
            for handle in handles:
                server.finish(handle.task_id)
            await asyncio.gather(*waits)
    sizes = {int(r.query["pageSize"]) for r in server.requests_for("list")}
    assert max(sizes) < 50  # ten in flight: not a page of 500 of mostly old tasks
    assert len(server.requests_for("get")) == 0  # every sweep found all ten


async def test_a_list_endpoint_that_refuses_for_good_is_not_asked_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.3, processing_delay=0.01) as server:
        server.inject("error", route="list", code=1202, times=None)  # a gateway without it
        async with make_client(server) as client:
            with caplog.at_level(logging.WARNING, logger="kling_async"):
                handles = [await client.images.generate(prompt=f"p{i}") for i in range(5)]
                tasks = await asyncio.gather(*handles)
    assert {task.status for task in tasks} == {TaskStatus.SUCCEED}
    assert len(server.requests_for("list")) == 1
    assert any("refused a sweep" in r.getMessage() for r in caplog.records)


async def test_list_sweeps_can_be_turned_off() -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.2, processing_delay=0.01) as server:
        policy = PollPolicy(initial_delay=0.05, max_delay=0.2, list_sweeps=False, timeout=10)
        async with make_client(server, polling=policy) as client:
            handles = [await client.images.generate(prompt=f"p{i}") for i in range(25)]
            await asyncio.gather(*handles)
    assert server.requests_for("list") == []
    assert len(server.requests_for("get")) >= 25


# --- issue 17: callbacks that never arrive are reported ----------------------------------


@pytest.fixture
async def receiver() -> AsyncIterator[CallbackReceiver]:
    receiver = CallbackReceiver(secret="callback-secret-0123456789abcdef")
    async with receiver.serve():
        yield receiver
    await receiver.close()


SAFETY_NET = PollPolicy(initial_delay=0.02, max_delay=0.1, callback_delay=0.3, timeout=10)


def silence_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and "no callback has arrived for it" in r.getMessage()
    ]


async def test_overdue_tasks_without_any_callback_log_one_warning(
    receiver: CallbackReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    # Kling never reaches the receiver (an unreachable public_url looks the same).
    async with FakeKlingServer(
        api_key=API_KEY, task_duration=0.05, callback_faults=CallbackFaults(drop=1.0)
    ) as server:
        async with make_client(server, callbacks=receiver, polling=SAFETY_NET) as client:
            with caplog.at_level(logging.WARNING, logger="kling_async"):
                handles = [await client.images.generate(prompt=f"p{i}") for i in range(3)]
                tasks = await asyncio.gather(*handles)  # the safety net found them
                await (await client.images.generate(prompt="later"))
    assert {task.status for task in tasks} == {TaskStatus.SUCCEED}
    warnings = silence_warnings(caplog)
    assert len(warnings) == 1  # once per client, however many tasks
    assert "public_url" in warnings[0].getMessage()


async def test_no_warning_for_a_task_that_has_not_changed(
    receiver: CallbackReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    # Queued on Kling's side for long: no status change, so no callback is due.
    async with FakeKlingServer(api_key=API_KEY, task_duration=None, processing_delay=60) as server:
        async with make_client(server, callbacks=receiver, polling=SAFETY_NET) as client:
            with caplog.at_level(logging.WARNING, logger="kling_async"):
                handle = await client.images.generate(prompt="p")
                with pytest.raises(kling_async.TaskTimeoutError):
                    await handle.wait(timeout=1.0)  # three safety-net polls
    assert len(server.requests_for("get")) >= 2
    assert silence_warnings(caplog) == []


async def test_no_warning_while_callbacks_arrive(
    receiver: CallbackReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    # Only the terminal callbacks are lost: Kling reaches the receiver, and the
    # overdue poll finds each task as the safety net should.
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.2, processing_delay=0.01) as server:
        async with make_client(server, callbacks=receiver, polling=SAFETY_NET) as client:
            with caplog.at_level(logging.WARNING, logger="kling_async"):
                handle = await client.images.generate(prompt="p")
                await eventually(lambda: handle.status is TaskStatus.PROCESSING)
                server.task(handle.task_id).callback_url = None  # the rest go nowhere
                task = await handle
    assert task.status is TaskStatus.SUCCEED
    assert silence_warnings(caplog) == []


# --- issue 26: work proportional to change, not to tasks in flight -----------------------


async def test_a_sweep_structures_and_replans_only_what_changed_or_was_due(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every sweep reads every task in flight; before issue 26 each one it saw was
    # planned again, changed or not, so a sweep cost work per task in flight.
    structured: list[str] = []
    parse = parse_task

    def counting_parse(envelope: Any) -> Any:
        structured.append(envelope.data["task_id"])
        return parse(envelope)

    monkeypatch.setattr(polling, "parse_task", counting_parse)
    # Polls far apart: nothing comes due on its own while the test drives sweeps.
    policy = PollPolicy(initial_delay=60.0, max_delay=60.0, timeout=30.0, learn=False)
    async with FakeKlingServer(
        api_key=API_KEY, task_duration=None, processing_delay=0.01
    ) as server:
        async with make_client(server, polling=policy) as client:
            handles = [await client.images.generate(prompt=f"p{i}") for i in range(12)]
            waits = [asyncio.ensure_future(handle.wait()) for handle in handles]
            await asyncio.sleep(0.1)  # every task is processing on the server now
            poller = client._tracker._poller(handles[0].endpoint)
            due = handles[0]._state

            async def sweep_for(state: Any) -> None:
                polling._plan(state).polling = True
                await poller._sweep([state], *poller._page_plan())

            await sweep_for(due)  # every task changed: submitted -> processing
            # Only waits listen, and they want the end: each change is kept
            # unread, and structured when somebody asks for it.
            assert structured == []
            assert {h.status for h in handles} == {TaskStatus.PROCESSING}
            assert sorted(structured) == sorted(h.task_id for h in handles)
            plans = {h.task_id: polling._plan(h._state).next_poll for h in handles}
            structured.clear()

            await sweep_for(due)  # nothing changed: only the due task is planned again
            assert structured == []
            assert {h.task_id: polling._plan(h._state).next_poll for h in handles[1:]} == {
                h.task_id: plans[h.task_id] for h in handles[1:]
            }
            assert polling._plan(due).next_poll != plans[due.task_id]
            assert not polling._plan(due).polling

            server.finish(handles[5].task_id)
            await sweep_for(due)  # one changed: only it is structured
            assert structured == [handles[5].task_id]
            assert (await waits[5]).status is TaskStatus.SUCCEED
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)


async def test_a_sweep_for_old_tasks_starts_below_the_newer_ones_above_them() -> None:
    # A list page holds the newest tasks first, and the tasks due are mostly old
    # ones near their end: a sweep from the top decoded every newer task above
    # them (issue 26). It starts at the page of the shallowest one's last position.
    policy = PollPolicy(initial_delay=60.0, max_delay=60.0, timeout=30.0, learn=False)
    async with FakeKlingServer(
        api_key=API_KEY, task_duration=None, processing_delay=0.01
    ) as server:

        async def newer_tasks(count: int) -> None:
            """Tasks another process creates on the account: listed above ours."""
            async with aiohttp.ClientSession() as session:
                for index in range(count):
                    async with session.post(
                        f"{server.url}/v1/images/generations",
                        json={"model_name": "kling-v1", "prompt": f"new {index}"},
                        headers={"Authorization": f"Bearer {API_KEY}"},
                    ) as response:
                        answer = await response.json()
                        assert answer["code"] == 0, answer

        async with make_client(server, polling=policy) as client:
            handles = [await client.images.generate(prompt=f"old {i}") for i in range(10)]
            waits = [asyncio.ensure_future(handle.wait()) for handle in handles]
            poller = client._tracker._poller(handles[0].endpoint)
            states = [handle._state for handle in handles]

            async def sweep() -> None:
                for state in states:
                    polling._plan(state).polling = True
                await poller._sweep(states, *poller._page_plan())

            await newer_tasks(600)  # deeper than a page from the top holds
            for _ in range(8):  # the sweeps learn how deep the list goes
                await sweep()
                if all(polling._plan(state).position > 600 for state in states):
                    break
            assert all(polling._plan(state).position > 600 for state in states)
            await newer_tasks(200)
            lists_before, items_before = len(server.requests_for("list")), poller.list_items
            gets_before = len(server.requests_for("get"))
            server.finish(handles[3].task_id)
            await sweep()
            lists = server.requests_for("list")[lists_before:]
            assert int(lists[0].query["pageNum"]) > 1  # the newer tasks' pages skipped
            assert poller.list_items - items_before < 500  # not the 800 above them
            assert (await waits[3]).status is TaskStatus.SUCCEED  # found, 200 deeper
            assert len(server.requests_for("get")) == gets_before  # every one found
            assert all(polling._plan(state).position > 800 for state in states)
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)


async def test_sweeps_decode_list_items_within_a_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every sweep decodes every task in flight, changed or not: without a bound,
    # tasks polled often would cost CPU per task in flight at each sweep.
    monkeypatch.setattr(polling, "SWEEP_ITEMS_PER_SECOND", 100)
    policy = PollPolicy(initial_delay=0.05, max_delay=0.05, jitter=0.0, learn=False, timeout=30)
    async with FakeKlingServer(
        api_key=API_KEY, task_duration=None, processing_delay=0.01
    ) as server:
        async with make_client(server, polling=policy) as client:
            handles = [await client.images.generate(prompt=f"p{i}") for i in range(20)]
            waits = [asyncio.ensure_future(handle.wait()) for handle in handles]
            await eventually(lambda: len(server.requests_for("list")) >= 1)
            await asyncio.sleep(1.0)
            poller = client._tracker._poller(handles[0].endpoint)
            pages, items = len(server.requests_for("list")), poller.list_items
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
    # ~20 items a page: about one sweep each 0.2 s, where the schedule asks for
    # one every 0.05 s; and no GET stood in for the sweeps held back.
    assert items <= 100 * 1.0 + 2 * 40
    assert pages <= 8
    assert server.requests_for("get") == []


@contextlib.asynccontextmanager
async def awaited_in_progress(
    count: int,
) -> AsyncIterator[tuple[FakeKlingServer, list[kling_async.TaskHandle], list[Any]]]:
    """``count`` awaited tasks, each with its ``processing`` kept unread: the
    server, the handles and the waits (cancelled on the way out)."""
    policy = PollPolicy(initial_delay=0.05, max_delay=0.05, learn=False, timeout=30)
    async with FakeKlingServer(
        api_key=API_KEY, task_duration=None, processing_delay=0.01
    ) as server:
        async with make_client(server, polling=policy) as client:
            handles = [await client.images.generate(prompt=f"p{i}") for i in range(count)]
            waits = [asyncio.ensure_future(handle.wait()) for handle in handles]
            await eventually(lambda: all(handle._state.unread is not None for handle in handles))
            try:
                yield server, handles, waits
            finally:
                for wait in waits:
                    wait.cancel()
                await asyncio.gather(*waits, return_exceptions=True)


async def test_a_change_only_waits_listen_to_is_structured_only_at_the_end() -> None:
    # Awaited handles want the end: a task's "processing" is kept as Kling sent it
    # and never structured when the end follows before anyone asks for it.
    async with awaited_in_progress(6) as (server, handles, waits):
        poller = handles[0]._tracker._poller(handles[0].endpoint)
        states = [handle._state for handle in handles]
        assert poller.parsed == 0
        for handle in handles:
            server.finish(handle.task_id)
        tasks = await asyncio.gather(*waits)
    assert {task.status for task in tasks} == {TaskStatus.SUCCEED}
    assert poller.parsed == len(handles)  # one each: the end
    assert all(state.unread is None for state in states)


async def test_tasks_kept_unread_share_their_common_parts_and_read_back_whole() -> None:
    # Thousands of tasks in flight each keep the raw task of their last change:
    # the parts most of them carry alike (no result yet, no watermark) are held
    # once, shared, and each task read gets copies of its own (issue 26's bytes).
    async with awaited_in_progress(3) as (_server, handles, _waits):
        kept = [handle._state.unread[0] for handle in handles if handle._state.unread is not None]
        assert kept[0]["task_result"] is kept[1]["task_result"] is kept[2]["task_result"]
        assert kept[0]["watermark_info"] is kept[1]["watermark_info"]
        first, second = handles[0].task, handles[1].task
        assert first is not None
        assert second is not None
        assert first.status is TaskStatus.PROCESSING
        # What Kling sent for a task in progress, read back whole.
        assert first.raw["task_result"] == {"images": []}
        assert first.raw["watermark_info"] == {"enabled": False}
        assert first.raw["task_result"] is not second.raw["task_result"]
        first.raw["task_result"]["images"].append({"url": "https://x.invalid/a.png"})
        assert second.raw["task_result"] == {"images": []}
        assert kept[2]["task_result"] == {"images": []}


async def test_updates_and_a_late_reader_see_every_status() -> None:
    policy = PollPolicy(initial_delay=0.05, max_delay=0.05, learn=False, timeout=30)
    async with FakeKlingServer(
        api_key=API_KEY, task_duration=None, processing_delay=0.01
    ) as server:
        async with make_client(server, polling=policy) as client:
            watched = await client.images.generate(prompt="watched")
            awaited = await client.images.generate(prompt="awaited")
            seen: list[TaskStatus] = []

            async def follow() -> None:
                async for task in watched.updates():
                    seen.append(task.status)

            following = asyncio.ensure_future(follow())
            waiting = asyncio.ensure_future(awaited.wait())
            await eventually(lambda: TaskStatus.PROCESSING in seen)
            # Iterators want every change: it was structured as it came.
            assert watched._state.unread is None
            await eventually(lambda: awaited._state.unread is not None)
            assert awaited.status is TaskStatus.PROCESSING
            assert awaited._state.unread is None  # read once, when asked
            server.finish(watched.task_id)
            server.finish(awaited.task_id)
            await following
            assert (await waiting).status is TaskStatus.SUCCEED
    assert seen == [TaskStatus.SUBMITTED, TaskStatus.PROCESSING, TaskStatus.SUCCEED]


async def test_a_wake_up_looks_only_at_the_tasks_due() -> None:
    # Due times sit in a heap: a poller with many tasks planned far ahead and one
    # due now finds that one without going through the others.
    policy = PollPolicy(initial_delay=60.0, max_delay=60.0, learn=False, timeout=30)
    async with FakeKlingServer(api_key=API_KEY, task_duration=None, processing_delay=60) as server:
        async with make_client(server, polling=policy) as client:
            handles = [await client.images.generate(prompt=f"p{i}") for i in range(30)]
            waits = [asyncio.ensure_future(handle.wait()) for handle in handles]
            await asyncio.sleep(0)
            poller = client._tracker._poller(handles[0].endpoint)
            looked: list[str] = []
            current = poller._current

            def counting(entry: tuple[float, str]) -> Any:
                looked.append(entry[1])
                return current(entry)

            poller._current = counting  # type: ignore[method-assign]
            due = handles[7]._state
            polling._plan(due).next_poll = 0.0
            poller._push(due, polling._plan(due))
            now = asyncio.get_running_loop().time()
            assert [state.task_id for state in poller._pop_due(now)] == [due.task_id]
            # The due task, then the head of the heap: no scan of the 30.
            assert len(looked) <= 3
            assert poller._next_due() > now + 30
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
