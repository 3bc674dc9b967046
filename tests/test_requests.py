"""Every request rule from the seeds is checked when a request is built (an
image given as a file: when the file is read, the one step before sending that
does I/O), and names the field, before anything can be sent."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

import kling_async
from kling_async import (
    ImageGenerationRequest,
    MultiImageRequest,
    ValidationError,
)
from kling_async._image_input import sniff_image
from kling_async._resources import read_image_files
from kling_async._wire import request_body
from tests.imagedata import jpeg, png

GOOD_PNG = png(400, 300)


def built(cls: type[Any], **fields: Any) -> Any:
    """The request as the client sends it: built, then its image files read."""
    return read_image_files(cls(**fields))


def rejects(cls: type[Any], field: str, **fields: Any) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        built(cls, **fields)
    assert caught.value.field == field, str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert str(caught.value).startswith(f"{field}: ")
    return caught.value


def test_minimal_generation_request_uses_the_seed_defaults() -> None:
    request = ImageGenerationRequest(prompt="a red fox")
    assert request_body(request) == {
        "model_name": "kling-v3",
        "prompt": "a red fox",
        "n": 1,
        "aspect_ratio": "16:9",
    }


def test_every_generation_field_reaches_the_wire_in_kling_shape() -> None:
    request = ImageGenerationRequest(
        prompt="p",
        model_name="kling-v2-1",
        image="https://example.com/ref.png",
        image_reference="face",
        image_fidelity=0.3,
        human_fidelity=1,
        element_ids=[7, 8],
        resolution="2k",
        n=9,
        aspect_ratio="21:9",
        watermark=False,
        callback_url="https://hooks.example.com/kling",
        external_task_id="mine-1",
    )
    assert request_body(request) == {
        "model_name": "kling-v2-1",
        "prompt": "p",
        "image": "https://example.com/ref.png",
        "image_reference": "face",
        "image_fidelity": 0.3,
        "human_fidelity": 1,
        "element_list": [{"element_id": 7}, {"element_id": 8}],
        "resolution": "2k",
        "n": 9,
        "aspect_ratio": "21:9",
        "watermark_info": {"enabled": False},
        "callback_url": "https://hooks.example.com/kling",
        "external_task_id": "mine-1",
    }


def test_multi_image_request_wire_shape() -> None:
    request = MultiImageRequest(
        subject_images=[GOOD_PNG, "https://example.com/b.jpg"],
        scene_image="https://example.com/scene.png",
        style_image=GOOD_PNG,
        prompt="blend",
        watermark=True,
    )
    body = request_body(request)
    encoded = base64.b64encode(GOOD_PNG).decode()
    assert body == {
        "model_name": "kling-v2",
        "subject_image_list": [
            {"subject_image": encoded},
            {"subject_image": "https://example.com/b.jpg"},
        ],
        "scene_image": "https://example.com/scene.png",
        "style_image": encoded,
        "prompt": "blend",
        "n": 1,
        "aspect_ratio": "16:9",
        "watermark_info": {"enabled": True},
    }


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"prompt": None}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "x" * 2501}, "prompt"),
        ({"prompt": "p", "negative_prompt": "x" * 2501}, "negative_prompt"),
        ({"prompt": "p", "negative_prompt": "blur", "image": GOOD_PNG}, "negative_prompt"),
        ({"prompt": "p", "image_reference": "subject"}, "image"),
        ({"prompt": "p", "image": GOOD_PNG, "image_reference": "pose"}, "image_reference"),
        ({"prompt": "p", "image_fidelity": -0.01}, "image_fidelity"),
        ({"prompt": "p", "image_fidelity": 1.01}, "image_fidelity"),
        ({"prompt": "p", "image_fidelity": "high"}, "image_fidelity"),
        ({"prompt": "p", "human_fidelity": 2}, "human_fidelity"),
        ({"prompt": "p", "human_fidelity": True}, "human_fidelity"),
        ({"prompt": "p", "element_ids": list(range(11))}, "element_ids"),
        ({"prompt": "p", "element_ids": list(range(10)), "image": GOOD_PNG}, "element_ids"),
        ({"prompt": "p", "element_ids": "12"}, "element_ids"),
        ({"prompt": "p", "element_ids": [1, "two"]}, "element_ids[1]"),
        ({"prompt": "p", "element_ids": [1, 2**63]}, "element_ids[1]"),  # beyond Kling's long
        ({"prompt": "p", "resolution": "4k"}, "resolution"),
        ({"prompt": "p", "n": 0}, "n"),
        ({"prompt": "p", "n": 10}, "n"),
        ({"prompt": "p", "n": 2.0}, "n"),
        ({"prompt": "p", "n": True}, "n"),
        ({"prompt": "p", "aspect_ratio": "5:4"}, "aspect_ratio"),
        ({"prompt": "p", "watermark": "yes"}, "watermark"),
        ({"prompt": "p", "callback_url": "ftp://example.com/x"}, "callback_url"),
        ({"prompt": "p", "callback_url": "not a url"}, "callback_url"),
        ({"prompt": "p", "external_task_id": ""}, "external_task_id"),
        ({"prompt": "p", "model_name": ""}, "model_name"),
    ],
)
def test_generation_rules(fields: dict[str, Any], field: str) -> None:
    rejects(ImageGenerationRequest, field, **fields)


def test_limits_are_inclusive() -> None:
    ImageGenerationRequest(prompt="x" * 2500, negative_prompt="y" * 2500)
    ImageGenerationRequest(prompt="p", element_ids=[2**63 - 1])
    ImageGenerationRequest(prompt="p", image_fidelity=0, human_fidelity=1, n=9)
    ImageGenerationRequest(prompt="p", element_ids=list(range(9)), image=GOOD_PNG)
    ImageGenerationRequest(prompt="p", element_ids=list(range(10)))
    for ratio in ("1:1", "16:9", "4:3", "3:2", "2:3", "3:4", "9:16", "21:9"):
        ImageGenerationRequest(prompt="p", aspect_ratio=ratio)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"subject_images": None}, "subject_images"),
        ({"subject_images": []}, "subject_images"),
        ({"subject_images": [GOOD_PNG] * 5}, "subject_images"),
        ({"subject_images": GOOD_PNG}, "subject_images"),
        ({"subject_images": [GOOD_PNG, png(100, 100)]}, "subject_images[1]"),
        ({"subject_images": [GOOD_PNG], "prompt": "x" * 2501}, "prompt"),
        ({"subject_images": [GOOD_PNG], "scene_image": b"GIF89a"}, "scene_image"),
        ({"subject_images": [GOOD_PNG], "style_image": "%%%"}, "style_image"),
        ({"subject_images": [GOOD_PNG], "n": 10}, "n"),
        ({"subject_images": [GOOD_PNG], "aspect_ratio": "1:2"}, "aspect_ratio"),
    ],
)
def test_multi_image_rules(fields: dict[str, Any], field: str) -> None:
    rejects(MultiImageRequest, field, **fields)


def test_multi_image_accepts_one_to_four_subjects_and_no_prompt() -> None:
    for count in (1, 4):
        request = MultiImageRequest(subject_images=[GOOD_PNG] * count)
        assert len(request_body(request)["subject_image_list"]) == count
        assert "prompt" not in request_body(request)


def test_requests_are_frozen() -> None:
    request = ImageGenerationRequest(prompt="p")
    with pytest.raises(AttributeError):
        request.prompt = "q"  # type: ignore[misc]


# --- images -----------------------------------------------------------------------


def test_image_from_path_bytes_base64_and_data_url_all_encode_the_same(tmp_path: Path) -> None:
    path = tmp_path / "ref.png"
    path.write_bytes(GOOD_PNG)
    encoded = base64.b64encode(GOOD_PNG).decode()
    forms: list[Any] = [path, str(path), GOOD_PNG, bytearray(GOOD_PNG), encoded]
    forms.append(f"data:image/png;base64,{encoded}")
    forms.append(encoded[:40] + "\n" + encoded[40:])  # wrapped base64
    for form in forms:
        assert built(ImageGenerationRequest, prompt="p", image=form).image == encoded


def test_jpeg_sizes_come_from_the_frame_header(tmp_path: Path) -> None:
    ImageGenerationRequest(prompt="p", image=jpeg(1200, 800, exif_padding=20_000))
    path = tmp_path / "photo.jpeg"
    path.write_bytes(jpeg(600, 600))
    built(ImageGenerationRequest, prompt="p", image=path)
    error = rejects(ImageGenerationRequest, "image", prompt="p", image=jpeg(299, 600))
    assert "299x600" in error.rule


@pytest.mark.parametrize(
    ("image", "words"),
    [
        (png(299, 400), "at least 300"),
        (png(300, 751), "aspect ratio"),
        (png(751, 300), "aspect ratio"),
        (b"GIF89a" + bytes(100), "JPEG or PNG"),
        (b"\x89PNG\r\n\x1a\n" + bytes(4), "JPEG or PNG"),
        (b"\xff\xd8\xff\xda" + bytes(10), "JPEG or PNG"),
        ("not base64 at all!", "not an http(s) URL"),
        ("data:image/png,rawbytes", "data:"),
        ("missing-file.png", "does not exist"),
        ("https://", "not a valid"),
        ("", "must not be empty"),
        (12, "got int"),
    ],
)
def test_bad_images_are_named_and_explained(image: Any, words: str) -> None:
    error = rejects(ImageGenerationRequest, "image", prompt="p", image=image)
    assert words in error.rule


def test_aspect_ratio_bounds_are_inclusive() -> None:
    ImageGenerationRequest(prompt="p", image=png(300, 750))
    ImageGenerationRequest(prompt="p", image=png(750, 300))


def test_oversize_files_are_refused_before_being_read(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    with big.open("wb") as handle:
        handle.write(png(400, 400))
        handle.truncate(10 * 1024 * 1024 + 1)
    error = rejects(ImageGenerationRequest, "image", prompt="p", image=big)
    assert "10 MB" in error.rule
    error = rejects(ImageGenerationRequest, "image", prompt="p", image=big.read_bytes())
    assert "10 MB" in error.rule


def test_only_jpeg_and_png_suffixes(tmp_path: Path) -> None:
    path = tmp_path / "ref.webp"
    path.write_bytes(GOOD_PNG)
    error = rejects(ImageGenerationRequest, "image", prompt="p", image=path)
    assert ".png" in error.rule


def test_urls_pass_through_unchecked() -> None:
    request = ImageGenerationRequest(prompt="p", image="  https://cdn.example.com/x.webp ")
    assert request.image == "https://cdn.example.com/x.webp"


def test_url_schemes_are_case_insensitive() -> None:
    request = ImageGenerationRequest(prompt="p", image="HTTPS://cdn.example.com/A.png")
    assert request.image == "https://cdn.example.com/A.png"  # the scheme only is lowered
    multi = MultiImageRequest(subject_images=["Http://cdn.example.com/b.png"])
    assert multi.subject_images == ("http://cdn.example.com/b.png",)
    encoded = base64.b64encode(GOOD_PNG).decode()
    assert ImageGenerationRequest(prompt="p", image=f"DATA:image/png;BASE64,{encoded}").image == (
        encoded
    )


@pytest.mark.parametrize(
    ("image", "words"),
    [
        ("ftp://example.com/a.png", "must be an http(s) URL; ftp:// is not supported"),
        ("FILE:///tmp/a.png", "for a local file give its path"),
        ("missing", "'missing' is not an http(s) URL, an existing file"),
        ("folder/missing", "image file folder/missing does not exist"),
    ],
)
def test_what_is_wrong_with_a_string_image_is_said(image: str, words: str) -> None:
    error = rejects(ImageGenerationRequest, "image", prompt="p", image=image)
    assert words in error.rule
    assert "must be a JPEG or PNG image" not in error.rule


def test_a_directory_or_a_device_is_not_taken_for_base64(tmp_path: Path) -> None:
    for given in (tmp_path, str(tmp_path)):
        error = rejects(ImageGenerationRequest, "image", prompt="p", image=given)
        assert error.rule == f"{tmp_path} is a directory, not an image file"
    bare = tmp_path / "abcd"  # a name that is valid base64 too
    bare.mkdir()
    error = rejects(MultiImageRequest, "subject_images[0]", subject_images=[str(bare)])
    assert "is a directory" in error.rule
    if Path("/dev/null").exists():
        error = rejects(ImageGenerationRequest, "image", prompt="p", image="/dev/null")
        assert "not a regular file" in error.rule


# --- building requests from dicts (JSONL files) -------------------------------------------


def test_request_from_mapping_picks_the_endpoint_and_accepts_wire_names() -> None:
    from kling_async import MultiImageRequest as Multi
    from kling_async import request_from_mapping

    generation = request_from_mapping(
        {
            "prompt": "p",
            "element_list": [{"element_id": 4}],
            "watermark_info": {"enabled": True},
            "negative_prompt": None,
        }
    )
    assert isinstance(generation, ImageGenerationRequest)
    assert generation.element_ids == (4,)
    assert generation.watermark is True
    floats = request_from_mapping({"prompt": "p", "n": 2.0, "element_list": [{"element_id": 7.0}]})
    assert isinstance(floats, ImageGenerationRequest)
    assert (floats.n, floats.element_ids) == (2, (7,))
    multi = request_from_mapping({"subject_image_list": [{"subject_image": "https://a/b.png"}]})
    assert isinstance(multi, Multi)
    assert multi.subject_images == ("https://a/b.png",)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"prompt": "p", "colour": "red"}, "colour"),
        ({"n": 2}, "prompt"),
        ({"subject_images": ["https://a/b.png"], "negative_prompt": "x"}, "negative_prompt"),
        ({"prompt": "p", "element_list": "7"}, "element_list"),
        (["not", "an", "object"], "request"),
        ({"prompt": "p", "n": 0}, "n"),
        ({"prompt": "p", "n": 2.5}, "n"),
        ({"prompt": "p", "element_ids": [1.5]}, "element_ids[0]"),
    ],
)
def test_request_from_mapping_names_bad_fields(data: Any, field: str) -> None:
    from kling_async import request_from_mapping

    with pytest.raises(ValidationError) as caught:
        request_from_mapping(data)
    assert caught.value.field == field


# --- images given as paths, the JPEG parser, field rules (mutation test img24) --------------------


def test_images_given_as_paths_are_checked(tmp_path: Path) -> None:
    small = tmp_path / "small.png"
    small.write_bytes(png(100, 100))
    with pytest.raises(ValidationError) as caught:
        read_image_files(ImageGenerationRequest(prompt="p", image=small))
    assert caught.value.field == "image"
    assert "300" in caught.value.rule


def test_jpeg_parser_branches() -> None:
    # A DHT table (FFC4) and fill bytes (FF FF) before the frame header.
    dht = b"\xff\xc4" + (6).to_bytes(2, "big") + bytes(4)
    frame = b"\xff\xc0" + (17).to_bytes(2, "big") + b"\x08" + (500).to_bytes(2, "big")
    frame += (700).to_bytes(2, "big") + b"\x03" + bytes(9)
    info = sniff_image(b"\xff\xd8" + dht + b"\xff" + frame)
    assert info is not None
    assert (info.format, info.width, info.height) == ("jpeg", 700, 500)
    assert sniff_image(b"\xff\xd8\xff\xd0" + frame) is not None  # a marker without a length
    assert sniff_image(b"\xff\xd8" + frame[:6]) is None  # cut off inside the frame header
    assert sniff_image(b"\xff\xd8\x00\x00") is None  # not a marker
    assert sniff_image(b"\x89PNG\r\n\x1a\n" + bytes(4) + b"IDAT" + bytes(8)) is None
    assert sniff_image(jpeg(640, 480)) is not None


def test_exactly_ten_megabytes_is_accepted() -> None:
    data = png(400, 400)
    data += bytes(10 * 1024 * 1024 - len(data))
    ImageGenerationRequest(prompt="p", image=data)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"watermark": 1}, "watermark"),
        ({"callback_url": "https:///x"}, "callback_url"),
        ({"element_ids": [-1]}, "element_ids[0]"),
        ({"element_ids": [True]}, "element_ids[0]"),
        ({"image": "aGVsbG8!"}, "image"),
    ],
)
def test_more_field_rules(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        read_image_files(ImageGenerationRequest(prompt="p", **fields))
    assert caught.value.field == field


def test_subject_images_must_be_a_list() -> None:
    with pytest.raises(ValidationError, match="list"):
        kling_async.MultiImageRequest(subject_images="a.png")
