"""The task commands derived from the endpoint declarations, ``--dry-run``, and
what the CLI shares with the MCP server (``_frontend``, ``KlingError.to_dict``).

The example of each endpoint is the one docs/mcp.md documents for its MCP tool
(a tool's arguments are the request's fields, which the command takes as
options): a declaration without a documented example fails here."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from kling_async import (
    APIError,
    ContentPolicyError,
    KlingError,
    Task,
    TaskFailedError,
    TaskStatus,
    TransportError,
    ValidationError,
)
from kling_async._cli import main
from kling_async._cli.options import flag_of
from kling_async._endpoints import EndpointDeclaration, by_mcp_name, declarations
from kling_async._exceptions import UnknownPriceError
from kling_async._frontend import request_fields
from kling_async._models import TaskRequest, build_request
from kling_async._pricing import DEFAULT_PRICES, Estimate
from kling_async._records import records
from tests.helpers import API_KEY, assert_valid_png
from tests.imagedata import png
from tests.test_cli import FAST, threaded_server

DOCS = Path(__file__).parent.parent / "docs" / "mcp.md"
JSON_FENCE = re.compile(r"^```json\n(.*?)^```", re.MULTILINE | re.DOTALL)


def documented_examples() -> dict[str, dict[str, Any]]:
    """The create-tool calls docs/mcp.md shows, by tool name."""
    examples: dict[str, dict[str, Any]] = {}
    for block in JSON_FENCE.findall(DOCS.read_text(encoding="utf-8")):
        data = json.loads(block)
        if isinstance(data, dict) and "tool" in data and "arguments" in data:
            examples[data["tool"]] = data["arguments"]
    return examples


EXAMPLES = documented_examples()


def with_image(
    declaration: EndpointDeclaration, fields: dict[str, Any], image: Path
) -> dict[str, Any]:
    """``fields`` with every image the example names replaced by ``image``, a real PNG."""
    fixed = dict(fields)
    for field in request_fields(declaration.request_type):
        if field.image and field.name in fixed:
            value = fixed[field.name]
            fixed[field.name] = [str(image)] * len(value) if field.many else str(image)
    return fixed


def cli_arguments(declaration: EndpointDeclaration, fields: dict[str, Any]) -> list[str]:
    """The command line that sets ``fields``, spelled as the command's options."""
    arguments = [declaration.cli_name]
    for field in request_fields(declaration.request_type):
        if field.name not in fields:
            continue
        value = fields[field.name]
        if field.name == "prompt":
            arguments.append(value)
        elif field.scalar == "boolean":
            arguments += [flag_of(field.name)] if value else []
        elif field.many:
            for item in value:
                arguments += [flag_of(field.name), str(item)]
        else:
            arguments += [flag_of(field.name), str(value)]
    return arguments


def price(request: TaskRequest) -> Estimate | UnknownPriceError:
    """What Kling's published prices say ``request`` costs, or why they cannot."""
    try:
        return DEFAULT_PRICES.estimate(request)
    except UnknownPriceError as error:
        return error


def invoke(*args: str) -> Result:
    return CliRunner(env={"COLUMNS": "200"}).invoke(main, list(args))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "input.png"
    path.write_bytes(png(600, 600))
    return path


ALL = pytest.mark.parametrize("declaration", list(declarations()), ids=lambda d: d.cli_name)


def test_every_declaration_has_a_documented_example() -> None:
    assert set(EXAMPLES) == {declaration.mcp_name for declaration in declarations()}


@ALL
def test_each_endpoint_has_its_command_with_help(declaration: EndpointDeclaration) -> None:
    assert declaration.cli_name in main.commands
    result = invoke(declaration.cli_name, "--help")
    assert result.exit_code == 0, result.output
    shown = " ".join(result.stdout.split())
    assert declaration.title in shown
    for field in request_fields(declaration.request_type):
        assert flag_of(field.name) in shown, field.name
    assert "--dry-run" in shown


@ALL
def test_each_endpoint_s_command_runs_offline_and_writes_its_images(
    declaration: EndpointDeclaration, image: Path, tmp_path: Path
) -> None:
    fields = with_image(declaration, EXAMPLES[declaration.mcp_name], image)
    out = tmp_path / "out"
    result = invoke(*FAST, "--json", *cli_arguments(declaration, fields), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "OFFLINE SIMULATION" in result.stderr
    record = json.loads(result.stdout)
    assert record["status"] == "succeed"
    assert record["images"]
    paths = [Path(path) for path in record["paths"]]
    assert len(paths) == len(record["images"]) + (
        len(record["images"]) if fields.get("watermark") else 0
    )
    for path in paths:
        assert path.parent == out
        assert_valid_png(path)
    # The task is found again by the endpoint's flag, and only by it.
    found = invoke(*FAST, "--json", "status", record["task_id"], "--endpoint", declaration.cli_name)
    assert found.exit_code == 0, found.output
    assert json.loads(found.stdout)["task_id"] == record["task_id"]


def test_a_task_of_another_endpoint_is_not_found_and_the_hint_names_the_flag(
    image: Path, tmp_path: Path
) -> None:
    declaration = by_mcp_name("omni_image")
    fields = with_image(declaration, EXAMPLES["omni_image"], image)
    created = invoke(*FAST, "--json", *cli_arguments(declaration, fields), "--no-download")
    assert created.exit_code == 0, created.output
    task_id = json.loads(created.stdout)["task_id"]
    plain = invoke(*FAST, "status", task_id)
    assert plain.exit_code == 1
    assert "Another endpoint's task only with --endpoint NAME." in plain.stderr
    listed = invoke(*FAST, "list", "--endpoint", "omni-image")
    assert listed.exit_code == 0, listed.output
    assert task_id in listed.stdout
    both = invoke(*FAST, "list", "--multi-image", "--endpoint", "omni-image")
    assert both.exit_code == 2


def test_an_invalid_field_is_named_by_its_flag_and_nothing_is_sent() -> None:
    with threaded_server() as server:
        result = invoke(
            "--api-key", API_KEY, "--base-url", server.url,
            "omni-image", "p", "--series-amount", "3",
        )  # fmt: skip
        assert server.requests_for("create") == []
    assert result.exit_code == 2
    assert "invalid --series-amount: applies to result_type 'series' only; nothing was sent" in (
        " ".join(result.stderr.split())
    )


@pytest.mark.parametrize("value", ["auto", "4"])
def test_series_amount_takes_a_number_or_auto(value: str) -> None:
    result = invoke(
        *FAST, "--json", "omni-image", "p", "--model", "kling-v3-omni", "--result-type",
        "series", "--series-amount", value, "--aspect-ratio", "1:1", "--dry-run",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    refused = invoke(*FAST, "omni-image", "p", "--series-amount", "many", "--dry-run")
    assert refused.exit_code == 2
    assert "many" in refused.stderr


# --- --dry-run ---------------------------------------------------------------------------


@ALL
def test_dry_run_prints_the_estimate_and_sends_nothing(
    declaration: EndpointDeclaration, image: Path
) -> None:
    fields = with_image(declaration, EXAMPLES[declaration.mcp_name], image)
    request = build_request(declaration.request_type, fields)
    with threaded_server() as server:
        result = invoke(
            "--api-key", API_KEY, "--base-url", server.url, "--json",
            *cli_arguments(declaration, fields), "--dry-run",
        )  # fmt: skip
        assert server.requests_for() == []  # not even a lookup
    expected = price(request)
    if isinstance(expected, UnknownPriceError):
        assert result.exit_code == 1
        assert json.loads(result.stderr)["error"]["type"] == "UnknownPriceError"
        assert str(expected) in json.loads(result.stderr)["error"]["message"]
        return
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["dry_run"] is True
    assert record["estimate"]["units"] == str(expected.units)
    assert record["estimate"]["money"] == str(expected.money)


def test_batch_dry_run_prints_each_line_and_the_total_and_sends_nothing(
    image: Path, tmp_path: Path
) -> None:
    lines = []
    priced = []
    for declaration in declarations():
        fields = with_image(declaration, EXAMPLES[declaration.mcp_name], image)
        lines.append(json.dumps({"endpoint": declaration.cli_name, **fields}))
        expected = price(build_request(declaration.request_type, fields))
        priced.append(None if isinstance(expected, UnknownPriceError) else expected)
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    with threaded_server() as server:
        human = invoke("--api-key", API_KEY, "--base-url", server.url, "batch", str(requests),
                       "--out", str(out), "--dry-run")  # fmt: skip
        machine = invoke("--api-key", API_KEY, "--base-url", server.url, "--json", "batch",
                         str(requests), "--out", str(out), "--dry-run")  # fmt: skip
        assert server.requests_for() == []
    assert not out.exists()  # no journal, no results file: nothing to resume
    unpriced = priced.count(None)
    assert human.exit_code == machine.exit_code == (1 if unpriced else 0), human.output
    for number, estimate in enumerate(priced, start=1):
        line = next(
            text for text in human.stdout.splitlines() if text.startswith(f"line {number}:")
        )
        assert ("no estimate" in line) is (estimate is None)
        if estimate is not None:
            assert f": {estimate.units} units" in line
    records = [json.loads(text) for text in machine.stdout.splitlines()]
    total = records[-1]["total"]
    units = sum(estimate.units for estimate in priced if estimate is not None)
    assert total["units"] == str(units)
    assert total["requests"] == len(lines)
    assert total["unpriced"] == unpriced
    assert total["complete"] is (unpriced == 0)
    assert [record["line"] for record in records[:-1]] == list(range(1, len(lines) + 1))
    assert "lower bound" in human.stdout or not unpriced


def test_batch_dry_run_of_priced_lines_exits_0(tmp_path: Path) -> None:
    requests = tmp_path / "requests.jsonl"
    requests.write_text('"a fox"\n{"prompt": "two foxes", "n": 2}\n', encoding="utf-8")
    result = invoke(*FAST, "--json", "batch", str(requests), "--out", str(tmp_path / "o"),
                    "--dry-run")  # fmt: skip
    assert result.exit_code == 0, result.output
    total = json.loads(result.stdout.splitlines()[-1])["total"]
    one = DEFAULT_PRICES.estimate(build_request(by_mcp_name("generate_image").request_type,
                                                {"prompt": "a fox"}))  # fmt: skip
    assert total["units"] == str(one.units * 3)
    assert total["complete"] is True


# --- what the front ends share ----------------------------------------------------------


def _errors() -> list[KlingError]:
    task = Task(task_id="t1", status=TaskStatus.FAILED, status_message="refused")
    return [
        KlingError("plain"),
        ValidationError("n", "must be between 1 and 9; got 12"),
        TaskFailedError(task),
        APIError("boom", code=5000, request_id="r1", http_status=500),
        ContentPolicyError("no", code=1301, request_id="r2", http_status=400),
        TransportError("reset"),
        UnknownPriceError("images/omni-image", "m", "1k", "the table"),
    ]


@pytest.mark.parametrize("error", _errors(), ids=lambda error: type(error).__name__)
def test_kling_error_to_dict_is_the_export_form(error: KlingError) -> None:
    # The front ends use to_dict, batch results the records converter: one shape.
    assert error.to_dict() == records.unstructure(error, KlingError)
    assert error.to_dict()["type"] == type(error).__name__
    assert json.loads(json.dumps(error.to_dict())) == error.to_dict()


@pytest.mark.parametrize(
    ("imported", "absent"),
    [
        ("kling_async._cli", ("kling_async._mcp", "mcp")),
        ("kling_async._mcp", ("kling_async._cli",)),
        ("kling_async._frontend", ("kling_async._cli", "kling_async._mcp", "click", "mcp")),
    ],
)
def test_neither_front_end_imports_the_other(imported: str, absent: tuple[str, ...]) -> None:
    code = f"import sys, {imported}; print(sorted(m for m in sys.modules if m in {absent!r}))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


def test_batch_runs_a_line_of_every_endpoint_and_a_rerun_creates_none(
    image: Path, tmp_path: Path
) -> None:
    lines = [
        json.dumps(
            {
                "endpoint": declaration.cli_name,
                **with_image(declaration, EXAMPLES[declaration.mcp_name], image),
            }
        )
        for declaration in declarations()
    ]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    with threaded_server() as server:
        online = ("--api-key", API_KEY, "--base-url", server.url, "--json", "batch")
        first = invoke(*online, str(requests), "--out", str(out))
        again = invoke(*online, str(requests), "--out", str(out))
        creates = server.requests_for("create")
    assert first.exit_code == 0, first.output
    assert again.exit_code == 0, again.output
    assert sorted(request.endpoint or "" for request in creates) == sorted(
        declaration.endpoint.value for declaration in declarations()
    )
    records = [json.loads(text) for text in (out / "results.jsonl").read_text().splitlines()]
    assert [record["line"] for record in records] == list(range(1, len(lines) + 1))
    for record in records:
        assert record["status"] == "succeed", record
        assert record["paths"]
        for path in record["paths"]:
            assert_valid_png(Path(path))
    assert all(json.loads(text).get("resumed") for text in again.stdout.splitlines())
