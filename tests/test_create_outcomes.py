"""Issue 24, the create path: every create ends in an outcome its caller is told.

Each test reproduces one of ../shared/review/core/ (c03, c05, c08, c10, c13) over
loopback and checks the fake server's own record: ambiguity leads to a lookup,
resume() leaves live creates alone, user-supplied ledgers and limiters cannot
strand a create, units are held once per task, and a task Kling no longer knows
ends as an outcome that gives its units back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import traceback
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

import kling_async
from kling_async import (
    ConcurrencyLimiter,
    EntryState,
    ImageGenerationRequest,
    Journal,
    KlingError,
    LedgerEntry,
    MemoryLedger,
    TaskNotFoundError,
)
from kling_async.testing import FakeKlingServer
from tests.helpers import API_KEY, eventually, fake_server_process, make_client

STEP = 5.0  # no outcome within this is a hang


def fast_limiter(capacity: int) -> ConcurrencyLimiter:
    return ConcurrencyLimiter(capacity, min_cooldown=0.02, fairness_window=0.1)


# --- c03: resume() racing a live create; "already exists" for our own id -------------------


async def test_resume_leaves_a_create_live_in_this_process_alone(tmp_path: Path) -> None:
    journal = tmp_path / "journal.db"
    async with FakeKlingServer(api_key=API_KEY, task_duration=5) as server:
        server.inject("delay", route="create", delay=0.5, times=1)  # a slow answer
        async with make_client(server, journal=journal) as client:
            live = asyncio.ensure_future(
                client.images.generate(prompt="a red fox", external_task_id="ext-live")
            )
            await eventually(lambda: server.requests_for("create"))
            resumed = await asyncio.wait_for(client.resume(), STEP)
            handle = await asyncio.wait_for(live, STEP)
            entry = await client.ledger.get("ext-live")
    assert resumed == []  # not left behind by a crash: its caller gets it
    assert [task.task_id for task in server.tasks.values()] == [handle.task_id]
    assert len(server.requests_for("create")) == 1  # resume() sent nothing
    assert entry is not None
    assert (entry.state, entry.task_id) == (EntryState.CREATED, handle.task_id)


async def test_already_exists_for_our_own_id_is_looked_up(server: FakeKlingServer) -> None:
    # Another process (or a run before a crash) created this id: Kling answers
    # "external_task_id already exists". The task is ours: hand it over.
    async with make_client(server) as first, make_client(server) as second:
        made = await first.images.generate(prompt="p", external_task_id="ext-twice")
        again = await asyncio.wait_for(
            second.images.generate(prompt="p", external_task_id="ext-twice"), STEP
        )
    assert again.task_id == made.task_id
    assert len(server.tasks) == 1
    assert [r.code for r in server.requests_for("create")] == [0, 1201]
    assert server.requests_for("get")  # the lookup


# --- c05: an unreadable 2xx answer to a create ------------------------------------------------


@pytest.fixture
async def cutting_proxy(server: FakeKlingServer) -> AsyncIterator[str]:
    """A gateway in front of the fake server that cuts the first create's answer
    short after Kling acted on it (HTTP 200, half a JSON body)."""
    cut = {"done": False}
    async with aiohttp.ClientSession() as upstream:

        async def forward(request: web.Request) -> web.Response:
            body = await request.read()
            headers = {
                k: v
                for k, v in request.headers.items()
                if k.lower() in ("authorization", "content-type")
            }
            async with upstream.request(
                request.method,
                server.url + str(request.rel_url),
                data=body or None,
                headers=headers,
            ) as answer:
                data = await answer.read()
            if request.method == "POST" and not cut["done"]:
                cut["done"] = True
                return web.Response(status=200, body=data[: len(data) // 2])
            return web.Response(status=answer.status, body=data)

        app = web.Application()
        app.router.add_route("*", "/{path:.*}", forward)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            yield f"http://127.0.0.1:{runner.addresses[0][1]}"
        finally:
            await runner.cleanup()


async def test_a_create_answered_200_with_a_cut_body_is_looked_up(
    server: FakeKlingServer, cutting_proxy: str, tmp_path: Path
) -> None:
    async with make_client(server, base_url=cutting_proxy, journal=tmp_path / "j.db") as client:
        handle = await asyncio.wait_for(client.images.generate(prompt="p"), STEP)
        entry = await client.ledger.get(handle.external_task_id or "")
    assert [task.task_id for task in server.tasks.values()] == [handle.task_id]
    assert len(server.requests_for("create")) == 1  # found by the lookup, not sent again
    assert server.requests_for("get")
    assert entry is not None
    assert entry.task_id == handle.task_id


async def test_a_create_answered_with_an_html_page_is_looked_up_then_sent_again(
    client: kling_async.Client, server: FakeKlingServer
) -> None:
    page = b"<html><body>502 Bad Gateway... or is it</body></html>"
    server.inject("garbage", route="create", http_status=200, body=page, times=1)
    handle = await asyncio.wait_for(client.images.generate(prompt="p"), STEP)
    assert [task.task_id for task in server.tasks.values()] == [handle.task_id]
    assert server.requests_for("get")  # looked up before sending again (same id)


# --- c10: a user's ledger or limiter that raises --------------------------------------------


class FailsOnCreated(MemoryLedger):
    def record(self, entry: LedgerEntry) -> None:
        if entry.state is EntryState.CREATED:
            raise OSError(28, "No space left on device")
        super().record(entry)


class AlwaysFails(MemoryLedger):
    def record(self, entry: LedgerEntry) -> None:
        raise OSError(28, "No space left on device")


class FlushFails(MemoryLedger):
    async def flush(self) -> None:
        raise OSError(5, "Input/output error")


class RaisingLimiter(ConcurrencyLimiter):
    """A custom limiter whose bookkeeping hooks fail."""

    def created(self, units: int) -> None:
        raise RuntimeError("limiter backend down")

    def observe(self, error: KlingError) -> None:
        raise RuntimeError("limiter backend down")


async def test_a_ledger_failing_on_the_created_entry_still_gives_the_handle(
    server: FakeKlingServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with make_client(server, ledger=FailsOnCreated()) as client:
        handle = await asyncio.wait_for(client.images.generate(prompt="p"), STEP)
        assert (await asyncio.wait_for(handle.wait(), STEP)).task_id in server.tasks
    assert any("record() failed" in r.getMessage() for r in caplog.records)


async def test_a_ledger_failing_every_time_fails_the_create_with_its_id(
    server: FakeKlingServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(server, ledger=AlwaysFails())
    with pytest.raises(KlingError) as caught:
        await asyncio.wait_for(client.images.generate(prompt="p", external_task_id="e1"), STEP)
    await asyncio.wait_for(client.close(), STEP)
    assert caught.value.external_task_id == "e1"
    assert caught.value.create_outcome == "nothing was sent"
    assert not server.tasks  # the intent was not recorded: nothing was sent
    assert any("unexpected error in the create" in r.getMessage() for r in caplog.records)


async def test_a_ledger_that_cannot_flush_fails_the_create_before_sending(
    server: FakeKlingServer,
) -> None:
    async with make_client(server, ledger=FlushFails()) as client:
        with pytest.raises(KlingError) as caught:
            await asyncio.wait_for(client.images.generate(prompt="p", external_task_id="e2"), STEP)
    assert (caught.value.external_task_id, caught.value.create_outcome) == (
        "e2",
        "nothing was sent",
    )
    assert isinstance(caught.value.__cause__, OSError)
    assert not server.requests_for("create")


async def test_a_limiter_whose_hooks_raise_cannot_strand_a_create(
    server: FakeKlingServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    server.inject("error", route="create", code=1302, times=1)  # observe() is called
    limiter = RaisingLimiter(2, min_cooldown=0.02)
    async with make_client(server, max_concurrency=limiter) as client:
        handle = await asyncio.wait_for(client.images.generate(prompt="p"), STEP)
        await asyncio.wait_for(handle.wait(), STEP)
        await eventually(lambda: limiter.in_use == 0)
    assert handle.task_id in server.tasks
    failed = {r.getMessage() for r in caplog.records}
    assert "RaisingLimiter.observe() failed; the create goes on" in failed
    assert "RaisingLimiter.created() failed; the create goes on" in failed


# --- c08: two creates settling on one task hold its units once ------------------------------


class RemembersIntents(MemoryLedger):
    """A ledger read a moment ago: it still lists a create that has since settled
    (what a second resume() or a batch rerun over one journal can see)."""

    def __init__(self) -> None:
        super().__init__()
        self.intents: dict[str, LedgerEntry] = {}

    def record(self, entry: LedgerEntry) -> None:
        if entry.state is EntryState.INTENDED:
            self.intents[entry.external_task_id] = entry
        super().record(entry)

    async def unsettled(self) -> list[LedgerEntry]:
        return list(self.intents.values())


async def test_a_task_settled_twice_holds_its_units_once() -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.3) as server:
        limiter = fast_limiter(2)
        async with make_client(
            server, max_concurrency=limiter, ledger=RemembersIntents()
        ) as client:
            handle = await client.images.generate(prompt="p")
            [again] = await asyncio.wait_for(client.resume(), STEP)  # looks the id up: found
            assert again.task_id == handle.task_id
            assert not handle.done()
            assert limiter.in_use == 1  # one task, held once
            await asyncio.wait_for(handle.wait(), STEP)
            await eventually(lambda: limiter.in_use == 0)
            assert limiter.running == 0
            bigger = await asyncio.wait_for(client.images.generate(prompt="q", n=2), STEP)
            await asyncio.wait_for(bigger.wait(), STEP)
    assert len(server.tasks) == 2


# --- c13: a task Kling no longer knows is an outcome ----------------------------------------


async def created_elsewhere(journal: Path, count: int) -> list[str]:
    """Tasks journaled as created on a server that is then gone (another account,
    a purge, the offline simulation after SIGKILL): their entries stay unsettled."""
    async with FakeKlingServer(api_key=API_KEY, task_duration=None) as first:
        async with make_client(first, journal=journal) as client:
            handles = [await client.images.generate(prompt=f"p{i}") for i in range(count)]
    return [handle.task_id for handle in handles]


async def test_resumed_tasks_the_server_forgot_end_and_give_their_units_back(
    tmp_path: Path,
) -> None:
    journal = tmp_path / "journal.db"
    forgotten = await created_elsewhere(journal, 2)
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.1) as second:
        limiter = fast_limiter(2)
        async with make_client(second, journal=journal, max_concurrency=limiter) as client:
            handles = await asyncio.wait_for(client.resume(), STEP)
            assert sorted(h.task_id for h in handles) == sorted(forgotten)
            outcomes = await asyncio.wait_for(
                asyncio.gather(*(h.wait() for h in handles), return_exceptions=True), STEP
            )
            assert all(isinstance(outcome, TaskNotFoundError) for outcome in outcomes)
            error = outcomes[0]
            assert isinstance(error, TaskNotFoundError)
            assert isinstance(error, kling_async.NotFoundError)
            assert (error.code, error.http_status) == (1203, 404)
            assert error.task_id in forgotten
            assert error.external_task_id is not None
            assert all(h.done() for h in handles)
            assert limiter.in_use == 0
            after = await asyncio.wait_for(client.images.generate(prompt="after", n=2), STEP)
            await asyncio.wait_for(after.wait(), STEP)
            assert await client.resume() == []  # settled: nothing left to resume
    read = Journal(journal)
    entries = [await read.get(h.external_task_id or "") for h in handles]
    await read.close()
    assert [entry.state if entry else None for entry in entries] == [EntryState.GONE] * 2


async def test_a_batch_rerun_reports_forgotten_tasks_and_goes_on(tmp_path: Path) -> None:
    journal = tmp_path / "journal.db"
    requests = [ImageGenerationRequest(prompt=f"p{i}") for i in range(3)]
    async with FakeKlingServer(api_key=API_KEY, task_duration=None) as first:
        async with make_client(first, max_concurrency=fast_limiter(9)) as client:
            # Tasks never end on this server: stop the batch once both exist.
            running = asyncio.ensure_future(client.batch(requests[:2], journal=journal).collect())
            await eventually(lambda: len(first.tasks) == 2)
            await asyncio.sleep(0.1)  # their answers reach the journal
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.05) as second:
        async with make_client(second, max_concurrency=fast_limiter(2)) as client:
            results = await asyncio.wait_for(
                client.batch(requests, journal=journal).collect(), STEP
            )
            again = await asyncio.wait_for(client.batch(requests, journal=journal).collect(), STEP)
    assert [type(r.error).__name__ for r in results] == ["TaskNotFoundError"] * 2 + ["NoneType"]
    assert results[2].ok
    assert [type(r.error).__name__ for r in again[:2]] == ["TaskNotFoundError"] * 2
    assert len(second.tasks) == 1  # the forgotten lines were not created again
    assert results[0].to_dict()["error"]["type"] == "TaskNotFoundError"


async def test_one_not_found_answer_is_asked_again_before_settling(
    client: kling_async.Client, server: FakeKlingServer
) -> None:
    # A task an instant old may not be visible yet: one 1203 is not the end.
    handle = await client.images.generate(prompt="p")
    server.inject("error", route="get", code=1203, times=1)
    task = await asyncio.wait_for(handle.wait(), STEP)
    assert task.task_id == handle.task_id


def test_cli_resume_says_a_forgotten_task_is_gone_and_what_to_do(tmp_path: Path) -> None:
    journal = tmp_path / "kling-journal.db"
    [task_id] = asyncio.run(created_elsewhere(journal, 1))
    with fake_server_process(api_key=API_KEY) as other:  # knows none of those tasks
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "kling_async",
                "--base-url",
                other.url,
                "resume",
                str(journal),
                "--timeout",
                "20",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "KLING_API_KEY": API_KEY},
        )
    assert done.returncode == 0, done.stderr
    message = " ".join(done.stderr.split())
    assert f"task {task_id}" in message
    assert "settled as gone" in message
    assert "check --base-url" in message


async def test_a_batch_meeting_a_create_live_in_this_process_follows_it(
    tmp_path: Path,
) -> None:
    # Two runs of one batch over one journal in one process: the second finds
    # the first's create on the wire and follows it instead of sending it again.
    requests = [ImageGenerationRequest(prompt="p")]
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.1) as server:
        server.inject("delay", route="create", delay=0.5, times=1)
        async with make_client(server, journal=tmp_path / "j.db") as client:
            journal = client.ledger
            assert isinstance(journal, Journal)
            first = asyncio.ensure_future(client.batch(requests, journal=journal).collect())
            await eventually(lambda: server.requests_for("create"))
            second = await asyncio.wait_for(client.batch(requests, journal=journal).collect(), STEP)
            [result] = await asyncio.wait_for(first, STEP)
            assert not isinstance(client.limiter, ConcurrencyLimiter) or client.limiter.in_use == 0
    assert len(server.requests_for("create")) == 1
    assert second[0].ok
    assert result.ok
    assert second[0].task is not None
    assert result.task is not None
    assert second[0].task.task_id == result.task.task_id


async def test_a_gone_task_read_back_says_why_once(tmp_path: Path) -> None:
    journal = tmp_path / "journal.db"
    await created_elsewhere(journal, 1)
    async with FakeKlingServer(api_key=API_KEY) as second:
        async with make_client(second, journal=journal) as client:
            [handle] = await client.resume()
            with pytest.raises(TaskNotFoundError) as live:
                await asyncio.wait_for(handle.wait(), STEP)
        read = Journal(journal)
        [entry] = [e for e in await read.entries() if e.state is EntryState.GONE]
        await read.close()
    text = str(live.value)
    assert text.count(TaskNotFoundError.hint) == 1
    assert entry.error is not None
    assert TaskNotFoundError.hint not in entry.error
    assert f"task {handle.task_id}" in entry.error


async def test_waiting_again_on_a_gone_task_gets_a_fresh_error(tmp_path: Path) -> None:
    journal = tmp_path / "journal.db"
    await created_elsewhere(journal, 1)
    async with FakeKlingServer(api_key=API_KEY) as second:
        async with make_client(second, journal=journal) as client:
            [handle] = await client.resume()
            errors = []
            for _ in range(50):
                with pytest.raises(TaskNotFoundError) as caught:
                    await asyncio.wait_for(handle.wait(), STEP)
                errors.append(caught.value)
    depth = [len(traceback.extract_tb(error.__traceback__)) for error in errors]
    assert max(depth) == depth[-1] < 10  # no traceback grows with each wait
    assert errors[-1].task_id == handle.task_id
    assert errors[-1].external_task_id == handle.external_task_id


# --- issue 27: the Ledger protocol declares all that callers rely on -------------------------


class BareLedger(MemoryLedger):
    """A ledger that only tracks creates, from kling_async.Ledger's defaults."""


class DurableMemory(MemoryLedger):
    """A ledger that asks to be kept current with results (records_results)."""

    records_results = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[LedgerEntry] = []

    def record(self, entry: LedgerEntry) -> None:
        self.seen.append(entry)
        super().record(entry)


class Undeclared:
    """A structural ledger that leaves out records_results."""

    def record(self, entry: LedgerEntry) -> None: ...

    async def flush(self) -> None: ...

    async def get(self, external_task_id: str) -> LedgerEntry | None:
        return None

    async def by_key(self, key: str) -> LedgerEntry | None:
        return None

    async def unsettled(self) -> list[LedgerEntry]:
        return []

    async def close(self) -> None: ...


def test_every_ledger_declares_whether_it_records_results() -> None:
    assert kling_async.Ledger.records_results.__doc__  # documented on the protocol
    assert MemoryLedger.records_results is False
    assert BareLedger.records_results is False
    assert Journal.records_results is True


def test_a_ledger_without_records_results_is_refused_up_front(server: FakeKlingServer) -> None:
    with pytest.raises(kling_async.ConfigurationError, match="records_results"):
        make_client(server, ledger=Undeclared())


async def test_a_ledger_that_records_results_sees_the_terminal_status(
    server: FakeKlingServer,
) -> None:
    ledger = DurableMemory()
    async with make_client(server, ledger=ledger) as client:
        handle = await client.images.generate(prompt="a lighthouse")
        await asyncio.wait_for(handle, STEP)
    assert [entry.state for entry in ledger.seen][-1] is EntryState.TERMINAL
    assert ledger.seen[-1].status == "succeed"
