"""Issue 29: every Kling image endpoint declared once, validated before sending,
served by the fake as Kling's reference pages show it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import kling_async
from kling_async import (
    Client,
    Endpoint,
    ExpandRequest,
    ImageGenerationRequest,
    MultiImageRequest,
    MultiShotRequest,
    OmniImageRequest,
    RateLimitError,
    ServerError,
    TaskStatus,
    UnitsRule,
    ValidationError,
    VirtualTryOnRequest,
    declaration_for,
    declarations,
    request_from_mapping,
)
from kling_async._endpoints import by_cli_name, by_mcp_name, by_path, by_request_type
from kling_async._resources import Images
from kling_async._sync_endpoints import wait_before
from kling_async.testing import FakeKlingServer
from tests.helpers import API_KEY, make_client
from tests.imagedata import png

URL = "https://example.com/a.png"
URL2 = "https://example.com/b.png"
# Kling's own example ratios: 100x100 at 3x the area, 16:9. (Any: they are spread as keyword
# arguments beside fields of other types.)
RATIOS: dict[str, Any] = {
    "up_expansion_ratio": 0.1495,
    "down_expansion_ratio": 0.1495,
    "left_expansion_ratio": 0.6547,
    "right_expansion_ratio": 0.6547,
}


# --- the declarations ---------------------------------------------------------------------


def test_each_endpoint_is_declared_once_and_found_by_every_name() -> None:
    declared = list(declarations())
    assert [d.endpoint for d in declared] == list(Endpoint)
    for declaration in declared:
        assert declaration_for(declaration.endpoint) is declaration
        assert declaration_for(declaration.endpoint.value) is declaration
        assert by_path(declaration.path) is declaration
        assert by_path(declaration.path + "/task-1") is declaration
        assert by_request_type(declaration.request_type) is declaration
        assert by_cli_name(declaration.cli_name) is declaration
        assert by_mcp_name(declaration.mcp_name) is declaration
        assert declaration.request_type.endpoint is declaration.endpoint
    for names in ("cli_name", "mcp_name", "method", "duration_key"):
        values = [getattr(d, names) for d in declared]
        assert len(set(values)) == len(values), names
    with pytest.raises(KeyError):
        by_path("/v1/videos/text2video")


def test_the_first_two_endpoints_keep_their_names_and_values() -> None:
    assert Endpoint.GENERATIONS.value == "images/generations"
    assert Endpoint.MULTI_IMAGE.value == "images/multi-image2image"
    assert by_request_type(ImageGenerationRequest(prompt="p")).cli_name == "generate"
    assert by_mcp_name("multi_image").request_type is MultiImageRequest


def test_client_resources_exist_for_every_declaration() -> None:
    for declaration in declarations():
        assert callable(getattr(Images, declaration.method))


@pytest.mark.parametrize(
    ("request_", "held"),
    [
        (ImageGenerationRequest(prompt="p", n=3), 3),
        (ExpandRequest(image=URL, n=4, **RATIOS), 4),
        (OmniImageRequest(prompt="p", n=2), 2),
        (
            OmniImageRequest(
                prompt="p", model_name="kling-v3-omni", images=[URL], result_type="series"
            ),
            4,
        ),
        (
            OmniImageRequest(
                prompt="p",
                model_name="kling-v3-omni",
                images=[URL],
                result_type="series",
                series_amount=6,
            ),
            6,
        ),
        (
            OmniImageRequest(
                prompt="p",
                model_name="kling-v3-omni",
                images=[URL],
                result_type="series",
                series_amount="auto",
            ),
            9,
        ),
        (MultiShotRequest(element_frontal_image=URL), 1),
        (VirtualTryOnRequest(human_image=URL, cloth_image=URL2), 1),
    ],
)
def test_units_held_follow_the_declared_rule(request_: Any, held: int) -> None:
    assert by_request_type(request_).units.held(request_) == held


def test_an_auto_series_gives_back_what_it_did_not_produce() -> None:
    request = OmniImageRequest(
        prompt="p", model_name="kling-v3-omni", images=[URL], result_type="series",
        series_amount="auto",
    )  # fmt: skip
    units = by_request_type(request).units
    assert units.rule is UnitsRule.PER_IMAGE_PRODUCED
    images = tuple(kling_async.ImageResult(index=i, url=f"u{i}") for i in range(3))
    task = kling_async.Task(task_id="t", status=TaskStatus.SUCCEED, images=images)
    assert (units.held(request), units.used(request, task)) == (9, 3)
    assert by_request_type(VirtualTryOnRequest).units.pack == "try-on"


# --- validation before sending ---------------------------------------------------------------

INVALID: list[tuple[Callable[[], object], str, str]] = [
    (lambda: OmniImageRequest(prompt="<<<image_2>>>", images=[URL]), "prompt", "image_2"),
    (lambda: OmniImageRequest(prompt="<<<image_1>>>"), "prompt", "no images"),
    (lambda: OmniImageRequest(prompt="<<<element_1>>>", images=[URL]), "prompt", "element_ids"),
    (lambda: OmniImageRequest(prompt="p", resolution="4k"), "resolution", "1k, 2k"),
    (
        lambda: OmniImageRequest(prompt="p", resolution="8k"),  # type: ignore[arg-type]  # invalid on purpose
        "resolution",
        "1k, 2k, 4k",
    ),
    (lambda: OmniImageRequest(prompt="p", result_type="series"), "result_type", "kling-v3-omni"),
    (lambda: OmniImageRequest(prompt="p", series_amount=3), "series_amount", "series"),
    (
        lambda: OmniImageRequest(
            prompt="p", model_name="kling-v3-omni", images=[URL], result_type="series", n=2
        ),
        "n",
        "single",
    ),
    (
        lambda: OmniImageRequest(
            prompt="p",
            model_name="kling-v3-omni",
            images=[URL],
            result_type="series",
            series_amount=10,
        ),
        "series_amount",
        "2 and 9",
    ),
    (lambda: OmniImageRequest(prompt="p", model_name="kling-v3-omni"), "aspect_ratio", "auto"),
    (
        lambda: OmniImageRequest(prompt="p", aspect_ratio="5:4"),  # type: ignore[arg-type]  # invalid on purpose
        "aspect_ratio",
        "auto",
    ),
    (lambda: OmniImageRequest(prompt="p", images=[URL] * 6, element_ids=[1] * 5), "images", "10"),
    (lambda: OmniImageRequest(prompt=""), "prompt", "empty"),
    (
        lambda: ExpandRequest(image=URL, **{**RATIOS, "up_expansion_ratio": 2.5}),
        "up_expansion_ratio",
        "0 and 2",
    ),
    (
        lambda: ExpandRequest(image=URL, **{**RATIOS, "left_expansion_ratio": -0.1}),
        "left_expansion_ratio",
        "0 and 2",
    ),
    (
        lambda: ExpandRequest(image=URL, **{**RATIOS, "up_expansion_ratio": 0.5}),
        "expansion ratios",
        "3",
    ),
    (lambda: ExpandRequest(image=URL, **RATIOS, n=10), "n", "1 and 9"),
    (lambda: ExpandRequest(image=None, **RATIOS), "image", "required"),  # type: ignore[arg-type]
    (
        lambda: MultiShotRequest(element_frontal_image="ftp://x/a.png"),
        "element_frontal_image",
        "ftp",
    ),
    (lambda: VirtualTryOnRequest(human_image=URL, cloth_image=None), "cloth_image", "required"),  # type: ignore[arg-type]
    (
        lambda: request_from_mapping({"endpoint": "videos/x", "prompt": "p"}),
        "endpoint",
        "omni-image",
    ),
]


@pytest.mark.parametrize(("build", "field", "says"), INVALID)
def test_invalid_requests_name_the_field_and_the_rule(
    build: Callable[[], object], field: str, says: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        build()
    assert caught.value.field == field
    assert says in caught.value.rule


def test_the_capability_map_allows_what_it_lists() -> None:
    # 3.0 Omni: 4K, series (auto), auto ratio once there is a reference.
    OmniImageRequest(
        prompt="<<<image_1>>> on a beach", model_name="kling-v3-omni", images=[URL],
        resolution="4k", result_type="series", series_amount="auto",
    )  # fmt: skip
    OmniImageRequest(prompt="p", model_name="kling-v3-omni", aspect_ratio="1:1", resolution="4k")
    OmniImageRequest(prompt="p <<<element_1>>>", element_ids=[829836802793406551])
    # O1: text-to-image with Kling's default "auto" ratio.
    OmniImageRequest(prompt="p", resolution="2k")
    ExpandRequest(image=URL, **RATIOS)  # Kling's own example, 2.9999x the area
    ExpandRequest(
        image=URL,
        up_expansion_ratio=0,
        down_expansion_ratio=0,
        left_expansion_ratio=2,
        right_expansion_ratio=0,
    )


async def test_an_invalid_request_sends_nothing(server: FakeKlingServer, client: Client) -> None:
    with pytest.raises(ValidationError):
        await client.images.omni_image(prompt="p", model_name="kling-image-o1", resolution="4k")
    with pytest.raises(ValidationError):
        await client.images.expand(image=URL, **{**RATIOS, "down_expansion_ratio": 1.0})
    with pytest.raises(TypeError):
        await client.images.expand(ExpandRequest(image=URL, **RATIOS), n=2)
    assert server.requests_for("create") == []


# --- end to end against the fake -------------------------------------------------------------


async def test_omni_image_series_end_to_end(
    server: FakeKlingServer, client: Client, tmp_path: Path
) -> None:
    handle = await client.images.omni_image(
        prompt="<<<image_1>>> in four seasons",
        model_name="kling-v3-omni",
        images=[png(400, 400)],
        result_type="series",
        series_amount=4,
        resolution="4k",
    )
    assert handle.endpoint is Endpoint.OMNI_IMAGE
    task = await handle
    assert task.result_type == "series"
    assert len(task.series_images) == 4
    assert task.images == task.series_images
    (sent,) = server.requests_for("create")
    assert sent.path == "/v1/images/omni-image"
    assert sent.json["result_type"] == "series"
    assert sent.json["series_amount"] == 4
    assert "n" not in sent.json
    assert len(sent.json["image_list"]) == 1
    paths = await client.download(task, tmp_path)
    assert len(paths) == 4
    assert all(path.stat().st_size > 0 for path in paths)
    again = await client.images.get(task.task_id, endpoint="images/omni-image")
    assert again.series_images == task.series_images


async def test_omni_image_single_and_a_request_model(
    server: FakeKlingServer, client: Client
) -> None:
    request = OmniImageRequest(prompt="a fox", n=2, watermark=True)
    task = await client.images.run(request)
    assert task.result_type == "single"
    assert len(task.images) == 2
    assert all(image.watermark_url for image in task.images)
    (sent,) = server.requests_for("create")
    assert sent.json == {
        "model_name": "kling-image-o1",
        "prompt": "a fox",
        "n": 2,
        "watermark_info": {"enabled": True},
        "external_task_id": sent.json["external_task_id"],
    }


async def test_expand_end_to_end(server: FakeKlingServer, client: Client, tmp_path: Path) -> None:
    task = await (await client.images.expand(image=png(400, 300), n=2, prompt="more sky", **RATIOS))
    assert len(task.images) == 2
    (sent,) = server.requests_for("create")
    assert sent.path == "/v1/images/editing/expand"
    assert {key: sent.json[key] for key in RATIOS} == RATIOS
    assert "model_name" not in sent.json
    assert "aspect_ratio" not in sent.json
    assert len(await client.download(task, tmp_path)) == 2


async def test_multi_shot_returns_three_sets_of_three(
    server: FakeKlingServer, client: Client, tmp_path: Path
) -> None:
    task = await (await client.images.multi_shot(element_frontal_image=URL))
    assert [image.index for image in task.images] == list(range(9))
    raw_sets = task.raw["task_result"]["images"]
    assert [sorted(entry) for entry in raw_sets] == [["index", "url_1", "url_2", "url_3"]] * 3
    (sent,) = server.requests_for("create")
    assert sent.json.keys() == {"element_frontal_image", "external_task_id"}
    assert len(await client.download(task, tmp_path)) == 9


async def test_virtual_try_on_end_to_end(server: FakeKlingServer, client: Client) -> None:
    task = await (
        await client.images.virtual_try_on(
            human_image=URL, cloth_image=URL2, model_name="kolors-virtual-try-on-v1-5"
        )
    )
    assert task.status is TaskStatus.SUCCEED
    assert len(task.images) == 1
    (sent,) = server.requests_for("create")
    assert sent.path == "/v1/images/kolors-virtual-try-on"
    assert sent.json["model_name"] == "kolors-virtual-try-on-v1-5"


async def test_the_fake_refuses_what_kling_refuses_with_its_codes(server: FakeKlingServer) -> None:
    async with aiohttp.ClientSession() as session:
        cases: list[tuple[str, dict[str, Any], int, str]] = [
            ("images/omni-image", {"prompt": "p", "resolution": "4k"}, 1201, "resolution"),
            ("images/omni-image", {"prompt": "<<<image_1>>>"}, 1201, "prompt"),
            ("images/editing/expand", {"image": URL, **RATIOS, "up_expansion_ratio": 1}, 1201,
             "expansion_ratio"),
            ("general/ai-multi-shot", {}, 1201, "element_frontal_image"),
            ("images/kolors-virtual-try-on", {"human_image": URL, "cloth_image": URL,
             "model_name": "kolors-v9"}, 1203, "model"),
        ]  # fmt: skip
        for path, body, code, says in cases:
            async with session.post(
                f"{server.url}/v1/{path}", json=body, headers={"Authorization": f"Bearer {API_KEY}"}
            ) as answer:
                payload = await answer.json()
            assert payload["code"] == code, (path, payload)
            assert says in payload["message"]


async def test_faults_apply_to_the_new_routes(server: FakeKlingServer, client: Client) -> None:
    server.inject("error", route="create", endpoint="images/editing/expand", code=5000, times=1)
    task = await (await client.images.expand(image=URL, **RATIOS))
    assert task.status is TaskStatus.SUCCEED  # the 5000 was retried, one task made
    creates = server.requests_for("create", endpoint="images/editing/expand")
    assert creates[0].code == 5000
    assert creates[-1].code == 0
    assert len({request.json["external_task_id"] for request in creates}) == 1
    assert server.stats()["creates_accepted"] == 1


async def test_a_series_holds_its_images_of_the_fake_s_quota() -> None:
    async with FakeKlingServer(concurrency_limit=4, task_duration=None) as server:
        async with make_client(server, max_concurrency=None) as client:
            await client.images.omni_image(
                prompt="p", model_name="kling-v3-omni", images=[URL], result_type="series",
                series_amount=4,
            )  # fmt: skip
            assert server.stats()["units_in_use"] == 4
            with pytest.raises(kling_async.ConcurrencyLimitError):
                await client.with_options(
                    retry=kling_async.RetryPolicy(max_attempts=1)
                ).images.expand(image=URL, **RATIOS)


async def test_batch_lines_naming_the_endpoint_run_there(
    server: FakeKlingServer, client: Client
) -> None:
    lines = [
        {"endpoint": "images/omni-image", "prompt": "p", "image_list": [{"image": URL}]},
        {"endpoint": "expand", "image": URL, **RATIOS},
        {"element_frontal_image": URL},  # its own field names the endpoint
        {"prompt": "a fox"},
    ]
    requests = [request_from_mapping(line) for line in lines]
    results = [item async for item in client.batch(requests)]
    assert all(item.error is None for item in results)
    paths = sorted(request.path for request in server.requests_for("create"))
    assert paths == sorted(
        [
            "/v1/images/omni-image",
            "/v1/images/editing/expand",
            "/v1/general/ai-multi-shot",
            "/v1/images/generations",
        ]
    )


# --- synchronous endpoints ------------------------------------------------------------------


async def test_image_recognition_is_a_plain_awaitable(
    server: FakeKlingServer, client: Client
) -> None:
    server.inject("error", route="create", code=5001, times=1)
    found = await client.images.recognize(png(400, 400))
    assert [region.type for region in found.regions] == [
        "object_seg",
        "head_seg",
        "face_seg",
        "cloth_seg",
    ]
    face = found.region("face_seg")
    assert face is not None
    assert face.is_contain
    assert face.url
    assert found.final_unit_deduction == "0.1"
    assert len(server.requests_for(method="POST")) == 2  # the 5001, then the answer
    with pytest.raises(ValidationError):
        await client.images.recognize("ftp://example.com/a.png")


async def test_a_failing_recognition_raises_the_typed_error(
    server: FakeKlingServer, client: Client
) -> None:
    server.inject("error", route="create", code=5000, times=None)
    with pytest.raises(ServerError):
        await client.with_options(retry=kling_async.RetryPolicy(max_attempts=2)).images.recognize(
            URL
        )


async def test_account_costs_keeps_to_one_request_a_second(
    server: FakeKlingServer, client: Client
) -> None:
    started = time.monotonic()
    first, second = await asyncio.gather(
        client.account.costs(start_time=1726124664368, end_time=1727366400000),
        client.with_options(timeout=5).account.costs(
            start_time=1726124664368, end_time=1727366400000
        ),
    )
    assert time.monotonic() - started >= 0.95
    assert first.packs[0].resource_pack_name == "Image Generation - simulated"
    assert second.packs[0].status == "online"
    arrivals = [request.arrived_at for request in server.requests_for(method="GET")]
    assert len(arrivals) == 2
    assert arrivals[1] - arrivals[0] >= 0.95


async def test_unpaced_account_costs_draws_kling_s_1302(server: FakeKlingServer) -> None:
    # What the pacing prevents: the fake refuses a second query within a second.
    async with make_client(server, retry=kling_async.RetryPolicy(max_attempts=1)) as client:
        client.account.pacer.interval = 0
        await client.account.costs(start_time=0, end_time=1)
        with pytest.raises(RateLimitError):
            await client.account.costs(start_time=0, end_time=1)


def test_the_pacing_rule() -> None:
    assert wait_before(None, 10.0, 1.0) == 0.0
    assert wait_before(10.0, 10.25, 1.0) == pytest.approx(0.75)
    assert wait_before(10.0, 12.0, 1.0) == 0.0


async def test_account_costs_validates_its_times(client: Client) -> None:
    with pytest.raises(ValidationError) as caught:
        await client.account.costs(start_time=5, end_time=1)
    assert caught.value.field == "end_time"


def test_both_callback_formats_read_series_into_one_task() -> None:
    from kling_async._wire import parse_callback

    legacy = parse_callback(
        {
            "task_id": "t",
            "task_status": "succeed",
            "task_result": {
                "result_type": "series",
                "series_images": [{"index": i, "url": f"u{i}"} for i in range(3)],
            },
        }
    )
    new_design = parse_callback(
        {
            "id": "t",
            "status": "succeeded",
            "outputs": [{"type": "image", "url": f"u{i}", "group_id": "g"} for i in range(3)],
            "billing": [{"charge_type": "unit", "amount": "24", "package_type": "image"}],
        }
    )
    assert legacy.series_images == new_design.series_images
    assert [image.url for image in new_design.series_images] == ["u0", "u1", "u2"]
    assert new_design.final_unit_deduction == "24"


async def test_a_callback_delivers_a_series(server: FakeKlingServer) -> None:
    receiver = kling_async.CallbackReceiver(secret="endpoints-test-secret-0123456789")
    async with receiver.serve(), make_client(server, callbacks=receiver) as client:
        handle = await client.images.omni_image(
            prompt="p", model_name="kling-v3-omni", images=[URL], result_type="series",
            series_amount=2,
        )  # fmt: skip
        task = await handle
    assert len(task.series_images) == 2
    assert server.callbacks
