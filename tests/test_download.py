"""client.download: streamed, atomic, skips complete files, retries, no credentials sent."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import attrs
import pytest

import kling_async
from kling_async import (
    ImageResult,
    NotFoundError,
    TaskStatus,
)
from kling_async.testing import FakeKlingServer
from tests.helpers import assert_valid_png, eventually


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
    plain = await client.download(task, tmp_path / "both")
    # Beside the plain copies, not skipped as if they were them.
    marked = await client.download(task, tmp_path / "both", watermarked=True)
    assert [p.name for p in marked] == [
        f"{task.task_id}_0_watermarked.png",
        f"{task.task_id}_1_watermarked.png",
    ]
    assert len(list((tmp_path / "both").iterdir())) == 4
    assert marked[0].read_bytes() != plain[0].read_bytes()
    bare = await client.download(task.images, tmp_path / "bare", concurrency=1)
    assert [p.name for p in bare] == ["0.png", "1.png"]
    assert marked[0].read_bytes() != bare[0].read_bytes()
    unmarked = await (await client.images.generate(prompt="p"))
    with pytest.raises(ValueError, match="watermarked"):
        await client.download(unmarked, tmp_path, watermarked=True)
    with pytest.raises(ValueError, match="concurrency"):
        await client.download(unmarked, tmp_path, concurrency=0)


async def test_a_handle_without_a_result_cannot_be_downloaded(
    client: kling_async.Client, tmp_path: Path
) -> None:
    handle = client.images.attach("unknown")
    with pytest.raises(ValueError, match="await it first"):
        await client.download(handle, tmp_path)
    task = await (await client.images.generate(prompt="p"))
    assert task.status is TaskStatus.SUCCEED


async def test_an_unfinished_or_failed_task_is_an_error_not_an_empty_list(
    client: kling_async.Client, tmp_path: Path
) -> None:
    running = await client.images.generate(prompt="p")
    for source in (running, running.task, await client.images.get(running.task_id)):
        assert source is not None
        with pytest.raises(ValueError, match=r"is (submitted|process\w+), not finished.*await"):
            await client.download(source, tmp_path)
    failing = await client.images.generate(prompt="[fail] p")
    with pytest.raises(kling_async.TaskFailedError):
        await failing
    for source in (failing, failing.task):
        assert source is not None
        with pytest.raises(kling_async.TaskFailedError, match="Content review failed"):
            await client.download(source, tmp_path)
    assert list(tmp_path.iterdir()) == []
    await running


async def test_one_failed_image_stops_the_others_before_the_error_is_raised(
    client: kling_async.Client, server: FakeKlingServer, tmp_path: Path
) -> None:
    task = await (await client.images.generate(prompt="p", n=3))
    server.inject("error", route="download", code=1203)  # one image: 404
    server.inject("delay", route="download", delay=0.2, times=2)  # the others: slow
    with pytest.raises(NotFoundError):
        await client.download(task, tmp_path)
    await asyncio.sleep(0.3)  # past the slow answers: nothing may still be writing
    assert list(tmp_path.iterdir()) == []


async def test_a_cancelled_download_leaves_nothing_running_or_half_written(
    client: kling_async.Client, server: FakeKlingServer, tmp_path: Path
) -> None:
    task = await (await client.images.generate(prompt="p", n=2))
    server.inject("delay", route="download", delay=0.5, times=2)
    job = asyncio.ensure_future(client.download(task, tmp_path))
    # Until both requests are in; their answers are slow.
    await eventually(lambda: len(server.requests_for("download")) == 2)
    assert list(tmp_path.iterdir())  # the partial files being written
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert list(tmp_path.iterdir()) == []  # stopped and cleaned up before the raise
    await asyncio.sleep(0.6)  # past the slow answers: nothing writes on
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("task_id", ["../escaped", "a/b", "..", "/abs/path", "c:\\x", ".hidden"])
async def test_a_task_id_never_writes_outside_the_directory(
    client: kling_async.Client, tmp_path: Path, task_id: str
) -> None:
    task = await (await client.images.generate(prompt="p", n=2))
    out = tmp_path / "deep" / "out"
    paths = await client.download(attrs.evolve(task, task_id=task_id), out)
    assert len(paths) == 2
    assert all(path.parent == out and not path.name.startswith(".") for path in paths)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        p.name for p in paths
    )
    for path in paths:
        assert_valid_png(path)


async def test_two_images_never_share_a_file_name(
    client: kling_async.Client, tmp_path: Path
) -> None:
    task = await (await client.images.generate(prompt="p", n=3, aspect_ratio="1:1"))
    first, second, third = task.images
    # As a gateway might answer: indexes repeated, or missing (parsed as 0).
    repeated = attrs.evolve(
        task,
        images=(
            first,
            attrs.evolve(second, index=0),
            attrs.evolve(third, index=0),
        ),
    )
    paths = await client.download(repeated, tmp_path)
    assert [p.name for p in paths] == [f"{task.task_id}_{i}.png" for i in range(3)]
    assert len({p.read_bytes() for p in paths}) == 1  # same size PNGs, but three files
    assert len(list(tmp_path.iterdir())) == 3


async def test_read_gives_an_image_s_bytes_without_touching_the_disk(
    client: kling_async.Client, server: FakeKlingServer, tmp_path: Path
) -> None:
    task = await (await client.images.generate(prompt="p", watermark=True))
    [image] = task.images
    data = await client.read(image)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert await client.read(image.url) == data
    marked = await client.read(image, watermarked=True)
    assert marked.startswith(b"\x89PNG")
    assert marked != data
    [path] = await client.download(task, tmp_path)
    assert path.read_bytes() == data
    assert all(not request.authorization for request in server.requests_for("download"))
    server.inject("garbage", route="download", http_status=503)
    assert await client.read(image) == data  # retried
    with pytest.raises(NotFoundError, match="expire"):
        await client.read(f"{server.origin}/results/gone/0.png")
    with pytest.raises(ValueError, match="ImageResult"):
        await client.read(image.url, watermarked=True)


# --- overwrites and extensions (mutation tests dl02, dl07) ----------------------------------------


async def test_a_failed_overwrite_keeps_the_old_file(
    client: kling_async.Client, server: FakeKlingServer, tmp_path: Path
) -> None:
    task_done = await (await client.images.generate(prompt="p"))
    [path] = await client.download(task_done, tmp_path)
    before = path.read_bytes()
    server.inject("garbage", route="download", http_status=404, times=None)
    with pytest.raises(NotFoundError):
        await client.download(task_done, tmp_path, overwrite=True)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


async def test_file_extension_follows_the_url(
    client: kling_async.Client, server: FakeKlingServer, tmp_path: Path
) -> None:
    task_done = await (await client.images.generate(prompt="p"))
    url = task_done.images[0].url
    renamed = [kling_async.ImageResult(index=0, url=url + "?as=photo.jpg")]
    assert (await client.download(renamed, tmp_path))[0].suffix == ".png"  # path, not query
    cdn = [kling_async.ImageResult(index=3, url=f"{server.origin}/results/x/3.jpeg")]
    with pytest.raises(NotFoundError):
        await client.download(cdn, tmp_path)
    assert not (tmp_path / "3.jpg").exists()
