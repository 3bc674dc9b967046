"""``kling-async batch`` run again continues where it stopped; ``kling-async resume``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import FakeServerProcess, fake_server_process

API_KEY = "sk-cli-resume"


@pytest.fixture
def server() -> Iterator[FakeServerProcess]:
    with fake_server_process("--task-duration", "0.5", api_key=API_KEY) as process:
        yield process


def command(server: FakeServerProcess, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kling_async",
        "--api-key",
        API_KEY,
        "--base-url",
        server.url,
        *args,
    ]


def write_lines(path: Path, count: int, *, invalid: bool = True) -> Path:
    lines = [json.dumps(f"resume line {number}") for number in range(count)]
    if invalid:
        lines.insert(2, '{"prompt": "x", "aspect_ratio": "5:4"}')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def stop_once_running(process: subprocess.Popen[str], out: Path, sig: int) -> str:
    """Send ``sig`` once a few results are in; return the process's stderr."""
    deadline = time.monotonic() + 30
    results = out / "results.jsonl"
    while time.monotonic() < deadline:
        if results.exists() and len(results.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    return stderr


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_batch_run_again_creates_no_line_twice(
    server: FakeServerProcess, tmp_path: Path, sig: int, status: int
) -> None:
    requests = write_lines(tmp_path / "prompts.jsonl", 16)
    out = tmp_path / "out"
    args = command(server, "batch", str(requests), "--out", str(out), "--concurrency", "3")
    process = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    stderr = stop_once_running(process, out, sig)
    assert process.returncode == status
    assert "Traceback" not in stderr
    assert "run it again to continue where it stopped" in stderr
    # The key was typed with --api-key: the hint names its variable, never its value.
    assert API_KEY not in stderr
    assert "KLING_API_KEY" in stderr
    before = records(out)
    assert before  # flushed, not left empty (SIGTERM used to leave it so)
    assert len({record["line"] for record in before}) == len(before)

    again = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 1, again.stderr  # the invalid line
    assert "finished in an earlier run" in again.stderr
    per_prompt = server.per_prompt()
    assert set(per_prompt) == {f"resume line {number}" for number in range(16)}
    assert max(per_prompt.values()) == 1  # no line paid twice
    after = records(out)
    assert sorted(record["line"] for record in after) == list(range(1, 18))
    assert sum(record["status"] == "invalid" for record in after) == 1


def test_results_hold_one_record_per_line_whatever_the_number_of_runs(
    server: FakeServerProcess, tmp_path: Path
) -> None:
    requests = write_lines(tmp_path / "prompts.jsonl", 5)
    out = tmp_path / "out"
    args = command(server, "batch", str(requests), "--out", str(out))
    for _ in range(3):
        subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    lines = [record["line"] for record in records(out)]
    assert lines == list(range(1, 7))
    assert len(server.tasks()) == 5
    assert len(list(out.glob("*.png"))) == 5


def test_fresh_starts_over(server: FakeServerProcess, tmp_path: Path) -> None:
    requests = write_lines(tmp_path / "prompts.jsonl", 3, invalid=False)
    out = tmp_path / "out"
    args = command(server, "batch", str(requests), "--out", str(out))
    assert subprocess.run(args, capture_output=True, timeout=120, check=False).returncode == 0
    fresh = subprocess.run([*args, "--fresh"], capture_output=True, timeout=120, check=False)
    assert fresh.returncode == 0
    assert len(server.tasks()) == 6  # asked for: every line again
    assert len(records(out)) == 3


def test_resume_settles_a_journal_left_by_a_killed_batch(
    server: FakeServerProcess, tmp_path: Path
) -> None:
    requests = write_lines(tmp_path / "prompts.jsonl", 12, invalid=False)
    out = tmp_path / "out"
    args = command(server, "batch", str(requests), "--out", str(out), "--concurrency", "4")
    process = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    stop_once_running(process, out, signal.SIGKILL)
    created = len(server.tasks())

    settled = subprocess.run(
        command(server, "--json", "resume", str(out / "kling-journal.db")),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert settled.returncode == 0, settled.stderr
    shown = [json.loads(line) for line in settled.stdout.splitlines()]
    assert all(task["status"] == "succeed" for task in shown)
    # Intents the batch had recorded but not sent yet are sent now; nothing twice.
    assert created <= len(server.tasks()) <= 12
    assert shown  # the kill left creates unsettled, and resume saw them through
    assert max(server.per_prompt().values()) == 1
    nothing = subprocess.run(
        command(server, "resume", str(out / "kling-journal.db")),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "nothing to resume" in nothing.stderr


def test_a_second_sigterm_stops_a_batch_whose_clean_stop_waits(tmp_path: Path) -> None:
    # Creates answered after 30 s: the first SIGTERM's clean stop waits for the
    # creates on the wire; a second SIGTERM ends the process at once.
    with fake_server_process("--create-delay", "30", api_key=API_KEY) as slow:
        requests = write_lines(tmp_path / "prompts.jsonl", 3, invalid=False)
        out = tmp_path / "out"
        args = command(slow, "batch", str(requests), "--out", str(out), "--no-download")
        process = subprocess.Popen(
            args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        deadline = time.monotonic() + 20
        while slow.stats()["requests"]["create"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(0.5)  # still settling the creates on the wire
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=5)
    assert process.returncode == 143
    assert "stopped at once" in stderr
    assert "run it again to continue where it stopped" in stderr
    assert API_KEY not in stderr


def test_an_offline_batch_killed_with_sigkill_continues_when_run_again(tmp_path: Path) -> None:
    # The offline simulation's server dies with the CLI: only what it wrote
    # through to its state file tells the rerun about the tasks already made.
    requests = write_lines(tmp_path / "prompts.jsonl", 8, invalid=False)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "kling_async", "--mock", "--mock-task-seconds", "1"]
    args += ["batch", str(requests), "--out", str(out), "--no-download", "--concurrency", "4"]
    process = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    stop_once_running(process, out, signal.SIGKILL)
    again = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    assert again.returncode == 0, again.stderr
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(record["line"] for record in results) == list(range(1, 9))  # one per line
    state = json.loads(
        (Path(os.environ["XDG_CACHE_HOME"]) / "kling-async" / "offline-tasks.json").read_text()
    )
    prompts = sorted(task["body"]["prompt"] for task in state["tasks"])
    assert prompts == sorted(f"resume line {number}" for number in range(8))  # each once
