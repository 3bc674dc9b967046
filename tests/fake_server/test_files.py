"""Result files: valid PNGs sized by aspect ratio, HEAD, byte ranges, 404s."""

from __future__ import annotations

import struct
import zlib

import pytest

import kling_async
from kling_async._models import ASPECT_RATIOS, AspectRatio
from kling_async.testing._files import byte_range
from kling_async.testing._png import encode_png, size_for_aspect_ratio
from tests.helpers import png_chunks

from .helpers import GEN, Api


def parse_png(data: bytes) -> tuple[int, int, bytes]:
    """Check every chunk's CRC and return width, height and the inflated pixels."""
    chunks = png_chunks(data)
    assert chunks[0][0] == b"IHDR"
    assert chunks[-1] == (b"IEND", b"")
    width, height, depth, colour, _, _, _ = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour) == (8, 2)
    pixels = zlib.decompress(b"".join(p for k, p in chunks if k == b"IDAT"))
    assert len(pixels) == height * (1 + 3 * width)
    return width, height, pixels


async def test_result_png_is_valid_and_sized_by_aspect_ratio(api: Api) -> None:
    task_id = await api.task_id(aspect_ratio="16:9", n=2, watermark_info={"enabled": True})
    images = (await api.wait_status(GEN, task_id, "succeed"))["task_result"]["images"]
    async with api.session.get(images[1]["url"]) as response:
        assert response.status == 200
        assert response.content_type == "image/png"
        plain = await response.read()
    assert parse_png(plain)[:2] == (569, 320)
    async with api.session.get(images[1]["watermark_url"]) as response:
        marked = await response.read()
    assert parse_png(marked)[:2] == (569, 320)
    assert marked != plain
    tall_id = await api.task_id(aspect_ratio="9:16")
    tall = (await api.wait_status(GEN, tall_id, "succeed"))["task_result"]["images"][0]
    async with api.session.get(tall["url"]) as response:
        assert parse_png(await response.read())[:2] == (320, 569)


async def test_result_head_range_and_missing(api: Api) -> None:
    task_id = await api.task_id()
    url = (await api.wait_status(GEN, task_id, "succeed"))["task_result"]["images"][0]["url"]
    async with api.session.get(url) as response:
        full = await response.read()
    async with api.session.head(url) as response:
        assert response.status == 200
        assert int(response.headers["Content-Length"]) == len(full)
        assert response.headers["Accept-Ranges"] == "bytes"
    async with api.session.get(url, headers={"Range": "bytes=100-"}) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 100-{len(full) - 1}/{len(full)}"
        assert await response.read() == full[100:]
    async with api.session.get(url, headers={"Range": f"bytes={len(full)}-"}) as response:
        assert response.status == 416
    base = f"{api.server.origin}/results/{task_id}"
    for missing in (f"{base}/1.png", f"{base}/0-watermark.png", f"{base}/x.png", f"{base}/0.jpg"):
        async with api.session.get(missing) as response:
            assert response.status == 404, missing
    async with api.session.get(f"{api.server.origin}/results/nope/0.png") as response:
        assert response.status == 404
    assert api.server.requests_for("download")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-9", (0, 10)),
        ("bytes=90-", (90, 100)),
        ("bytes=5-200", (5, 100)),
        ("BYTES=5-5", (5, 6)),
        ("bytes=-10", (90, 100)),
        ("bytes=-500", (0, 100)),
        ("bytes=-0", (0, 100)),
        ("bytes=9-5", None),
        ("bytes=100-", None),
        ("bytes=-", None),
        ("bytes=0-1,5-6", None),
        ("items=0-1", None),
        ("", None),
    ],
)
def test_byte_ranges(header: str, expected: tuple[int, int] | None) -> None:
    assert byte_range(header, 100) == expected


@pytest.mark.parametrize("aspect_ratio", ASPECT_RATIOS)
def test_every_placeholder_can_be_fed_back_as_an_input_image(aspect_ratio: AspectRatio) -> None:
    """A first output must be usable as the next request's input: Kling refuses
    images under 300 px on a side, and so does the SDK's validation."""
    width, height = size_for_aspect_ratio(aspect_ratio)
    assert min(width, height) >= 300
    ratio_w, ratio_h = (int(part) for part in aspect_ratio.split(":"))
    assert abs(width / height - ratio_w / ratio_h) < 0.01
    kling_async.MultiImageRequest(
        subject_images=[encode_png(width, height)], prompt="p", aspect_ratio=aspect_ratio
    )
