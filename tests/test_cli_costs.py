"""Costs on the command line (issue 30): every task record and batch line
carries its cost and estimate, --max-units caps a command and a batch (and a
resumed batch counts what its earlier runs spent), --dry-run sends nothing, and
``kling-async costs`` adds up a journal; each against a FakeKlingServer's bill."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

from kling_async import DEFAULT_PRICES, ImageGenerationRequest
from tests.helpers import API_KEY
from tests.test_cli import invoke, threaded_server

UNIT = DEFAULT_PRICES.estimate(ImageGenerationRequest(prompt="x")).units  # one image


def online(server_url: str, *args: str) -> list[str]:
    return ["--api-key", API_KEY, "--base-url", server_url, *args]


def lines_of(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def write_requests(path: Path, sizes: list[int]) -> Path:
    path.write_text(
        "".join(json.dumps({"prompt": f"line {i}", "n": n}) + "\n" for i, n in enumerate(sizes))
    )
    return path


def test_generate_reports_the_cost_kling_billed_and_its_estimate(tmp_path: Path) -> None:
    with threaded_server() as server:
        as_json = invoke(
            *online(server.url, "--json", "generate", "a fox", "-n", "3"), "--no-download"
        )
        human = invoke(*online(server.url, "generate", "a fox", "--no-download"))
        billed = server.billed_units
    assert as_json.exit_code == 0, as_json.output
    record = json.loads(as_json.stdout)
    assert record["estimate"] == str(3 * UNIT)
    assert human.exit_code == 0, human.output
    assert f"cost: {UNIT} units deducted (estimated {UNIT})" in human.stderr
    # What the two commands report adds up to what the server billed.
    assert Decimal(record["cost"]["units"]) + UNIT == billed == 4 * UNIT


def test_generate_over_max_units_is_refused_before_sending_with_exit_3(tmp_path: Path) -> None:
    with threaded_server() as server:
        refused = invoke(
            *online(server.url, "--json", "generate", "a fox", "-n", "3", "--max-units", "20"),
            "--no-download",
        )
        human = invoke(*online(server.url, "generate", "a fox", "-n", "3", "--max-units", "20"))
        fits = invoke(
            *online(server.url, "generate", "a fox", "-n", "2", "--max-units", str(2 * UNIT)),
            "--no-download",
        )
        creates = server.requests_for("create")
    assert refused.exit_code == 3, refused.output
    # The record is stderr's last line: a warning from elsewhere in this process (the
    # fake's thread, a collected object) may come before it under load.
    assert refused.stderr.strip(), refused.output
    error = json.loads(refused.stderr.strip().splitlines()[-1])["error"]
    assert error["type"] == "BudgetExceededError"
    assert (error["budget"], error["spent"], error["reserved"]) == ("20", "0", "0")
    assert error["estimate"] == str(3 * UNIT)
    assert "--max-units" in error["next_step"]
    assert str(3 * UNIT) in error["next_step"]
    assert human.exit_code == 3
    assert "next step:" in human.stderr
    assert "--max-units" in human.stderr
    assert fits.exit_code == 0, fits.output
    assert len(creates) == 1  # only the one that fits was sent


def test_dry_run_with_max_units_sends_nothing(tmp_path: Path) -> None:
    requests = write_requests(tmp_path / "p.jsonl", [1, 2, 3])
    with threaded_server() as server:
        single = invoke(*online(server.url, "generate", "a fox", "--dry-run", "--max-units", "1"))
        batch = invoke(
            *online(server.url, "batch", str(requests), "--out", str(tmp_path / "o")),
            "--dry-run",
            "--max-units",
            "1",
        )
        sent = server.requests_for()
    assert single.exit_code == 0, single.output
    assert batch.exit_code == 0, batch.output
    assert f"total: {6 * UNIT} units" in batch.stdout
    assert sent == []
    assert not (tmp_path / "o").exists()


def test_batch_lines_carry_cost_and_the_totals_equal_what_the_server_billed(
    tmp_path: Path,
) -> None:
    requests = write_requests(tmp_path / "p.jsonl", [1, 2, 1, 3])
    out = tmp_path / "o"
    with threaded_server() as server:
        result = invoke(
            *online(server.url, "--json", "batch", str(requests), "--out", str(out)),
            "--no-download",
        )
        billed = server.billed_units
    assert result.exit_code == 0, result.output
    records = lines_of(result.stdout)
    assert [r["estimate"] for r in sorted(records, key=lambda r: r["line"])] == [
        str(n * UNIT) for n in (1, 2, 1, 3)
    ]
    deducted = sum(Decimal(r["cost"]["units"]) for r in records)
    assert deducted == billed == 7 * UNIT
    assert lines_of((out / "results.jsonl").read_text()) == sorted(records, key=lambda r: r["line"])
    assert f"units: {billed} estimated, {billed} deducted" in result.stderr


def test_max_units_is_never_exceeded_by_concurrent_lines_and_a_rerun_counts_earlier_spend(
    tmp_path: Path,
) -> None:
    requests = write_requests(tmp_path / "p.jsonl", [1] * 12)
    out = tmp_path / "o"
    budget = 5 * UNIT
    command = ["batch", str(requests), "--out", str(out), "--concurrency", "100"]
    with threaded_server() as server:
        first = invoke(*online(server.url, "--json", *command, "--max-units", str(budget)))
        billed_first = server.billed_units
        creates_first = len(server.requests_for("create"))
        again = invoke(*online(server.url, "--json", *command, "--max-units", str(budget)))
        billed_again = server.billed_units
        raised = invoke(*online(server.url, *command, "--max-units", str(8 * UNIT)))
        billed_raised = server.billed_units
    assert first.exit_code == 3, first.output
    records = lines_of(first.stdout)
    refused = [r for r in records if r["status"] == "refused"]
    assert creates_first == 5
    assert billed_first == budget
    assert len(refused) == 7
    for record in refused:
        assert record["task_id"] is None
        assert record["cost"] is None
        assert record["error"]["budget"] == str(budget)
        assert "--max-units" in record["error"]["next_step"]
    assert "7 refused by --max-units (not sent)" in first.stderr
    # The rerun counts the 5 lines' spend: nothing more fits, nothing is sent.
    assert again.exit_code == 3, again.output
    assert billed_again == billed_first
    assert sum(bool(r.get("resumed")) for r in lines_of(again.stdout)) == 5
    assert f"earlier runs: {budget} estimated, {budget} deducted" in again.stderr
    # Raised to 8 images' worth in all: 3 more lines run, the other 4 stay refused.
    assert raised.exit_code == 3, raised.output
    assert billed_raised == 8 * UNIT
    assert f"units: {8 * UNIT} estimated, {8 * UNIT} deducted" in raised.stderr
    assert f"this run: {3 * UNIT} estimated, {3 * UNIT} deducted" in raised.stderr


def test_costs_adds_up_the_journal_as_the_server_billed(tmp_path: Path) -> None:
    requests = write_requests(tmp_path / "p.jsonl", [1, 2, 3])
    out = tmp_path / "o"
    with threaded_server() as server:
        ran = invoke(
            *online(server.url, "batch", str(requests), "--out", str(out)), "--no-download"
        )
        billed = server.billed_units
    assert ran.exit_code == 0, ran.output
    journal = out / "kling-journal.db"  # beside the results file
    human = invoke("costs", "--journal", str(journal))
    as_json = invoke("--json", "costs", "--journal", str(journal), "--by", "model")
    missing = invoke("costs", "--out", str(tmp_path / "nowhere"))
    assert human.exit_code == 0, human.output
    assert f"p.jsonl: 3 tasks, {billed} units estimated, {billed} deducted" in human.stdout
    for by in ("batch", "day", "endpoint", "model", "total"):
        assert f"by {by}:" in human.stdout
    assert as_json.exit_code == 0, as_json.output
    [row] = lines_of(as_json.stdout)
    assert row["group"] == "kling-v3"
    assert Decimal(row["deducted"]) == billed == 6 * UNIT
    assert missing.exit_code == 1
    assert "no journal at" in missing.stderr


def test_costs_account_shows_the_packs_with_credentials_and_says_so_without(
    tmp_path: Path,
) -> None:
    offline = invoke("costs", "--account")
    assert offline.exit_code == 1
    assert "no account to ask" in offline.stderr
    with threaded_server() as server:
        shown = invoke(*online(server.url, "costs", "--account"))
        as_json = invoke(*online(server.url, "--json", "costs", "--account"))
        asked = [r for r in server.requests_for() if "costs" in r.path]
    assert shown.exit_code == 0, shown.output
    assert "Image Generation - simulated: 1000.0 of 1000.0 remaining (online" in shown.stdout
    assert "lag by up to 12 hours" in shown.stderr
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.stdout)
    assert "12 hours" in data["lag"]
    assert isinstance(data["packs"], list)
    # Kling answered each command (a refusal for the rate is retried, not shown).
    assert [r.code for r in asked][-1] == 0
    assert sum(r.code == 0 for r in asked) == 2
