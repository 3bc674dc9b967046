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
import os
import secrets
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from ._exceptions import error_class_for
from ._handle import TaskHandle
from ._models import ImageResult, Task
from ._transport import Transport

__all__ = ["DownloadSource", "download"]

DownloadSource = Task | TaskHandle | Iterable[ImageResult]
"""A finished task, its handle, or the images themselves."""

_CHUNK_SIZE = 256 * 1024
_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows would otherwise translate newlines
_EXTENSIONS = {".png": ".png", ".jpg": ".jpg", ".jpeg": ".jpg", ".webp": ".webp"}


def _extension(url: str) -> str:
    suffix = PurePosixPath(urlsplit(url).path).suffix.lower()
    return _EXTENSIONS.get(suffix, ".png")


def _targets(source: DownloadSource, directory: Path, watermarked: bool) -> list[tuple[str, Path]]:
    if isinstance(source, TaskHandle):
        if source.task is None:
            raise ValueError(f"task {source.task_id} has no known result yet; await it first")
        source = source.task
    prefix = f"{source.task_id}_" if isinstance(source, Task) else ""
    images = source.images if isinstance(source, Task) else tuple(source)
    targets = []
    for image in images:
        url = image.watermark_url if watermarked else image.url
        if not url:
            raise ValueError(f"image {image.index} has no watermarked copy")
        targets.append((url, directory / f"{prefix}{image.index}{_extension(url)}"))
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
            return path
        async with slots:
            await transport.retrying(functools.partial(_save, transport, url, path))
        return path

    return list(await asyncio.gather(*(fetch(url, path) for url, path in targets)))


async def _save(transport: Transport, url: str, path: Path) -> None:
    # Not tempfile.mkstemp: its files are private (0600), and an image saved for
    # a web server or a colleague should get the permissions the umask gives.
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as file:
            async with transport.stream(url) as response:
                if response.status != 200:
                    expired = response.status in (403, 404, 410)
                    raise error_class_for(None, response.status)(
                        f"downloading {url} failed"
                        + (": result URLs expire 30 days after generation" if expired else ""),
                        http_status=response.status,
                    )
                async for chunk in response.content.iter_chunked(_CHUNK_SIZE):
                    file.write(chunk)
        os.replace(partial, path)
    except BaseException:
        os.unlink(partial)
        raise
