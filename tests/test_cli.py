"""The kling-async command line, through click's runner and as a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from kling_async.cli import main
from tests.conftest import API_KEY
from tests.imagedata import png
from tests.test_download import assert_valid_png

FAST = ["--mock-task-seconds", "0.1"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KLING_")}
    env.update(extra)
    return env


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
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kling_async.testing",
            "--port",
            "0",
            "--api-key",
            API_KEY,
            "--task-duration",
            "0.2",
            "--record-requests",
            "--exit-with-stdin",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    try:
        yield json.loads(line)["url"]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
        process.stdout.close()
        if process.stdin is not None:
            process.stdin.close()


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
    assert "invalid image" in result.stderr
    assert "does not exist" in result.stderr
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
    assert "KLING_API_KEY" in line  # what to do next
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
    assert "Traceback" not in rest


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
    assert "4 succeeded, 2 failed (1 invalid lines)" in result.stderr
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
            "--out",
            str(tmp_path),
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
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kling_async.testing",
            "--port",
            "0",
            "--api-key",
            API_KEY,
            "--task-duration",
            "0.2",
            "--concurrency-limit",
            "4",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    assert process.stdout is not None
    try:
        url = json.loads(process.stdout.readline())["url"]
        requests = write_jsonl(
            tmp_path / "p.jsonl", [{"prompt": f"p{i}", "n": 2} for i in range(12)]
        )
        result = run_cli(
            *online(url, "batch", str(requests), "--out", str(tmp_path), "--concurrency", "4")
        )
        assert result.returncode == 0, result.stderr
        import urllib.request

        with urllib.request.urlopen(f"{url}/_fake/stats", timeout=5) as response:
            stats = json.loads(response.read())
        assert stats["peak_units"] <= 4
        assert stats["creates_rejected_concurrency"] == 0
        assert stats["creates_accepted"] == 12
        assert len(list(tmp_path.glob("*.png"))) == 24
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
        process.stdout.close()
