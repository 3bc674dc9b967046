"""Everything the SDK does for an endpoint follows from its declaration.

The declared endpoints each have a typed method that submits to their path; a
synthetic endpoint (tests/synthetic_endpoint.py: a request model and a
declaration, nothing else) is served by the client, the fake server (route,
validation, results, units), the journal, the duration learner, the CLI and
the MCP server, with no other code written for it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest
from mcp import Client as McpClient
from mcp import StdioServerParameters

from kling_async import TaskStatus, ValidationError
from kling_async._durations import DurationLearner, kind_of
from kling_async._endpoints import (
    EndpointDeclaration,
    _registered,
    by_request_type,
    declarations,
)
from kling_async._frontend import known_models
from kling_async._journal import Journal
from kling_async._models import (
    Endpoint,
    ImageGenerationRequest,
    MultiImageRequest,
    OmniImageRequest,
)
from kling_async._request_bodies import request_from_body
from kling_async._resources import Images
from kling_async._schedule import Durations
from kling_async._wire import request_body
from kling_async.testing import FakeKlingServer
from tests.helpers import API_KEY, clean_env, make_client
from tests.imagedata import png
from tests.synthetic_endpoint import SKETCH, SketchRequest, declared
from tests.test_cli_endpoints import EXAMPLES, with_image

ROOT = Path(__file__).parent.parent
#: A subprocess that declares the synthetic endpoint, then runs the command line.
DECLARE_THEN_RUN = (
    "import sys; from tests.synthetic_endpoint import declare; declare(); "
    "from kling_async.cli import main; sys.argv[0] = 'kling-async'; main()"
)


def subprocess_env(**extra: str) -> dict[str, str]:
    return clean_env(PYTHONPATH=str(ROOT), **extra)


# --- the declared endpoints ------------------------------------------------------------


ALL = pytest.mark.parametrize("declaration", list(declarations()), ids=lambda d: d.cli_name)


@ALL
async def test_each_declaration_s_method_submits_to_its_path(
    declaration: EndpointDeclaration, tmp_path: Path
) -> None:
    image = tmp_path / "input.png"
    image.write_bytes(png(600, 600))
    fields = with_image(declaration, EXAMPLES[declaration.mcp_name], image)
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.05) as server:
        async with make_client(server) as client:
            handle = await getattr(client.images, declaration.method)(**fields)
            task = await handle.wait(timeout=10)
        creates = server.requests_for("create")
    assert [create.path for create in creates] == [declaration.path]
    assert handle.endpoint is declaration.endpoint
    assert task.status is TaskStatus.SUCCEED


@ALL
def test_each_declared_body_reads_back_into_its_request(
    declaration: EndpointDeclaration, tmp_path: Path
) -> None:
    # The fake judges a body by reading it back: the round trip must be exact.
    fields = dict(EXAMPLES[declaration.mcp_name])
    for name in fields:
        if name in {f.name for f in attrs.fields(declaration.request_type)}:
            value = fields[name]
            if isinstance(value, list) and value and isinstance(value[0], str):
                fields[name] = ["https://example.com/a.png"] * len(value)
            elif isinstance(value, str) and value.endswith(".png"):
                fields[name] = "https://example.com/a.png"
    request = declaration.request_type(**fields)
    assert request_from_body(declaration.request_type, request_body(request)) == request


def test_a_body_s_misspelt_or_misshapen_field_is_named_as_the_body_spells_it() -> None:
    with pytest.raises(ValidationError) as unknown:
        request_from_body(MultiImageRequest, {"subject_image_list": [], "promt": "p"})
    assert unknown.value.field == "promt"
    body = {"prompt": "p", "image_list": [{"url": "https://example.com/a.png"}]}
    with pytest.raises(ValidationError) as nested:
        request_from_body(OmniImageRequest, body)
    assert nested.value.field == "image_list[0]"
    with pytest.raises(ValidationError) as path:
        request_from_body(OmniImageRequest, {"prompt": "p", "image_list": [{"image": "a.png"}]})
    assert path.value.field == "image_list[0]"


async def test_the_fake_refuses_what_only_the_request_model_checks() -> None:
    # No wire check of the fake knows this rule (<<<image_2>>> with one image is
    # the fake's; element ids past a Java long are only the model's).
    body = {"prompt": "p", "element_list": [{"element_id": 2**63}]}
    async with FakeKlingServer(api_key=API_KEY) as server:
        answer = await post(server, "/v1/images/omni-image", body)
    assert answer["code"] == 1201
    assert "element_list[0]" in answer["message"]


def test_the_models_an_endpoint_lists_are_its_request_model_s() -> None:
    assert known_models(OmniImageRequest) == ("kling-image-o1", "kling-v3-omni")
    assert known_models(MultiImageRequest) == ("kling-v2", "kling-v2-1")
    assert known_models(SketchRequest) == ()


def test_every_declaration_has_a_typed_method_taking_its_model_s_fields() -> None:
    for declaration in declarations():
        method = getattr(Images, declaration.method)
        keywords = set(method.__code__.co_varnames[: method.__code__.co_kwonlyargcount + 2])
        fields = {field.name for field in attrs.fields(declaration.request_type)}
        assert fields <= keywords, (declaration.method, fields - keywords)


async def post(server: FakeKlingServer, path: str, body: dict[str, Any]) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.url + path, json=body, headers=headers) as response,
    ):
        answer: dict[str, Any] = await response.json()
        return answer


# --- a synthetic endpoint: a request model and a declaration, nothing else --------------


async def test_a_synthetic_endpoint_is_served_by_the_client_and_the_fake(tmp_path: Path) -> None:
    journal = tmp_path / "journal.db"
    with declared():
        async with FakeKlingServer(api_key=API_KEY, task_duration=0.05) as server:
            async with make_client(server, journal=journal) as client:
                created = await client.images.create("images/synthetic-sketch", prompt="a cat", n=2)
                task = await created.wait(timeout=10)
                submitted = await client.images.submit(SketchRequest(prompt="a dog"))
                await submitted.wait(timeout=10)
                with pytest.raises(ValidationError, match="at most 40 characters"):
                    await client.images.create(SKETCH.endpoint, prompt="x" * 41)
            # The fake's validation is the model's, answered as Kling does (1201).
            too_long = await post(server, SKETCH.path, {"prompt": "x" * 41})
            unknown = await post(server, SKETCH.path, {"prompt": "p", "seed": 3})
            creates = [c for c in server.requests_for("create") if c.code == 0]
            held = [server.task(c.json["external_task_id"]).n for c in creates]
        assert [c.path for c in creates] == [SKETCH.path] * 2
        assert creates[0].json["prompt"] == "a cat"
        assert task.status is TaskStatus.SUCCEED
        assert len(task.images) == 2
        assert held == [2, 1]  # the declared rule: n-weighted
        assert too_long["code"] == 1201
        assert "prompt" in too_long["message"]
        assert unknown["code"] == 1201
        assert "seed" in unknown["message"]
        # The journal records it and reads it back as the declared endpoint.
        reopened = Journal(journal)
        try:
            entries = {entry.external_task_id: entry for entry in await reopened.entries()}
        finally:
            await reopened.close()
        assert created.external_task_id is not None
        entry = entries[created.external_task_id]
        assert entry.endpoint is SKETCH.endpoint
        assert entry.units == 2
        assert entry.task_id == created.task_id
        # The duration learner learns it under its declared key.
        request = SketchRequest(prompt="a cat", n=2)
        assert kind_of(request)[0] == "images/synthetic-sketch"
        learner = DurationLearner()
        learner.observe(SKETCH.endpoint, learner.kind(request), 3.0)
        learned = learner.durations(SKETCH.endpoint, learner.kind(request))
        assert isinstance(learned, Durations)
        assert learned.median == pytest.approx(3.0)
    # Gone with its declaration.
    with pytest.raises(KeyError):
        by_request_type(SketchRequest)
    assert SKETCH.endpoint.value not in {e.value for e in Endpoint}


def test_a_synthetic_endpoint_gets_a_cli_command(tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", DECLARE_THEN_RUN, *args],
            capture_output=True,
            text=True,
            env=subprocess_env(),
            timeout=60,
            check=False,
        )

    shown = cli("sketch", "--help")
    assert shown.returncode == 0, shown.stderr
    assert SKETCH.title in " ".join(shown.stdout.split())
    assert " -n" in shown.stdout
    out = tmp_path / "out"
    made = cli(
        "--mock-task-seconds", "0.1", "--json", "sketch", "a cat", "-n", "2", "--out", str(out)
    )
    assert made.returncode == 0, made.stderr
    record = json.loads(made.stdout)
    assert record["status"] == "succeed"
    assert len(record["paths"]) == 2
    refused = cli("--mock-task-seconds", "0.1", "sketch", "x" * 41)
    assert refused.returncode == 2
    assert "at most 40 characters" in refused.stderr


async def test_a_synthetic_endpoint_gets_an_mcp_tool() -> None:
    with declared():
        async with FakeKlingServer(api_key=API_KEY, task_duration=0.05) as server:
            parameters = StdioServerParameters(
                command=sys.executable,
                args=["-c", DECLARE_THEN_RUN, "--base-url", server.url, "mcp"],
                env=subprocess_env(KLING_API_KEY=API_KEY),
            )
            async with McpClient(parameters, read_timeout_seconds=60) as session:
                tools = {tool.name: tool for tool in (await session.list_tools()).tools}
                # Unpriced, so the server asks first; a client without elicitation confirms so.
                arguments = {"prompt": "a cat", "n": 2, "confirm": True}
                result = await session.call_tool("sketch_image", arguments)
            creates = server.requests_for("create")
    schema = tools["sketch_image"].input_schema
    assert schema["required"] == ["prompt"]
    assert {"prompt", "n"} <= set(schema["properties"])
    assert result.is_error is not True
    assert [create.path for create in creates] == [SKETCH.path]
    assert creates[0].json["n"] == 2


async def test_create_names_its_endpoint_and_a_method_takes_only_its_own_request() -> None:
    async with FakeKlingServer(api_key=API_KEY) as server:
        async with make_client(server) as client:
            with pytest.raises(ValueError, match="is not a Kling endpoint"):
                await client.images.create("images/no-such-thing", prompt="p")
            with pytest.raises(TypeError, match="expected a OmniImageRequest"):
                await client.images.omni_image(ImageGenerationRequest(prompt="p"))  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="not both"):
                await client.images.create(
                    Endpoint.GENERATIONS, ImageGenerationRequest(prompt="p"), n=2
                )
            handle = await client.images.create(Endpoint.OMNI_IMAGE, prompt="a fox")
        assert server.requests_for("create") == server.requests_for(
            "create", endpoint="images/omni-image"
        )
    assert handle.endpoint is Endpoint.OMNI_IMAGE


def test_a_declaration_cannot_take_a_declared_name() -> None:
    taken = attrs.evolve(SKETCH, cli_name="generate")
    with pytest.raises(ValueError, match="generate"), _registered(taken):
        pass
    assert SKETCH not in list(declarations())
