"""Batch keys belong to the input, not to its valid subset or to positions.

A request's key in a journal is its own (``BatchItem(request, key=...)``, a JSONL
line's ``"key"``) or its content plus how many identical requests precede it;
editing, inserting or deleting other requests never re-creates one already
created. Through ``client.batch`` and through ``kling-async batch``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kling_async import BatchItem, ImageGenerationRequest, ValidationError
from kling_async._batch import batch_key, content_digest, printable_name
from kling_async.testing import FakeKlingServer
from tests.helpers import API_KEY, FakeServerProcess, fake_server_process, make_client

# --- client.batch -------------------------------------------------------------------------


def requests(*prompts: str) -> list[ImageGenerationRequest]:
    return [ImageGenerationRequest(prompt=prompt) for prompt in prompts]


def prompts_on(server: FakeKlingServer) -> list[str]:
    return sorted(str(task.prompt) for task in server.tasks.values())


async def test_inserting_and_deleting_requests_recreates_none(tmp_path: Path) -> None:
    journal = tmp_path / "journal.db"
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.05) as server:
        async with make_client(server) as client:
            await client.batch(requests("a", "b", "c"), journal=journal).collect()
            inserted = await client.batch(requests("new", "a", "b", "c"), journal=journal).collect()
            deleted = await client.batch(requests("a", "c"), journal=journal).collect()
        assert [r.resumed for r in inserted] == [False, True, True, True]
        assert [r.resumed for r in deleted] == [True, True]
        assert prompts_on(server) == ["a", "b", "c", "new"]


async def test_identical_requests_are_distinct_tasks_and_a_copy_adds_one(tmp_path: Path) -> None:
    journal = tmp_path / "journal.db"
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.05) as server:
        async with make_client(server) as client:
            await client.batch(requests("same", "other", "same"), journal=journal).collect()
            assert prompts_on(server) == ["other", "same", "same"]
            again = await client.batch(
                requests("same", "same", "other", "same"), journal=journal
            ).collect()
        assert sum(not r.resumed for r in again) == 1
        assert prompts_on(server) == ["other", "same", "same", "same"]


async def test_an_explicit_key_is_the_request_whatever_its_content(tmp_path: Path) -> None:
    journal = tmp_path / "journal.db"
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.05) as server:
        async with make_client(server) as client:
            first = [BatchItem(request=r, key=f"k{i}") for i, r in enumerate(requests("a", "b"))]
            await client.batch(first, journal=journal, name="one").collect()
            # Edited content, another order, another batch name: the keys decide.
            edited = [
                BatchItem(request=ImageGenerationRequest(prompt="b, edited"), key="k1"),
                BatchItem(request=ImageGenerationRequest(prompt="a"), key="k0"),
            ]
            results = await client.batch(edited, journal=journal, name="two").collect()
        assert [r.resumed for r in results] == [True, True]
        assert prompts_on(server) == ["a", "b"]


async def test_a_key_repeated_in_one_batch_is_refused_and_sends_nothing(tmp_path: Path) -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.05) as server:
        async with make_client(server) as client:
            items = [BatchItem(request=r, key="same") for r in requests("a", "b")]
            results = await client.batch(items, journal=tmp_path / "j.db").collect()
        assert results[0].ok
        assert isinstance(results[1].error, ValidationError)
        assert results[1].error.field == "key"
        assert prompts_on(server) == ["a"]


@pytest.mark.parametrize("key", ["", "x" * 257, "lone \ud800 surrogate", 7])
def test_a_key_is_checked_when_the_item_is_built(key: object) -> None:
    with pytest.raises(ValidationError) as raised:
        BatchItem(request=ImageGenerationRequest(prompt="p"), key=key)  # type: ignore[arg-type]
    assert raised.value.field == "key"


async def test_a_journal_written_with_the_old_positional_keys_is_resumed(tmp_path: Path) -> None:
    """A journal of 0.1.0 keyed requests ``name#position#digest``: the same input
    run again with this version creates nothing."""
    journal = tmp_path / "journal.db"
    batch = requests("a", "b", "a")
    async with FakeKlingServer(api_key=API_KEY, task_duration=0.05) as server:
        async with make_client(server) as client:
            await client.batch(batch, journal=journal, name="p.jsonl").collect()
        occurrences: dict[str, int] = {}
        with sqlite3.connect(journal) as connection:  # the keys 0.1.0 wrote
            for position, request in enumerate(batch):
                digest = content_digest(request)
                occurrence = occurrences.setdefault(digest, 0)
                occurrences[digest] += 1
                connection.execute(
                    "UPDATE entries SET key = ? WHERE key = ?",
                    (f"p.jsonl#{position}#{digest}", batch_key("p.jsonl", digest, occurrence)),
                )
        async with make_client(server) as client:
            again = await client.batch(batch, journal=journal, name="p.jsonl").collect()
            assert all(r.resumed and r.ok for r in again)
            # Known under the new keys now: positions may change.
            edited = [*requests("new"), *batch]
            last = await client.batch(edited, journal=journal, name="p.jsonl").collect()
        assert [r.resumed for r in last] == [False, True, True, True]
        assert prompts_on(server) == ["a", "a", "b", "new"]


def test_a_name_that_was_not_utf8_gives_a_key_without_surrogates() -> None:
    name = os.fsdecode(b"caf\xe9.jsonl")
    assert printable_name(name) == "caf\\xe9.jsonl"
    key = batch_key(name, "0" * 32, 0)
    key.encode("utf-8")  # storable: no lone surrogate
    assert printable_name("plain.jsonl") == "plain.jsonl"


# --- kling-async batch ------------------------------------------------------------------


@pytest.fixture(scope="module")
def kling() -> Iterator[FakeServerProcess]:
    with fake_server_process("--task-duration", "0.1") as process:
        yield process


def batch(
    kling: FakeServerProcess, requests_file: Path | bytes, out: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "kling_async",
            "--api-key",
            API_KEY,
            "--base-url",
            kling.url,
            "batch",
            requests_file,
            "--out",
            str(out),
            "--no-download",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def tasks_of(kling: FakeServerProcess, tag: str) -> list[str]:
    """The prompts of the tasks the fake holds that contain ``tag``, sorted."""
    return sorted(task["prompt"] for task in kling.tasks() if tag in task["prompt"])


def write(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_fixing_an_invalid_line_creates_that_line_only(
    kling: FakeServerProcess, tmp_path: Path
) -> None:
    tag = "fix-" + tmp_path.name
    file = tmp_path / "prompts.jsonl"
    one, three, four = (json.dumps(f"{tag} {n}") for n in (1, 3, 4))
    write(file, one, json.dumps({"prompt": f"{tag} 2", "n": 12}), three, four)
    assert batch(kling, file, tmp_path / "out").returncode == 1  # line 2 invalid
    write(file, one, json.dumps({"prompt": f"{tag} 2", "n": 2}), three, four)
    fixed = batch(kling, file, tmp_path / "out")
    assert fixed.returncode == 0, fixed.stderr
    assert tasks_of(kling, tag) == [f"{tag} {n}" for n in (1, 2, 3, 4)]


def test_inserting_deleting_and_editing_other_lines_recreates_none(
    kling: FakeServerProcess, tmp_path: Path
) -> None:
    tag = "edit-" + tmp_path.name
    file = tmp_path / "prompts.jsonl"
    a, b, c = (json.dumps(f"{tag} {n}") for n in "abc")
    write(file, a, b, c)
    assert batch(kling, file, tmp_path / "out").returncode == 0
    write(file, '"an invalid line', json.dumps(f"{tag} new"), a, c, json.dumps(f"{tag} b2"))
    assert batch(kling, file, tmp_path / "out").returncode == 1  # the invalid line
    assert tasks_of(kling, tag) == sorted(f"{tag} {n}" for n in ("a", "b", "c", "new", "b2"))


def test_a_line_with_a_key_is_its_key_and_a_repeated_key_is_refused(
    kling: FakeServerProcess, tmp_path: Path
) -> None:
    tag = "key-" + tmp_path.name
    file = tmp_path / "prompts.jsonl"
    write(file, json.dumps({"key": "first", "prompt": f"{tag} one"}))
    assert batch(kling, file, tmp_path / "out").returncode == 0
    write(
        file,
        json.dumps({"prompt": f"{tag} two"}),
        json.dumps({"key": "first", "prompt": f"{tag} one, reworded"}),
        json.dumps({"key": "first", "prompt": f"{tag} three"}),
    )
    again = batch(kling, file, tmp_path / "out")
    assert again.returncode == 1
    assert "line 3: invalid key: 'first' is also the key of line 2" in again.stderr
    assert tasks_of(kling, tag) == [f"{tag} one", f"{tag} two"]
    results = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert [json.loads(line).get("key") for line in results] == [None, "first", None]


def test_a_requests_file_whose_name_is_not_utf8_runs(
    kling: FakeServerProcess, tmp_path: Path
) -> None:
    tag = "latin1-" + tmp_path.name
    file = os.path.join(os.fsencode(tmp_path), b"caf\xe9.jsonl")
    with open(file, "w", encoding="utf-8") as out:
        out.write(json.dumps(f"{tag} one") + "\n")
    first = batch(kling, file, tmp_path / "out")
    assert first.returncode == 0, first.stderr
    again = batch(kling, file, tmp_path / "out")  # found again under the same key
    assert again.returncode == 0, again.stderr
    assert "finished in an earlier run" in again.stderr
    assert tasks_of(kling, tag) == [f"{tag} one"]
