"""Create bodies checked as Kling checks them: 1201 naming the field, 1203 for a model."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from kling_async.testing import encode_png

from .helpers import (
    AUTH,
    GEN,
    IMAGE_URL,
    MULTI,
    Api,
    assert_envelope,
    gen_body,
    jpeg_b64,
    multi_body,
    png_b64,
)

TOO_LONG = "x" * 2501


TEN_ELEMENTS = [{"element_id": i} for i in range(10)]


VALIDATION_CASES: list[tuple[str, str, Any, str]] = [
    ("not-an-object", GEN, [gen_body()], "body"),
    ("prompt-missing", GEN, {"model_name": "kling-v3"}, "prompt"),
    ("prompt-empty", GEN, gen_body(prompt=""), "prompt"),
    ("prompt-too-long", GEN, gen_body(prompt=TOO_LONG), "prompt"),
    ("negative-too-long", GEN, gen_body(negative_prompt=TOO_LONG), "negative_prompt"),
    (
        "negative-with-image",
        GEN,
        gen_body(negative_prompt="blur", image=IMAGE_URL),
        "negative_prompt",
    ),
    (
        "reference-unknown",
        GEN,
        gen_body(image=IMAGE_URL, image_reference="style"),
        "image_reference",
    ),
    ("reference-without-image", GEN, gen_body(image_reference="face"), "image"),
    ("image-fidelity-range", GEN, gen_body(image=IMAGE_URL, image_fidelity=1.5), "image_fidelity"),
    ("human-fidelity-type", GEN, gen_body(human_fidelity="high"), "human_fidelity"),
    ("element-list-type", GEN, gen_body(element_list=[{"id": 1}]), "element_list"),
    (
        "element-list-too-many",
        GEN,
        gen_body(element_list=TEN_ELEMENTS, image=IMAGE_URL),
        "element_list",
    ),
    ("resolution", GEN, gen_body(resolution="4k"), "resolution"),
    ("n-zero", GEN, gen_body(n=0), "n"),
    ("n-ten", GEN, gen_body(n=10), "n"),
    ("n-not-int", GEN, gen_body(n="2"), "n"),
    ("aspect-ratio", GEN, gen_body(aspect_ratio="5:4"), "aspect_ratio"),
    ("watermark-info", GEN, gen_body(watermark_info={"enabled": "yes"}), "watermark_info"),
    ("callback-url", GEN, gen_body(callback_url="ftp://example.com/hook"), "callback_url"),
    ("external-id-empty", GEN, gen_body(external_task_id=""), "external_task_id"),
    ("model-missing", GEN, {"prompt": "a fox"}, "model_name"),
    ("model-empty", MULTI, multi_body(model_name=""), "model_name"),
    ("image-data-prefix", GEN, gen_body(image="data:image/png;base64," + png_b64()), "image"),
    ("image-not-base64", GEN, gen_body(image="not base64 at all!"), "image"),
    (
        "image-not-jpeg-or-png",
        GEN,
        gen_body(image=base64.b64encode(b"GIF89a" + bytes(64)).decode()),
        "image",
    ),
    ("image-too-small", GEN, gen_body(image=png_b64(299, 400)), "image"),
    ("image-too-narrow", GEN, gen_body(image=jpeg_b64(1000, 300)), "image"),
    ("subjects-missing", MULTI, {"model_name": "kling-v2"}, "subject_image_list"),
    ("subjects-empty", MULTI, multi_body(subject_image_list=[]), "subject_image_list"),
    (
        "subjects-too-many",
        MULTI,
        multi_body(subject_image_list=[{"subject_image": IMAGE_URL}] * 5),
        "subject_image_list",
    ),
    (
        "subject-shape",
        MULTI,
        multi_body(subject_image_list=[{"image": IMAGE_URL}]),
        "subject_image_list[0]",
    ),
    (
        "subject-image-bad",
        MULTI,
        multi_body(subject_image_list=[{"subject_image": png_b64(100, 100)}]),
        "subject_image_list[0]",
    ),
    ("multi-prompt-too-long", MULTI, multi_body(prompt=TOO_LONG), "prompt"),
    ("scene-image", MULTI, multi_body(scene_image="data:image/jpeg;base64,AAAA"), "scene_image"),
    ("style-image", MULTI, multi_body(style_image=jpeg_b64(200, 400)), "style_image"),
]


@pytest.mark.parametrize(
    ("endpoint", "body", "field"),
    [case[1:] for case in VALIDATION_CASES],
    ids=[case[0] for case in VALIDATION_CASES],
)
async def test_validation_rejects_with_1201_naming_the_field(
    api: Api, endpoint: str, body: Any, field: str
) -> None:
    status, payload, _ = await api.create(endpoint, body)
    assert (status, payload["code"]) == (400, 1201), payload
    assert_envelope(payload, 1201)
    assert field in payload["message"]
    assert api.server.tasks == {}


async def test_body_that_is_not_json_is_rejected(api: Api) -> None:
    status, payload, _ = await api.call(
        "POST",
        f"/v1/{GEN}",
        data=b"{not json",
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert (status, payload["code"]) == (400, 1201)
    assert api.server.requests[-1].json is None


async def test_image_over_ten_megabytes_is_rejected(api: Api) -> None:
    big = encode_png(400, 400) + bytes(10 * 1024 * 1024)
    body = json.dumps(gen_body(image=base64.b64encode(big).decode())).encode()
    # A file-like body: aiohttp warns about sending megabytes of raw bytes at once.
    status, payload, _ = await api.call(
        "POST",
        f"/v1/{GEN}",
        data=io.BytesIO(body),
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert (status, payload["code"]) == (400, 1201)
    assert "10 MB" in payload["message"]


async def test_valid_images_and_full_bodies_are_accepted(api: Api) -> None:
    body = gen_body(
        image=png_b64(600, 400),
        image_reference="subject",
        image_fidelity=0.5,
        human_fidelity=1,
        element_list=[{"element_id": 7}] * 9,
        resolution="2k",
        n=9,
        aspect_ratio="21:9",
        watermark_info={"enabled": False},
        callback_url="https://example.com/hook",
        external_task_id="full",
    )
    assert (await api.create(GEN, body))[0] == 200
    multi = multi_body(
        subject_image_list=[{"subject_image": jpeg_b64(300, 750)}, {"subject_image": IMAGE_URL}],
        prompt="blend",
        scene_image=png_b64(),
        style_image=IMAGE_URL,
        n=2,
    )
    assert (await api.create(MULTI, multi))[0] == 200


async def test_unknown_model_is_1203(serve: Callable[..., Awaitable[Api]]) -> None:
    api = await serve(models={"kling-v3", "kling-v2"})
    status, payload, _ = await api.create(GEN, gen_body(model_name="kling-v9"))
    assert (status, payload["code"]) == (404, 1203)
    assert "model not found" in payload["message"]
    assert (await api.create(GEN, gen_body()))[0] == 200


ODD_VALUES: list[Any] = [None, True, 0, -1, 1.5, "", "x", [], [1], {}, {"a": 1}, [{"a": 1}]]


FIELDS = [
    "model_name",
    "prompt",
    "negative_prompt",
    "image",
    "image_reference",
    "image_fidelity",
    "element_list",
    "resolution",
    "n",
    "aspect_ratio",
    "watermark_info",
    "callback_url",
    "external_task_id",
    "subject_image_list",
    "scene_image",
]


async def test_odd_json_values_never_crash_the_server(api: Api) -> None:
    for field in FIELDS:
        for value in ODD_VALUES:
            for endpoint, base in ((GEN, gen_body()), (MULTI, multi_body())):
                status, payload, _ = await api.create(endpoint, {**base, field: value})
                assert status in (200, 400), (endpoint, field, value, payload)
                assert payload["code"] in (0, 1201)
