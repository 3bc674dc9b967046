"""The kling-async command line, through click's runner and as a real subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result
from rich.console import Console

from kling_async import ImageGenerationRequest
from kling_async._cli import main
from kling_async._cli.runner import BatchProgress as _BatchProgress
from kling_async._cli.session import Settings, rerun_hint
from kling_async.testing import FakeKlingServer
from tests.helpers import API_KEY, assert_valid_png, clean_env, fake_server_process, make_client
from tests.imagedata import png

FAST = ["--mock-task-seconds", "0.1"]


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kling_async", *args],
        capture_output=True,
        text=True,
        env=env or clean_env(),
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    """A FakeKlingServer in its own process, like a remote API."""
    with fake_server_process("--task-duration", "0.2", "--record-requests") as server:
        yield server.url


def online(server_url: str, *args: str) -> list[str]:
    return ["--api-key", API_KEY, "--base-url", server_url, *args]


# --- in-process, through click's runner --------------------------------------------


def test_offline_generate_writes_real_pngs_and_says_it_is_a_simulation(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, [*FAST, "generate", "a lighthouse at dusk", "-n", "2", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert "OFFLINE SIMULATION" in result.stderr
    paths = [Path(line) for line in result.stdout.split()]
    assert len(paths) == 2
    for path in paths:
        assert path.parent == tmp_path
        assert_valid_png(path)


def test_json_output_is_one_machine_readable_object(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, [*FAST, "--mock", "--json", "generate", "p", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["status"] == "succeed"
    assert len(record["images"]) == 1
    assert Path(record["paths"][0]).exists()


def test_multi_image_offline(tmp_path: Path) -> None:
    subject = tmp_path / "subject.png"
    subject.write_bytes(png(400, 400))
    result = CliRunner().invoke(
        main,
        [
            *FAST,
            "multi-image",
            "--subject",
            str(subject),
            "--subject",
            str(subject),
            "blend",
            "--out",
            str(tmp_path / "out"),
            "--aspect-ratio",
            "1:1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert_valid_png(Path(result.stdout.split()[0]))


def test_validation_error_is_one_line_exit_2_and_nothing_sent(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, [*FAST, "generate", "p", "--image", "missing.png"])
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0
    assert "invalid --image: image file missing.png does not exist" in result.stderr
    assert "nothing was sent" in result.stderr
    assert "Traceback" not in result.stderr
    assert "OFFLINE" not in result.stderr  # rejected before any server was started


def test_validation_error_as_json(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        ["--json", "multi-image", "--subject", "https://a/b.png"] * 1 + ["-n", "1", "x" * 2501],
    )
    assert result.exit_code == 2
    error = json.loads(result.stderr)["error"]
    assert error["type"] == "ValidationError"
    assert error["field"] == "prompt"


def test_failed_task_exits_1_with_kling_message(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, [*FAST, "generate", "[fail] this", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "failed: Content review failed" in result.stderr
    assert "Traceback" not in result.stderr


def test_usage_errors_from_click() -> None:
    result = CliRunner().invoke(main, ["generate", "p", "-n", "10"])
    assert result.exit_code == 2
    assert "-n" in result.stderr


# --- against a separate server process --------------------------------------------------


def test_api_error_prints_code_message_request_id_and_advice(server_url: str) -> None:
    result = run_cli("--api-key", "wrong-key", "--base-url", server_url, "generate", "p")
    assert result.returncode == 1
    line = result.stderr.strip()
    assert "\n" not in line
    assert "[1002]" in line
    assert "request_id=" in line
    assert "Check the key given with --api-key." in line  # what to do next, for this key
    assert "KLING_API_KEY" not in line
    assert "clock" not in line
    assert "Traceback" not in result.stderr
    assert "OFFLINE" not in result.stderr


def test_verbose_shows_the_traceback(server_url: str) -> None:
    result = run_cli("-v", "--api-key", "wrong-key", "--base-url", server_url, "status", "x")
    assert result.returncode == 1
    assert "Traceback" in result.stderr


def test_online_generate_status_list_and_download_resume(server_url: str, tmp_path: Path) -> None:
    created = run_cli(*online(server_url, "--json", "generate", "p", "-n", "2", "--no-download"))
    assert created.returncode == 0, created.stderr
    task_id = json.loads(created.stdout)["task_id"]

    status = run_cli(*online(server_url, "--json", "status", task_id))
    assert json.loads(status.stdout)["status"] == "succeed"
    table = run_cli(*online(server_url, "list", "--limit", "5"))
    assert table.returncode == 0
    assert task_id in table.stdout

    out = tmp_path / "images"
    first = run_cli(*online(server_url, "download", task_id, "--out", str(out)))
    assert first.returncode == 0, first.stderr
    paths = [Path(p) for p in first.stdout.split()]
    assert [p.name for p in paths] == [f"{task_id}_0.png", f"{task_id}_1.png"]
    kept = paths[0].stat().st_mtime_ns
    paths[1].unlink()  # as if the first run died half way
    second = run_cli(*online(server_url, "download", task_id, "--out", str(out)))
    assert second.returncode == 0
    assert "1 of 2 files were already complete" in second.stderr
    assert paths[0].stat().st_mtime_ns == kept
    assert_valid_png(paths[1])


def test_no_credentials_means_offline(tmp_path: Path) -> None:
    result = run_cli("--mock-task-seconds", "0.1", "generate", "p", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "OFFLINE SIMULATION" in result.stderr
    assert_valid_png(Path(result.stdout.split()[0]))


def test_an_unknown_task_id_hints_at_multi_image(server_url: str) -> None:
    result = run_cli(*online(server_url, "status", "no-such-task"))
    assert result.returncode == 1
    assert "1203" in result.stderr
    assert "--multi-image" in result.stderr


def test_half_a_key_pair_is_an_error_not_an_offline_run(tmp_path: Path) -> None:
    env = {**clean_env(), "KLING_ACCESS_KEY": "only-the-access-key"}
    result = run_cli("generate", "p", "--out", str(tmp_path), env=env)
    assert result.returncode == 1
    assert "KLING_SECRET_KEY" in result.stderr
    assert "OFFLINE" not in result.stderr
    assert "only-the-access-key" not in result.stderr + result.stdout
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_exits_cleanly_naming_submitted_tasks(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kling_async",
            "--mock-task-seconds",
            "60",
            "generate",
            "p",
            "--out",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(COLUMNS="200"),
    )
    assert process.stderr is not None
    deadline = time.monotonic() + 30
    seen = ""
    while "submitted task" not in seen and time.monotonic() < deadline:
        seen += process.stderr.readline()
    task_id = seen.split("submitted task", 1)[1].split()[0]
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=30)
    assert process.returncode == 130
    assert task_id in rest
    assert "keep running in the offline simulation" in rest
    assert "on Kling" not in rest
    assert "Traceback" not in rest
    # The simulation kept it: a later command finds it.
    status = run_cli("--json", "status", task_id, env=clean_env(COLUMNS="200"))
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["task_id"] == task_id


# --- batch ----------------------------------------------------------------------------------


def write_jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text(
        "\n".join(
            line if isinstance(line, str) and line.startswith("#") else json.dumps(line)
            for line in lines
        )
        + "\n",
        encoding="utf-8",
    )
    return path


def test_batch_offline_mixed_file(tmp_path: Path) -> None:
    subject = tmp_path / "subject.png"
    subject.write_bytes(png(400, 400))
    requests = write_jsonl(
        tmp_path / "prompts.jsonl",
        [
            "# comments and blank lines are skipped",
            {"prompt": "a lighthouse", "n": 2},
            "a bare prompt string",
            {"prompt": "[fail] this one"},
            {"prompt": "too many", "n": 12},
            {"subject_images": [str(subject)], "prompt": "blend"},
            {
                "model_name": "kling-v3",
                "prompt": "raw body",
                "element_list": [{"element_id": 3}],
                "watermark_info": {"enabled": False},
            },
        ],
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [*FAST, "batch", str(requests), "--out", str(out)])
    assert result.exit_code == 1, result.output  # one failed, one invalid
    assert "4 succeeded, 1 failed, 1 invalid (not sent)" in result.stderr
    assert "line 5: invalid n: must be between 1 and 9; got 12" in result.stderr
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    by_line = {record["line"]: record for record in records}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7]
    assert by_line[5]["status"] == "invalid"
    assert by_line[5]["error"]["field"] == "n"
    assert by_line[4]["status"] == "failed"
    assert "Content review failed" in by_line[4]["error"]["message"]
    assert len(by_line[2]["paths"]) == 2
    for number in (2, 3, 6, 7):
        assert by_line[number]["status"] == "succeed"
        for path in by_line[number]["paths"]:
            assert_valid_png(Path(path))


def test_batch_all_good_exits_0_and_json_streams_results(tmp_path: Path) -> None:
    requests = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"p{i}"} for i in range(5)])
    result = CliRunner().invoke(
        main,
        [
            *FAST,
            "--json",
            "batch",
            str(requests),
            "--no-download",
            "--results",
            str(tmp_path / "r.jsonl"),
        ],
    )
    assert result.exit_code == 0, result.output
    streamed = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(streamed) == 5
    assert all(record["status"] == "succeed" and record["images"] for record in streamed)
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 5


def test_batch_respects_the_account_quota(tmp_path: Path) -> None:
    with fake_server_process("--task-duration", "0.2", "--concurrency-limit", "4") as server:
        requests = write_jsonl(
            tmp_path / "p.jsonl", [{"prompt": f"p{i}", "n": 2} for i in range(12)]
        )
        result = run_cli(
            *online(
                server.url, "batch", str(requests), "--out", str(tmp_path), "--concurrency", "4"
            )
        )
        assert result.returncode == 0, result.stderr
        stats = server.stats()
        assert stats["peak_units"] <= 4
        assert stats["creates_rejected_concurrency"] == 0
        assert stats["creates_accepted"] == 12
        assert len(list(tmp_path.glob("*.png"))) == 24


# --- issue 17: a CLI that holds up in a new user's hands ------------------------------


def display_settings(console: Console) -> Settings:
    """Settings of an interactive run whose progress goes to ``console``."""
    return Settings(
        api_key=None,
        base_url=None,
        mock=False,
        as_json=False,
        verbose=False,
        mock_task_seconds=0.1,
        stderr=console,
    )


@contextlib.contextmanager
def threaded_server(**options: Any) -> Iterator[FakeKlingServer]:
    """A FakeKlingServer on its own loop in a thread: the CLI under CliRunner runs
    its own asyncio.run(), and the test can still inject faults and read requests."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-kling", daemon=True)
    thread.start()
    server = FakeKlingServer(api_key=API_KEY, task_duration=0.1, processing_delay=0.02, **options)
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def invoke(*args: str, **env: str) -> Result:
    return CliRunner(env={"COLUMNS": "200", **env}).invoke(main, list(args))


def test_offline_tasks_are_kept_between_commands(tmp_path: Path) -> None:
    created = invoke(*FAST, "--json", "generate", "p", "-n", "2", "--no-download")
    assert created.exit_code == 0, created.output
    task_id = json.loads(created.stdout)["task_id"]
    status = invoke(*FAST, "--json", "status", task_id)
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout)["status"] == "succeed"
    listed = invoke(*FAST, "list")
    assert task_id in listed.stdout
    saved = invoke(*FAST, "download", task_id, "--out", str(tmp_path))
    assert saved.exit_code == 0, saved.output
    assert [Path(p).name for p in saved.stdout.split()] == [f"{task_id}_{i}.png" for i in (0, 1)]
    for path in saved.stdout.split():
        assert_valid_png(Path(path))
    state = Path(os.environ["XDG_CACHE_HOME"]) / "kling-async" / "offline-tasks.json"
    assert task_id in state.read_text(encoding="utf-8")


def test_global_options_are_accepted_after_the_command_too(tmp_path: Path) -> None:
    result = invoke(*FAST, "generate", "p", "--out", str(tmp_path), "--json", "--mock")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["status"] == "succeed"
    assert "OFFLINE SIMULATION" in result.stderr
    failed = invoke(*FAST, "generate", "[fail] p", "--out", str(tmp_path), "-v")
    assert failed.exit_code == 1
    assert "Traceback" in failed.stderr  # -v: tracebacks


def test_a_non_utf8_requests_file_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    requests = tmp_path / "p.jsonl"
    requests.write_bytes(b'{"prompt": "caf\xe9"}\n')
    result = invoke(*FAST, "batch", str(requests), "--out", str(tmp_path))
    assert result.exit_code == 2
    assert "is not UTF-8 text (byte 0xe9 at offset 15)" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("command", ["generate", "batch", "download"])
def test_an_unusable_out_directory_is_refused_before_anything_is_sent(
    tmp_path: Path, command: str
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = str(blocker / "images")
    requests = write_jsonl(tmp_path / "p.jsonl", ["p"])
    args = {
        "generate": ["generate", "p", "--out", out],
        "batch": ["batch", str(requests), "--out", out],
        "download": ["download", "some-task", "--out", out],
    }[command]
    result = invoke(*FAST, *args)
    assert result.exit_code == 2, result.output
    assert f"cannot save images in {out}: Not a directory; nothing was sent" in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "Traceback" not in result.stderr
    assert "OFFLINE" not in result.stderr  # no server was even started
    listed = invoke(*FAST, "list")
    assert "no text-to-image tasks found" in listed.stderr
    assert listed.stdout == ""


def test_a_failed_save_names_the_task_and_how_to_fetch_it_later(tmp_path: Path) -> None:
    with threaded_server() as server:
        server.inject("error", route="download", code=1203, times=None)
        result = invoke(
            "--api-key", API_KEY, "--base-url", server.url, "generate", "p", "--out", str(tmp_path)
        )
        [task_id] = list(server.tasks)
    assert result.exit_code == 1
    assert f"task {task_id} succeeded, but saving its images failed" in result.stderr
    assert f"kling-async download {task_id} --out {tmp_path}" in result.stderr
    assert "Traceback" not in result.stderr


def test_status_with_multi_image_hints_the_other_way(tmp_path: Path) -> None:
    plain = invoke(*FAST, "status", "no-such-task")
    assert plain.exit_code == 1
    assert "A multi-image task is found only with --multi-image." in plain.stderr
    multi = invoke(*FAST, "status", "no-such-task", "--multi-image")
    assert multi.exit_code == 1
    assert "found only with --multi-image" not in multi.stderr
    assert "A text-to-image task is found only without --multi-image." in multi.stderr


def test_batch_help_says_where_urls_go() -> None:
    result = invoke("batch", "--help")
    text = " ".join(result.stdout.split())
    assert "lists the image URLs instead" in text
    assert "URLs are printed" not in text
    assert "Print result URLs" not in text


def test_batch_json_streams_invalid_lines_too_and_counts_them_apart(tmp_path: Path) -> None:
    requests = tmp_path / "p.jsonl"
    requests.write_text('{"prompt": "a"}\n{"prompt": "b", "n": 0}\n\n{not json\n', encoding="utf-8")
    result = invoke(
        *FAST, "--json", "batch", str(requests), "--no-download", "--results", str(tmp_path / "r")
    )
    assert result.exit_code == 1, result.output
    streamed = {record["line"]: record for record in map(json.loads, result.stdout.splitlines())}
    assert sorted(streamed) == [1, 2, 4]
    assert streamed[1]["status"] == "succeed"
    assert streamed[2]["status"] == "invalid"
    assert streamed[2]["error"]["field"] == "n"
    assert streamed[4]["status"] == "invalid"
    assert "is not JSON" in streamed[4]["error"]["message"]
    assert "1 succeeded, 0 failed, 2 invalid (not sent)" in result.stderr
    assert "line 2: invalid n" in result.stderr
    assert "line 4: invalid line: is not JSON" in result.stderr


def test_batch_no_download_with_results_refuses_an_unused_out(tmp_path: Path) -> None:
    requests = write_jsonl(tmp_path / "p.jsonl", ["p"])
    result = invoke(
        *FAST,
        "batch",
        str(requests),
        "--no-download",
        "--results",
        str(tmp_path / "r.jsonl"),
        "--out",
        str(tmp_path / "o"),
    )
    assert result.exit_code == 2
    assert "--out has no effect with --no-download" in result.stderr
    generate = invoke(*FAST, "generate", "p", "--no-download", "--out", str(tmp_path))
    assert generate.exit_code == 2
    assert "--out has no effect with --no-download" in generate.stderr


async def test_the_batch_display_counts_tasks_running_on_kling_not_queued_requests() -> None:
    async with FakeKlingServer(api_key=API_KEY, task_duration=None, concurrency_limit=4) as server:
        async with make_client(server, max_concurrency=4) as client:
            # 6 requests of n=2 through a quota of 4 units: 2 tasks run, the rest wait here.
            batch = client.batch(ImageGenerationRequest(prompt=f"p{i}", n=2) for i in range(6))
            results = batch.__aiter__()
            first = asyncio.ensure_future(results.__anext__())
            for _ in range(300):  # until the quota is full
                if len(server.tasks) == 2 and len(batch.pending) == 2:
                    break
                await asyncio.sleep(0.01)
            assert len(server.tasks) == 2
            assert batch.in_flight == 6
            console = Console(file=io.StringIO(), force_terminal=True, width=200)
            settings = display_settings(console)
            display = _BatchProgress(settings, total=6)
            display.update(batch, done=0, failed=0)
            console.print(display.progress.get_renderable())
            assert "0 failed · 2 running" in console.file.getvalue()  # type: ignore[attr-defined]
            first.cancel()  # stops the batch; the two tasks stay attached until close
            with contextlib.suppress(asyncio.CancelledError):
                await first


def test_batch_reads_a_bom_floats_and_image_paths_relative_to_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "subject.png").write_bytes(png(400, 400))
    (folder / "p.jsonl").write_text(
        "\ufeff"
        + json.dumps({"subject_images": ["subject.png"], "prompt": "blend", "n": 2.0})
        + "\n"
        + json.dumps({"prompt": "ref", "image": "subject.png"})
        + "\n",
        encoding="utf-8",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with contextlib.chdir(elsewhere) if hasattr(contextlib, "chdir") else _chdir(elsewhere):
        result = invoke(*FAST, "batch", str(folder / "p.jsonl"), "--out", "out")
    assert result.exit_code == 0, result.output
    records = [
        json.loads(line)
        for line in (elsewhere / "out" / "results.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    by_line = {record["line"]: record for record in records}  # in completion order
    assert [by_line[line]["status"] for line in (1, 2)] == ["succeed", "succeed"]
    assert len(by_line[1]["paths"]) == 2  # "n": 2.0


@contextlib.contextmanager
def _chdir(path: Path) -> Iterator[None]:  # contextlib.chdir is 3.11+
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def test_an_empty_requests_file_is_a_warning(tmp_path: Path) -> None:
    requests = tmp_path / "p.jsonl"
    requests.write_text("\n# nothing yet\n\n", encoding="utf-8")
    result = invoke(*FAST, "batch", str(requests), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0
    assert "has no requests" in result.stderr
    assert "OFFLINE" not in result.stderr


def test_tables_show_whole_task_ids_and_the_utc_offset_and_say_when_empty() -> None:
    empty = invoke(*FAST, "list")
    assert empty.exit_code == 0
    assert "no text-to-image tasks found" in empty.stderr
    assert "with --multi-image" in empty.stderr
    created = invoke(*FAST, "--json", "generate", "p", "--no-download")
    task_id = json.loads(created.stdout)["task_id"]
    for columns in ("60", "200"):
        table = CliRunner(env={"COLUMNS": columns}).invoke(main, [*FAST, "list"])
        assert task_id in table.stdout  # whole, on one line
    table = invoke(*FAST, "status", task_id)
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[+-]\d\d:\d\d", table.stdout), table.stdout


def test_watermark_saves_the_watermarked_copies_too(tmp_path: Path) -> None:
    result = invoke(*FAST, "generate", "p", "-n", "2", "--watermark", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    names = sorted(Path(p).name for p in result.stdout.split())
    task_id = names[0].split("_")[0]
    assert names == sorted(
        [f"{task_id}_{i}.png" for i in (0, 1)] + [f"{task_id}_{i}_watermarked.png" for i in (0, 1)]
    )
    plain, marked = tmp_path / f"{task_id}_0.png", tmp_path / f"{task_id}_0_watermarked.png"
    assert plain.read_bytes() != marked.read_bytes()
    again = invoke(*FAST, "download", task_id, "--watermarked", "--out", str(tmp_path / "w"))
    assert [Path(p).name for p in again.stdout.split()] == [
        f"{task_id}_0_watermarked.png",
        f"{task_id}_1_watermarked.png",
    ]


@pytest.mark.parametrize("value", ["-1", "0", "nan"])
def test_a_timeout_that_is_not_positive_is_a_usage_error(value: str) -> None:
    result = invoke(*FAST, "generate", "p", "--timeout", value)
    assert result.exit_code == 2
    assert "--timeout" in result.stderr


def test_a_timeout_says_how_to_check_on_the_task_from_the_cli(tmp_path: Path) -> None:
    result = invoke(
        "--mock-task-seconds", "30", "generate", "p", "--timeout", "0.3", "--out", str(tmp_path)
    )
    assert result.exit_code == 1
    assert "did not finish within 0.3s; it keeps running" in result.stderr
    assert "check it later with: kling-async status " in result.stderr
    assert "client.images" not in result.stderr


def test_errors_speak_of_flags_not_sdk_fields(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    good.write_bytes(png(400, 400))
    result = invoke("multi-image", "--subject", str(good), "--subject", str(tmp_path))
    assert result.exit_code == 2
    assert f"invalid --subject #2: {tmp_path} is a directory, not an image file" in result.stderr
    assert "subject_images" not in result.stderr
    style = invoke("multi-image", "--subject", str(good), "--style", "ftp://x/y")
    assert "invalid --style: must be an http(s) URL; ftp:// is not supported" in style.stderr


def test_a_failed_task_names_its_id_once(tmp_path: Path) -> None:
    result = invoke(*FAST, "generate", "[fail] p", "--out", str(tmp_path))
    assert result.exit_code == 1
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    task_id = line.split("task ", 1)[1].split()[0]
    assert line.count(task_id) == 1


def test_a_full_quota_advises_a_flag_not_a_python_call(tmp_path: Path) -> None:
    with threaded_server(concurrency_limit=1) as server:
        result = invoke("--api-key", API_KEY, "--base-url", server.url, "generate", "p", "-n", "2")
    assert result.exit_code == 1
    assert "[1303]" in result.stderr
    assert "kling-async batch --concurrency N" in result.stderr
    assert "Client(" not in result.stderr


def test_an_auth_failure_from_the_environment_key_names_the_variable(server_url: str) -> None:
    result = run_cli("--base-url", server_url, "status", "x", env=clean_env(KLING_API_KEY="bad"))
    assert result.returncode == 1
    assert "Check KLING_API_KEY." in result.stderr
    assert "--api-key" not in result.stderr


def test_every_option_has_help_and_model_names_its_default() -> None:
    def options(command: click.Command) -> Iterator[click.Option]:
        for parameter in command.params:
            if isinstance(parameter, click.Option) and not parameter.hidden:
                yield parameter
        if isinstance(command, click.Group):
            for sub in command.commands.values():
                yield from options(sub)

    missing = [option.opts for option in options(main) if not option.help]
    assert missing == []
    assert "default: kling-v3" in " ".join(invoke("generate", "--help").stdout.split())
    assert "default: kling-v2;" in " ".join(invoke("multi-image", "--help").stdout.split())


def test_the_sdk_s_other_fields_are_offered(tmp_path: Path) -> None:
    reference = tmp_path / "ref.png"
    reference.write_bytes(png(400, 400))
    with threaded_server() as server:
        result = invoke(
            "--api-key",
            API_KEY,
            "--base-url",
            server.url,
            "--json",
            "generate",
            "p",
            "--image",
            str(reference),
            "--image-reference",
            "subject",
            "--image-fidelity",
            "0.3",
            "--human-fidelity",
            "0.6",
            "--element-id",
            "7",
            "--element-id",
            "9",
            "--callback-url",
            f"{server.origin}/_fake/callbacks/token",
            "--external-task-id",
            "my-id-1",
            "--no-download",
        )
        [create] = server.requests_for("create")
    assert result.exit_code == 0, result.output
    body = create.json
    assert body["image_fidelity"] == 0.3
    assert body["human_fidelity"] == 0.6
    assert body["element_list"] == [{"element_id": 7}, {"element_id": 9}]
    assert body["callback_url"] == f"{server.origin}/_fake/callbacks/token"
    assert body["external_task_id"] == "my-id-1"
    assert json.loads(result.stdout)["external_task_id"] == "my-id-1"


def test_without_click_importing_the_cli_works_and_running_it_says_what_to_install() -> None:
    # A missing extra must not sys.exit() at import time (httpx's _main pattern):
    # only running the command needs click and rich.
    code = (
        "import sys; sys.modules['click'] = None\n"
        "import kling_async.cli\n"
        "print('imported')\n"
        "kling_async.cli.main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(), timeout=60
    )
    assert result.stdout.strip() == "imported"
    assert result.returncode == 1
    assert "pip install '.[cli]'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "arguments",
    [
        ["--api-key", "sk-SECRET", "--base-url", "http://x", "batch", "p.jsonl"],
        ["--api-key=sk-SECRET", "--base-url", "http://x", "batch", "p.jsonl"],
        ["--base-url", "http://x", "--api-key", "sk-SECRET", "batch", "p.jsonl", "--fresh"],
    ],
)
def test_the_rerun_hint_names_the_variable_never_the_key(arguments: list[str]) -> None:
    hint = rerun_hint(arguments, dropped=("--fresh",))
    assert "sk-SECRET" not in hint
    assert "KLING_API_KEY" in hint
    assert hint.endswith(": kling-async --base-url http://x batch p.jsonl")


def test_the_rerun_hint_keeps_arguments_after_a_double_dash() -> None:
    hint = rerun_hint(["batch", "--", "--api-key"])
    assert hint == "run it again to continue where it stopped: kling-async batch -- --api-key"
