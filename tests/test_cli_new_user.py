"""The CLI in a new user's hands, round two (issue 28): hints that name only flags the
command has, ``--json`` timeouts as data, results files checked before anything is sent,
and the frictions of the offline simulation."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner, Result
from rich.console import Console

from kling_async import Client, ConfigurationError, ImageGenerationRequest, Journal
from kling_async._cli import main
from kling_async._cli.runner import BatchProgress as _BatchProgress
from kling_async.testing import FakeKlingServer
from tests.helpers import clean_env
from tests.test_cli import display_settings

FAST = ["--mock-task-seconds", "0.1"]


def invoke(*args: str, **env: str) -> Result:
    return CliRunner(env={"COLUMNS": "200", **env}).invoke(main, list(args))


# --- defect 2: a not-found hint names only the flags the command has --------------------


def test_a_task_not_found_by_status_or_download_does_not_advise_a_model_flag(
    tmp_path: Path,
) -> None:
    for args in (["status", "nope123"], ["download", "nope123", "--out", str(tmp_path)]):
        result = invoke(*FAST, *args)
        assert result.exit_code == 1, result.output
        assert "Check the task id and --base-url." in result.stderr
        assert "--model" not in result.stderr


# --- defect 3: a --json timeout gives the task id and status as fields ------------------


def test_a_json_timeout_gives_the_task_id_and_status_as_fields(tmp_path: Path) -> None:
    result = invoke(
        "--mock-task-seconds", "30", "--json", "generate", "p", "--timeout", "0.2",
        "--out", str(tmp_path),
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    record = json.loads(result.stdout)
    assert record["task_id"]
    assert record["status"] in ("submitted", "processing")
    assert record["timed_out"] is True
    assert f"kling-async status {record['task_id']}" in record["next_step"]
    error = json.loads(result.stderr.strip().splitlines()[-1])["error"]
    assert error["task_id"] == record["task_id"]
    assert error["status"] == record["status"]


# --- defect 5: an unwritable --results is refused before anything is sent ---------------


def test_an_unwritable_results_file_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    requests = tmp_path / "p.jsonl"
    requests.write_text('"a lighthouse"\n', encoding="utf-8")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    results = blocker / "r.jsonl"
    for extra in ([], ["--no-download"]):
        out = [] if extra else ["--out", str(tmp_path / "images")]
        result = invoke(*FAST, "batch", str(requests), *out, "--results", str(results), *extra)
        assert result.exit_code == 2, result.output
        assert f"cannot write results to {results}: " in result.stderr
        assert result.stderr.rstrip().endswith("; nothing was sent")
        assert ".partial" not in result.stderr
        assert "OFFLINE" not in result.stderr  # no server was even started
        assert result.stderr.strip().count("\n") == 0


# --- defect 4: an intent that never reached the wire is "not sent", always -------------


async def run_batch(url: str, journal: Path, requests: list[ImageGenerationRequest]) -> None:
    async with Client(base_url=url, journal=journal) as client:
        async for _result in client.batch(requests, name="prompts"):
            pass


async def test_a_journaled_batch_without_credentials_says_not_sent_on_every_run(
    server: FakeKlingServer, tmp_path: Path
) -> None:
    """Nothing reaches Kling without a key: no run may call the create "uncertain"
    or say that the task may exist, and the journal never holds it as sent."""
    journal = tmp_path / "kling-journal.db"
    requests = [ImageGenerationRequest(prompt="a red fox")]
    for _run in range(2):
        with pytest.raises(ConfigurationError) as raised:  # a setting to fix: the batch stops
            await run_batch(server.url, journal, requests)
        assert raised.value.create_outcome == "nothing was sent"
        assert "may exist" not in str(raised.value)
        ledger = Journal(journal)
        try:
            assert await ledger.unsettled() == []
        finally:
            await ledger.close()
    assert sum(server.stats()["requests"].values()) == 0


# --- friction 11: the offline notice once, on stderr; -v is the library's lines ---------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kling_async", *args],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
        check=False,
    )


def test_verbose_shows_kling_async_lines_once_notice_and_no_asyncio_noise() -> None:
    result = run_cli("-v", *FAST, "--json", "generate", "p", "--no-download")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "succeed"  # stdout is the record alone
    assert result.stderr.count("OFFLINE SIMULATION") == 1
    assert "DEBUG kling_async: POST /v1/images/generations" in result.stderr
    assert "asyncio" not in result.stderr


# --- friction 14: a batch line with watermark_info saves the watermarked copies ---------


def test_a_batch_line_with_watermark_info_saves_the_watermarked_copies(tmp_path: Path) -> None:
    requests = tmp_path / "p.jsonl"
    line = {"prompt": "p", "n": 2, "watermark_info": {"enabled": True}}
    requests.write_text(json.dumps(line) + '\n"plain"\n', encoding="utf-8")
    out = tmp_path / "out"
    result = invoke(*FAST, "batch", str(requests), "--out", str(out))
    assert result.exit_code == 0, result.output
    marked, plain = (json.loads(text) for text in (out / "results.jsonl").read_text().splitlines())
    task_id = marked["task_id"]
    assert sorted(Path(path).name for path in marked["paths"]) == sorted(
        [f"{task_id}_{i}.png" for i in (0, 1)] + [f"{task_id}_{i}_watermarked.png" for i in (0, 1)]
    )
    assert all(Path(path).exists() for path in marked["paths"])
    assert [Path(path).name for path in plain["paths"]] == [f"{plain['task_id']}_0.png"]


# --- friction 15: rate and ETA count this run's work; the table fits 80 columns ---------


def test_a_resumed_run_s_rate_and_eta_count_only_this_run_s_work() -> None:
    console = Console(file=io.StringIO(), force_terminal=True, width=200)
    settings = display_settings(console)
    now = [100.0]
    display = _BatchProgress(settings, total=100, clock=lambda: now[0])
    now[0] += 10  # 90 lines read back from the journal at once, 5 made in 10 s
    display.update(SimpleNamespace(pending=[]), done=95, failed=0, resumed=90)  # type: ignore[arg-type]
    console.print(display.progress.get_renderable())
    shown = console.file.getvalue()  # type: ignore[attr-defined]
    assert "95/100" in shown
    assert "· 0.5/s" in shown
    assert "0:00:10" in shown  # 5 lines left at 0.5/s


def test_the_status_table_fits_80_columns(tmp_path: Path) -> None:
    created = invoke(*FAST, "--json", "generate", "[fail] p", "--no-download")
    task_id = json.loads(created.stderr.strip().splitlines()[-1])["error"]["task_id"]
    shown = invoke(*FAST, "status", task_id, COLUMNS="80")
    assert shown.exit_code == 0, shown.output
    assert task_id in shown.stdout
    assert "Content review failed" in " ".join(shown.stdout.split())
    assert max(len(line.rstrip()) for line in shown.stdout.splitlines()) <= 80


# --- friction 12: "did you mean", resolved image paths ----------------------------------


def test_unknown_fields_get_a_did_you_mean(tmp_path: Path) -> None:
    requests = tmp_path / "p.jsonl"
    lines = [
        {"prompt": "p", "aspectratio": "1:1"},
        {"prompt": "p", "subject_image": "a.png"},
        {"prompt": "p", "subject_images": ["a.png"], "subject_image": "a.png"},
    ]
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    result = invoke(*FAST, "batch", str(requests), "--out", str(tmp_path / "out"))
    assert result.exit_code == 1, result.output
    expected = [
        "line 1: invalid aspectratio: is not a field of ImageGenerationRequest "
        "(did you mean aspect_ratio?)",
        "line 2: invalid subject_image: is not a field of ImageGenerationRequest "
        "(did you mean subject_images, of a multi-image request?)",
        "line 3: invalid subject_image: is not a field of MultiImageRequest "
        "(did you mean subject_images?)",
    ]
    for line in expected:
        assert line in result.stderr


def test_a_missing_image_names_the_path_it_was_looked_for_at(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke(*FAST, "generate", "p", "--image", "shots/cat.png")
    assert result.exit_code == 2, result.output
    assert f"image file shots/cat.png does not exist (looked for {tmp_path}/shots/cat.png)" in (
        result.stderr
    )
    folder = tmp_path / "jobs"
    folder.mkdir()
    requests = folder / "p.jsonl"
    requests.write_text('{"prompt": "p", "image": "cat.png"}\n', encoding="utf-8")
    batch = invoke(*FAST, "batch", "jobs/p.jsonl", "--out", "out")
    assert batch.exit_code == 1, batch.output
    assert f"image file {folder}/cat.png does not exist" in batch.stderr  # the file's folder


def test_list_with_no_tasks_says_so_with_json_too() -> None:
    result = invoke(*FAST, "--json", "list")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # JSON lines: none
    assert "no text-to-image tasks found" in result.stderr
