"""Costs in ``kling-async mcp`` (issue 30): every task result carries its cost and
estimate, the session's budget refuses a create with BudgetExceededError's
fields and a next step, and a create above --confirm-above asks the user through
MCP elicitation (both the handshake-era request and the 2026-07-28 input-required
round trip) or, with a client that cannot be asked, returns the estimate and a
next_step instead of spending. The official client talks to the server in
process, over memory streams, and the server to a FakeKlingServer on loopback."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import mcp.types as mcp_types
import pytest
from mcp import Client
from mcp.client.session import ClientRequestContext

from kling_async import DEFAULT_PRICES, ImageGenerationRequest, _mcp
from kling_async import Client as KlingClient
from kling_async.testing import FakeKlingServer
from tests.helpers import API_KEY
from tests.test_mcp import data_of, fake_kling, mcp_server, online, text_of

UNIT = DEFAULT_PRICES.estimate(ImageGenerationRequest(prompt="x")).units  # one image
MODES = ["legacy", "auto"]  # the elicitation request, and the input-required round trip


@contextlib.asynccontextmanager
async def session(
    *,
    budget: Decimal | None = None,
    confirm_above: Decimal | None = None,
    answer: dict[str, Any] | None = None,
    mode: str = "auto",
    asked: list[str] | None = None,
) -> AsyncIterator[tuple[Client, FakeKlingServer]]:
    """An MCP client session on the tools over a fake Kling. ``answer`` is what
    the user answers an elicitation with (``None``: the client declares no
    elicitation); the messages shown are appended to ``asked``."""

    async def elicit(
        context: ClientRequestContext, params: mcp_types.ElicitRequestParams
    ) -> mcp_types.ElicitResult | mcp_types.ErrorData:
        if asked is not None:
            asked.append(params.message)
        assert answer is not None
        return mcp_types.ElicitResult(**answer)

    async with (
        FakeKlingServer(api_key=API_KEY, task_duration=0.1, processing_delay=0.02) as kling,
        KlingClient(API_KEY, base_url=kling.url, budget=budget) as client,
    ):
        tools = _mcp.KlingTools(
            client, out=None, default_timeout=30, offline=False, confirm_above=confirm_above
        )
        async with Client(
            _mcp.build_server(tools),
            mode=mode,
            elicitation_callback=elicit if answer is not None else None,
        ) as mcp_client:
            yield mcp_client, kling


async def test_a_task_result_reports_its_cost_and_estimate_as_the_fake_billed() -> None:
    async with session() as (client, kling):
        results = [
            await client.call_tool("generate_image", {"prompt": "a fox", "n": n}) for n in (1, 3)
        ]
        billed = kling.billed_units
    records = [data_of(result) for result in results]
    assert [r["estimate"] for r in records] == [str(UNIT), str(3 * UNIT)]
    assert sum(Decimal(r["cost"]["units"]) for r in records) == billed == 4 * UNIT


async def test_over_the_session_budget_is_a_tool_error_with_the_budget_s_fields() -> None:
    async with session(budget=3 * UNIT) as (client, kling):
        first = await client.call_tool("generate_image", {"prompt": "a fox", "n": 2})
        refused = await client.call_tool("generate_image", {"prompt": "a fox", "n": 2})
        creates = len(kling.requests_for("create"))
    assert first.is_error is False, text_of(first)
    assert refused.is_error is True
    error = data_of(refused)["error"]
    assert error["type"] == "BudgetExceededError"
    assert error["budget"] == str(3 * UNIT)
    assert error["spent"] == str(2 * UNIT)
    assert error["reserved"] == "0"
    assert error["estimate"] == str(2 * UNIT)
    assert "--max-units" in error["next_step"]
    assert "budget refused" in text_of(refused)
    assert creates == 1


async def test_concurrent_calls_never_spend_past_the_session_budget() -> None:
    async with session(budget=5 * UNIT) as (client, kling):
        results = await asyncio.gather(
            *(client.call_tool("generate_image", {"prompt": f"fox {i}"}) for i in range(12))
        )
        billed = kling.billed_units
        creates = len(kling.requests_for("create"))
    assert sum(not result.is_error for result in results) == 5
    assert creates == 5
    assert billed == 5 * UNIT


@pytest.mark.parametrize("mode", MODES)
async def test_above_the_threshold_a_client_that_can_be_asked_asks_the_user(mode: str) -> None:
    asked: list[str] = []
    yes = {"action": "accept", "content": {"confirm": True}}
    async with session(confirm_above=2 * UNIT, answer=yes, mode=mode, asked=asked) as (
        client,
        kling,
    ):
        small = await client.call_tool("generate_image", {"prompt": "a fox", "n": 2})
        assert asked == []  # at the threshold: not asked
        large = await client.call_tool("generate_image", {"prompt": "a fox", "n": 3})
        creates = len(kling.requests_for("create"))
    assert small.is_error is False, text_of(small)
    assert large.is_error is False, text_of(large)
    assert data_of(large)["status"] == "succeed"
    assert len(asked) == 1
    assert f"{3 * UNIT} units" in asked[0]
    assert creates == 2


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "answer",
    [
        {"action": "decline"},
        {"action": "cancel"},
        {"action": "accept", "content": {"confirm": False}},
    ],
    ids=["decline", "cancel", "accept-no"],
)
async def test_a_user_who_does_not_confirm_spends_nothing(
    mode: str, answer: dict[str, Any]
) -> None:
    async with session(confirm_above=2 * UNIT, answer=answer, mode=mode) as (client, kling):
        result = await client.call_tool("generate_image", {"prompt": "a fox", "n": 3})
        sent = kling.requests_for("create")
    assert result.is_error is False, text_of(result)
    data = data_of(result)
    assert data["sent"] is False
    assert data["declined"] is True
    assert data["estimate"] == str(3 * UNIT)
    assert "Nothing was sent" in data["next_step"]
    assert sent == []


@pytest.mark.parametrize("mode", MODES)
async def test_a_client_that_cannot_be_asked_gets_the_estimate_and_a_next_step(mode: str) -> None:
    async with session(confirm_above=2 * UNIT, mode=mode) as (client, kling):
        held = await client.call_tool("generate_image", {"prompt": "a fox", "n": 3})
        sent_before = len(kling.requests_for("create"))
        confirmed = await client.call_tool(
            "generate_image", {"prompt": "a fox", "n": 3, "confirm": True}
        )
        billed = kling.billed_units
    data = data_of(held)
    assert held.is_error is False
    assert data["sent"] is False
    assert data["confirmation_required"] is True
    assert data["estimate"] == str(3 * UNIT)
    assert "confirm=true" in data["next_step"]
    assert sent_before == 0
    assert data_of(confirmed)["status"] == "succeed"
    assert billed == 3 * UNIT


async def test_the_estimate_tool_says_whether_a_call_would_ask() -> None:
    async with session(confirm_above=2 * UNIT) as (client, kling):
        small = await client.call_tool(
            "estimate", {"tool": "generate_image", "arguments": {"prompt": "a", "n": 2}}
        )
        large = await client.call_tool(
            "estimate",
            {"tool": "generate_image", "arguments": {"prompt": "a", "n": 3, "confirm": True}},
        )
        sent = kling.requests_for()
    assert data_of(small)["needs_confirmation"] is False
    assert data_of(large)["needs_confirmation"] is True
    assert sent == []


async def test_the_command_takes_its_budget_and_threshold_from_options_and_environment() -> None:
    async with fake_kling() as kling:
        args, env = online(kling)
        env["KLING_MCP_MAX_UNITS"] = str(8 * UNIT)
        async with mcp_server(*args, env=env) as client:
            # Above the default threshold (50 units), and the client cannot be asked.
            held = await client.call_tool("generate_image", {"prompt": "a fox", "n": 9})
            refused = await client.call_tool(
                "generate_image", {"prompt": "a fox", "n": 9, "confirm": True}
            )
        async with mcp_server(*args, "--confirm-above", "never", env=env) as client:
            fits = await client.call_tool("generate_image", {"prompt": "a fox", "n": 8})
        sent = len(kling.requests_for("create"))
    assert data_of(held)["confirmation_required"] is True
    assert data_of(held)["confirm_above"] == "50"
    assert refused.is_error is True
    assert data_of(refused)["error"]["budget"] == str(8 * UNIT)
    assert fits.is_error is False, text_of(fits)
    assert Decimal(data_of(fits)["cost"]["units"]) == 8 * UNIT
    assert sent == 1
