"""Saving result images to disk: streamed, atomic, resumable by skipping.

Kling deletes result files 30 days after generation, so pipelines download as
soon as tasks finish; this makes that one call. Each image is streamed in chunks
into a hidden temporary file beside its destination and renamed into place only
when complete, so a file under its final name is always whole: a rerun after a
crash skips it and fetches only what is missing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import secrets
import time
from collections.abc import Awaitable, Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import TypeVar
from urllib.parse import urlsplit

import aiohttp

from ._exceptions import APIError, TaskFailedError
from ._handle import TaskHandle
from ._models import ImageResult, Task, TaskStatus
from ._transport import Transport
from ._wire import download_error

__all__ = ["DownloadSource"]

logger = logging.getLogger("kling_async")

T = TypeVar("T")

DownloadSource = Task | TaskHandle | Iterable[ImageResult]
"""A finished task, its handle, or the images themselves."""

_CHUNK_SIZE = 256 * 1024
#: ``read_image`` holds a whole image in memory; a 2k PNG is a few MB, so a body
#: far beyond this is a misbehaving server, not an image.
MAX_IMAGE_DOWNLOAD_BYTES = 64 * 1024 * 1024
_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows would otherwise translate newlines
_EXTENSIONS = {".png": ".png", ".jpg": ".jpg", ".jpeg": ".jpg", ".webp": ".webp"}
# File names are built from a task_id the server chose: anything but these
# characters (a "/", a "..", a Windows drive colon) could point outside the folder.
_UNSAFE_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9_.-]")
WATERMARKED_SUFFIX = "_watermarked"


def _extension(url: str) -> str:
    suffix = PurePosixPath(urlsplit(url).path).suffix.lower()
    return _EXTENSIONS.get(suffix, ".png")


def _safe_name_part(text: str) -> str:
    """``text`` made safe as part of one file name: no separator, no leading dot."""
    safe = _UNSAFE_NAME_CHARACTERS.sub("_", text)
    return "_" + safe[1:] if safe.startswith(".") else safe


def finished_task(source: Task | TaskHandle) -> Task:
    """The task of ``source``, which must have succeeded.

    Raises :class:`TaskFailedError` for a failed task and :class:`ValueError`
    for one that has not finished: it has no images yet, and an empty list
    would read as "nothing to download".
    """
    task = source.task if isinstance(source, TaskHandle) else source
    if task is None:
        assert isinstance(source, TaskHandle)
        raise ValueError(f"task {source.task_id} has no known result yet; await it first")
    if task.status is TaskStatus.FAILED:
        raise TaskFailedError(task)
    if task.status is not TaskStatus.SUCCEED:
        raise ValueError(
            f"task {task.task_id} is {task.status}, not finished, and has no images yet; "
            "await its handle (or handle.wait()) first"
        )
    return task


def _targets(source: DownloadSource, directory: Path, watermarked: bool) -> list[tuple[str, Path]]:
    if isinstance(source, (Task, TaskHandle)):
        task = finished_task(source)
        prefix = f"{_safe_name_part(task.task_id)}_"
        images: Sequence[ImageResult] = task.images
    else:
        prefix = ""
        images = tuple(source)
    # Kling numbers images by index; an answer that repeats or omits indexes
    # (parsed as 0) would make two images share one name, so then every image
    # is named by its position instead.
    indexes = [image.index for image in images]
    by_index = len(set(indexes)) == len(indexes) and min(indexes, default=0) >= 0
    suffix = WATERMARKED_SUFFIX if watermarked else ""
    targets = []
    for position, image in enumerate(images):
        url = image.watermark_url if watermarked else image.url
        if not url:
            raise ValueError(f"image {image.index} has no watermarked copy")
        number = image.index if by_index else position
        path = directory / f"{prefix}{number}{suffix}{_extension(url)}"
        assert path.parent == directory  # the name cannot hold a separator
        targets.append((url, path))
    return targets


async def download(
    transport: Transport,
    source: DownloadSource,
    directory: str | os.PathLike[str],
    *,
    concurrency: int = 4,
    overwrite: bool = False,
    watermarked: bool = False,
) -> list[Path]:
    """Download every image of ``source`` into ``directory``; return the paths in
    image order. See :meth:`kling_async.Client.download`."""
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    folder = Path(directory)
    targets = _targets(source, folder, watermarked)
    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    slots = asyncio.Semaphore(concurrency)

    async def fetch(url: str, path: Path) -> Path:
        if not overwrite and await asyncio.to_thread(path.exists):
            logger.debug("download: %s is already complete; skipped", path)
            return path
        async with slots:
            started = time.perf_counter()
            size = await transport.retrying(functools.partial(_save, transport, url, path))
        logger.debug(
            "download: saved %s (%d bytes in %.3fs)", path, size, time.perf_counter() - started
        )
        return path

    return await _all_or_none([fetch(url, path) for url, path in targets])


async def _all_or_none(jobs: Sequence[Awaitable[T]]) -> list[T]:
    """Await ``jobs`` concurrently; if one fails (or the caller is cancelled),
    cancel the others and wait until they have stopped before raising.

    ``asyncio.gather`` would raise the first error at once and leave the other
    downloads writing files in the background after the caller was told the
    download failed.
    """
    if not jobs:
        return []
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()  # a no-op for those already done
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        error = None if task.cancelled() else task.exception()
        if error is not None:
            raise error
    return [task.result() for task in tasks]


def _raise_for_status(response: aiohttp.ClientResponse, url: str) -> None:
    error = download_error(response.status, url)
    if error is not None:
        raise error


async def _save(transport: Transport, url: str, path: Path) -> int:
    # Not tempfile.mkstemp: its files are private (0600), and an image saved for
    # a web server or a colleague should get the permissions the umask gives.
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o666)
    size = 0
    try:
        with os.fdopen(descriptor, "wb") as file:
            async with transport.stream(url) as response:
                _raise_for_status(response, url)
                async for chunk in response.content.iter_chunked(_CHUNK_SIZE):
                    file.write(chunk)
                    size += len(chunk)
        os.replace(partial, path)
    except BaseException:
        os.unlink(partial)
        raise
    return size


async def read_image(
    transport: Transport, image: ImageResult | str, *, watermarked: bool = False
) -> bytes:
    """The bytes of one result image (an :class:`ImageResult` or its URL), in
    memory. See :meth:`kling_async.Client.read`."""
    if isinstance(image, ImageResult):
        url = image.watermark_url if watermarked else image.url
        if not url:
            raise ValueError(f"image {image.index} has no watermarked copy")
    elif watermarked:
        raise ValueError("watermarked=True needs an ImageResult, not a URL")
    else:
        url = image

    async def fetch() -> bytes:
        chunks: list[bytes] = []
        size = 0
        async with transport.stream(url) as response:
            _raise_for_status(response, url)
            async for chunk in response.content.iter_chunked(_CHUNK_SIZE):
                size += len(chunk)
                if size > MAX_IMAGE_DOWNLOAD_BYTES:
                    raise APIError(  # not a TransportError: a retry would fare no better
                        f"GET {url} sent more than {MAX_IMAGE_DOWNLOAD_BYTES:,} bytes; "
                        "not an image result",
                        http_status=response.status,
                    )
                chunks.append(chunk)
        return b"".join(chunks)

    started = time.perf_counter()
    data = await transport.retrying(fetch)
    logger.debug("read %d bytes of %s in %.3fs", len(data), url, time.perf_counter() - started)
    return data
