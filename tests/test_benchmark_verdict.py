"""benchmarks/run_all.py's gate (issue 26): a missed default-settings goal or a
figure worse than the last recorded one fails the run; TUNED rows and context
do not; an unreadable record never breaks it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import _verdict as verdict  # noqa: E402

from kling_async.testing import find_redis_server  # noqa: E402

SCALE: dict[str, Any] = {
    "figures": {
        "cpu_in_flight": {
            "sdk": 0.5,
            "ratio": 0.25,
            "goal": "ratio <= 0.3",
            "met": True,
            "settings": "DEFAULT",
        },
        "utilisation": {
            "sdk": 0.96,
            "ratio": None,
            "goal": "sdk utilisation >= 0.95",
            "met": True,
            "settings": "DEFAULT",
        },
        "tuned_row": {
            "sdk": 9.0,
            "ratio": 2.0,
            "goal": "ratio <= 1.15",
            "met": False,
            "settings": "TUNED: something",
        },
        "context": {"sdk": 1.0, "ratio": 1.0, "goal": None, "met": None},
    }
}
LATENCY: dict[str, Any] = {"uses": {"service": {"goals": {"lag_p50": {"value": 0.3, "met": True}}}}}


def figures(scale: dict[str, Any] = SCALE) -> list[verdict.Judged]:
    return [*verdict.judged("scale", scale), *verdict.judged("latency", LATENCY)]


def test_only_default_settings_goals_gate() -> None:
    assert verdict.missed(figures()) == []  # the TUNED row's miss does not count
    missing = json.loads(json.dumps(SCALE))
    missing["figures"]["cpu_in_flight"].update(ratio=0.45, met=False)
    assert verdict.missed(figures(missing)) == ["scale.cpu_in_flight"]


def test_a_figure_worse_than_the_last_beyond_noise_is_reported(tmp_path: Path) -> None:
    record = tmp_path / "last.json"
    verdict.record("full", figures(), "test", path=record)
    last = verdict.load_last("full", path=record)
    assert last["scale.cpu_in_flight"] == 0.25
    assert "scale.context" not in last
    assert verdict.worse(figures(), last) == []
    drifted = json.loads(json.dumps(SCALE))
    drifted["figures"]["cpu_in_flight"]["ratio"] = 0.28  # +12 %: noise for a timing
    drifted["figures"]["utilisation"]["sdk"] = 0.80  # -17 % of a higher-is-better count
    found = verdict.worse(figures(drifted), last)
    assert [entry["figure"] for entry in found] == ["scale.utilisation"]


def judged_one(name: str, value: float, lower_is_better: bool = True) -> verdict.Judged:
    return verdict.Judged(
        name=name, value=value, lower_is_better=lower_is_better, met=True, default=True
    )


@pytest.mark.parametrize(
    ("before", "now", "reported"),
    [
        (0.005, 0.006, False),  # one step of the last digit both are rounded to
        (0.005, 0.007, True),
        (0.005, 0.0061, True),  # a figure with more digits is compared as it is
        (84.2, 84.3, False),
        (1.0, 1.2, True),  # a whole number may be exact: no rounding is allowed for
        (3.0, 4.0, True),
    ],
)
def test_a_change_within_the_rounding_of_the_figures_is_not_worse(
    before: float, now: float, reported: bool
) -> None:
    found = verdict.worse(
        [judged_one("scale.polls_per_task", now)], {"scale.polls_per_task": before}
    )
    assert bool(found) is reported


def test_a_tail_latency_may_double_before_it_counts_as_worse() -> None:
    last = {"scale.loop_lag_p99_ms": 2.225, "scale.cpu_ms_per_lifecycle": 1.0}
    assert verdict.worse([judged_one("scale.loop_lag_p99_ms", 3.63)], last) == []
    assert verdict.worse([judged_one("scale.loop_lag_p99_ms", 4.6)], last) != []
    # Other timings keep their own noise.
    assert verdict.worse([judged_one("scale.cpu_ms_per_lifecycle", 1.3)], last) != []


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]", '{"full": 3}'])
def test_an_unreadable_record_is_no_record(tmp_path: Path, content: str) -> None:
    record = tmp_path / "last.json"
    record.write_text(content)
    assert verdict.load_last("full", path=record) == {}
    verdict.record("full", figures(), "test", path=record)  # and is replaced
    assert verdict.load_last("full", path=record)["latency.service.lag_p50"] == 0.3


def test_run_all_exits_non_zero_when_a_goal_is_missed(tmp_path: Path) -> None:
    # The whole command, with a stand-in benchmark that misses its goal.
    fake = tmp_path / "benchmarks"
    fake.mkdir()
    for name in ("run_all.py", "_verdict.py"):
        (fake / name).write_text((BENCHMARKS / name).read_text())
    missing = json.loads(json.dumps(SCALE))
    missing["figures"]["cpu_in_flight"].update(ratio=0.45, met=False)
    (fake / "scale.py").write_text(f"print({json.dumps(json.dumps(missing))})\n")
    done = subprocess.run(
        [sys.executable, str(fake / "run_all.py"), "--only", "scale"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert "GOAL MISSED (default settings): scale.cpu_in_flight" in done.stderr
    assert json.loads(done.stdout)["verdict"]["goals_missed"] == ["scale.cpu_in_flight"]


def test_scaleout_latency_runs_to_its_figures() -> None:
    # run_all.py gates on what each benchmark prints: scaleout's latency section
    # stopped at its second round (a second limiter on one RedisAccount member),
    # so the whole benchmark printed nothing. Two rounds reach that point.
    if find_redis_server() is None:
        pytest.skip("no redis-server on this machine: apt-get install redis-server")
    pytest.importorskip("redis", reason="scaleout needs the redis extra")
    done = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "scaleout.py"),
            "--only",
            "latency",
            "--rounds",
            "2",
            "--creates",
            "3",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    latency = json.loads(done.stdout)["latency"]
    assert latency["creates_per_side"] == 6
    for side in ("create_shared_limiter", "create_in_process_limiter", "acquire_release_shared"):
        assert latency[side]["count"] == 6
        assert latency[side]["p50_ms"] > 0
