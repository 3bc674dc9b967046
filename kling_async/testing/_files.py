"""Result files: the image URLs a succeeded task lists, and the PNGs served there,
whole or by byte range."""

from __future__ import annotations

import re
from typing import Any, Final

from ._endpoints import file_count, watermarks
from ._http import Reply
from ._options import ImageIndexing
from ._png import encode_png, size_for_aspect_ratio
from ._tasks import FakeTask

RESULTS_PATH: Final = "/results/"
_WATERMARK_SUFFIX: Final = "-watermark.png"
# One range, "bytes=START-END", either side optional (RFC 9110, 14.1).
_RANGE: Final = re.compile(r"bytes=(\d*)-(\d*)", re.ASCII | re.IGNORECASE)
_CACHING: Final = {"Accept-Ranges": "bytes", "Cache-Control": "public, max-age=2592000"}


def result_images(origin: str, task: FakeTask, indexing: ImageIndexing) -> list[dict[str, Any]]:
    """``task_result.images`` of a succeeded ``task``, served from ``origin``."""
    base = f"{origin}{RESULTS_PATH}{task.task_id}/"
    images: list[dict[str, Any]] = []
    for index in range(file_count(task.endpoint, task.n)):
        image: dict[str, Any] = {"url": f"{base}{index}.png"}
        if indexing == "index":
            image = {"index": index, **image}
        elif indexing == "id":
            image = {"id": "", **image}
        if task.watermark and watermarks(task.endpoint):
            image["watermark_url"] = f"{base}{index}{_WATERMARK_SUFFIX}"
        images.append(image)
    return images


def serve_result(task: FakeTask | None, name: str, range_header: str | None) -> Reply:
    """Answer a GET or HEAD of file ``name`` (``0.png``, ``0-watermark.png``) of
    ``task``: 404 unless the task succeeded and has that image, 206 or 416 for a
    ``Range``."""
    if task is None or task.status != "succeed":
        return _not_found()
    watermark = name.endswith(_WATERMARK_SUFFIX)
    index_text = name[: -len(_WATERMARK_SUFFIX)] if watermark else name.removesuffix(".png")
    if (
        index_text == name
        or not (index_text.isascii() and index_text.isdigit())
        or int(index_text) >= file_count(task.endpoint, task.n)
    ):
        return _not_found()
    if watermark and not task.watermark:
        return _not_found()
    data = encode_png(*size_for_aspect_ratio(task.aspect_ratio), watermark=watermark)
    headers = dict(_CACHING)
    if range_header is None:
        return Reply(200, data, None, content_type="image/png", headers=headers)
    size = len(data)
    wanted = byte_range(range_header, size)
    if wanted is None:
        headers["Content-Range"] = f"bytes */{size}"
        return Reply(416, b"", None, content_type="image/png", headers=headers)
    start, stop = wanted
    headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    return Reply(206, data[start:stop], None, content_type="image/png", headers=headers)


def byte_range(header: str, size: int) -> tuple[int, int] | None:
    """The ``[start, stop)`` of ``size`` bytes a ``Range`` header asks for; ``None``
    when it is malformed or asks for nothing there is (answered 416)."""
    match = _RANGE.fullmatch(header)
    if match is None:
        return None
    first, last = match.groups()
    if not first:
        if not last:
            return None
        # The last N bytes. "-0" reads as offset 0, the whole file: what the fake
        # has always answered (it took aiohttp's reading of the header).
        suffix = int(last)
        start, stop = (max(size - suffix, 0) if suffix else 0), size
    else:
        start = int(first)
        if last and start > int(last):
            return None
        stop = size if not last else min(int(last) + 1, size)
    if start >= size:
        return None
    return start, stop


def _not_found() -> Reply:
    return Reply(404, b"404: no such result file", None, content_type="text/plain")
