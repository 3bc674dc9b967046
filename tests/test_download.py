"""client.download: streamed, atomic, skips complete files, retries, no credentials sent."""

from __future__ import annotations

import os
import stat
import zlib
from pathlib import Path

import pytest

import kling_async
from kling_async import ImageResult, NotFoundError, TaskStatus
from kling_async.testing import FakeKlingServer


def assert_valid_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    position = 8
    kinds = []
    while position < len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        payload = data[position + 8 : position + 8 + length]
        crc = int.from_bytes(data[position + 8 + length : position + 12 + length], "big")
        assert zlib.crc32(kind + payload) & 0xFFFFFFFF == crc
        kinds.append(kind)
        position += 12 + length
    assert kinds[0] == b"IHDR"
    assert kinds[-1] == b"IEND"
    assert b"IDAT" in kinds


async def test_downloads_every_image_as_real_png_named_by_task_and_index(
    client: kling_async.Client, server: FakeKlingServer, tmp_path: Path
) -> None:
    task = await (await client.images.generate(prompt="p", n=3))
    paths = await client.download(task, tmp_path / "out")
    assert paths == [tmp_path / "out" / f"{task.task_id}_{i}.png" for i in range(3)]
    for path in paths:
        assert_valid_png(path)
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == []
    downloads = server.requests_for("download")
    assert len(downloads) == 3
    assert all(not request.authorization for request in downloads)  # no token to the CDN


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
async def test_saved_files_get_the_permissions_the_umask_gives(
    client: kling_async.Client, tmp_path: Path
) -> None:
    task = await (await client.images.generate(prompt="p"))
    old_umask = os.umask(0o022)
    try:
        [path] = await client.download(task, tmp_path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not a private temp file's 0600


async def test_existing_files_are_skipped_and_overwrite_refetches(
    client: kling_async.Client, server: FakeKlingServer, tmp_path: Path
) -> None:
    handle = await client.images.generate(prompt="p", n=2)
    await handle
    first = await client.download(handle, tmp_path)
    assert len(server.requests_for("download")) == 2
    first[0].unlink()  # as if a crash happened before the second file was written
    again = await client.download(handle, tmp_path)
    assert again == first
    assert len(server.requests_for("download")) == 3
    await client.download(handle, tmp_path, overwrite=True)
    assert len(server.requests_for("download")) == 5


async def test_transient_download_errors_are_retried(
    client: kling_async.Client, server: FakeKlingServer, tmp_path: Path
) -> None:
    task = await (await client.images.generate(prompt="p"))
    server.inject("garbage", route="download", http_status=503, times=2)
    [path] = await client.download(task, tmp_path)
    assert_valid_png(path)
    assert [r.http_status for r in server.requests_for("download")][-1] == 200


async def test_a_dropped_download_leaves_no_partial_file(
    client: kling_async.Client, server: FakeKlingServer, tmp_path: Path
) -> None:
    task = await (await client.images.generate(prompt="p"))
    server.inject("drop", route="download", times=None)
    with pytest.raises(kling_async.TransportError):
        await client.download(task, tmp_path)
    assert list(tmp_path.iterdir()) == []


async def test_expired_urls_say_so(
    client: kling_async.Client, server: FakeKlingServer, tmp_path: Path
) -> None:
    images = [ImageResult(index=0, url=f"{server.origin}/results/gone/0.png")]
    with pytest.raises(NotFoundError, match="expire"):
        await client.download(images, tmp_path)
    assert len(server.requests_for("download")) == 1


async def test_watermarked_copies_and_bare_image_lists(
    client: kling_async.Client, tmp_path: Path
) -> None:
    task = await (await client.images.generate(prompt="p", n=2, watermark=True))
    marked = await client.download(task, tmp_path / "wm", watermarked=True)
    assert [p.name for p in marked] == [f"{task.task_id}_0.png", f"{task.task_id}_1.png"]
    bare = await client.download(task.images, tmp_path / "bare", concurrency=1)
    assert [p.name for p in bare] == ["0.png", "1.png"]
    assert marked[0].read_bytes() != bare[0].read_bytes()
    plain = await (await client.images.generate(prompt="p"))
    with pytest.raises(ValueError, match="watermarked"):
        await client.download(plain, tmp_path, watermarked=True)
    with pytest.raises(ValueError, match="concurrency"):
        await client.download(plain, tmp_path, concurrency=0)


async def test_a_handle_without_a_result_cannot_be_downloaded(
    client: kling_async.Client, tmp_path: Path
) -> None:
    handle = client.images.attach("unknown")
    with pytest.raises(ValueError, match="await it first"):
        await client.download(handle, tmp_path)
    task = await (await client.images.generate(prompt="p"))
    assert task.status is TaskStatus.SUCCEED
