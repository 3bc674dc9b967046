"""The fake server as its own process: it stops when its parent goes away, and its
command line sets what benchmarks need (tasks of different lengths)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kling_async.testing.__main__ import _drawn, _parser


def test_exits_when_its_stdin_closes() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KLING_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "kling_async.testing", "--port", "0", "--exit-with-stdin"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    assert json.loads(process.stdout.readline())["url"].startswith("http://127.0.0.1:")
    process.stdin.close()  # what the kernel does when the parent is killed
    assert process.wait(timeout=10) == 0
    process.stdout.close()


def test_task_durations_can_be_drawn_per_task() -> None:
    def durations(text: str, seed: int = 3) -> list[float]:
        drawn = _drawn(_parser().parse_args(["--task-duration", text]).task_duration, seed)
        assert callable(drawn)
        return [drawn(None) for _ in range(2001)]  # type: ignore[arg-type]

    spread = durations("loguniform:5:20")
    assert min(spread) >= 5
    assert max(spread) <= 20
    assert 9 < sorted(spread)[1000] < 11  # median sqrt(5 * 20) = 10
    assert len(set(spread)) == len(spread)  # each task its own
    assert spread == durations("loguniform:5:20")  # --seed repeats them
    assert min(durations("uniform:2:3")) >= 2
    assert _parser().parse_args(["--task-duration", "1.5"]).task_duration == 1.5
    assert _parser().parse_args(["--task-duration", "none"]).task_duration is None


def test_a_malformed_distribution_is_refused() -> None:
    for text in ("loguniform:20:5", "uniform:0:1", "loguniform:a:b", "gauss:1:2"):
        with pytest.raises(SystemExit):
            _parser().parse_args(["--task-duration", text])
