"""Every knob of a scale run, with its defaults (the full run) and ``--quick``'s."""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["API_KEY", "PROMPT", "Params", "with_overrides"]

API_KEY = "benchmark-token"
PROMPT = "a lighthouse at dusk, benchmark"


@dataclasses.dataclass(frozen=True)
class Params:
    """Every knob of a run; all of them go into the JSON. Defaults are the full run."""

    # 1. CPU per lifecycle
    cpu_lifecycles: int = 200  # per round and side
    cpu_rounds: int = 10
    cpu_in_flight: int = 18
    cpu_task_duration: float = 0.25
    cpu_processing_delay: float = 0.05
    cpu_poll_interval: float = 0.1
    # 2. requests per task
    req_in_flight: int = 1000
    req_task_duration: float = 10.0
    req_processing_delay: float = 1.0
    req_lifecycles: int = 2
    req_baseline_interval: float = 1.0
    # A second operating point, 0 to skip: with creates counted the ratio cannot
    # beat 1 / (1 + baseline polls per task), so <= 1/20 needs >= 20 polls a task.
    req_fast_baseline_interval: float = 0.4
    req_tuning_attempts: int = 3
    # 2b. work per task in flight (issue 26), default settings, vs a 1 s loop
    inflight_tasks: int = 1000
    inflight_durations: str = "3,10"
    inflight_processing_delay: float = 0.5
    inflight_lifecycles: int = 2
    inflight_rounds: int = 5
    inflight_baseline_interval: float = 1.0
    # 3. quota utilisation, default settings; "2,10": 2 s tasks, then 10 s tasks
    util_durations: str = "2,10"
    util_tasks: str = "250,100"  # per duration
    util_baseline_tasks: int = 100
    util_quota: int = 50
    util_processing_delay: float = 0.05
    # A TUNED row per duration: the limiter's fairness_window (default 2 s) set
    # to this many seconds, all else default; 0 to skip.
    util_tuned_fairness: float = 30.0
    # 4. memory, 5. loop lag
    mem_handles: int = 10_000
    mem_settle: float = 3.0
    mem_processing_delay: float = 0.5
    lag_handles: int = 10_000
    lag_window: float = 20.0
    create_concurrency: int = 64
    # 6. submit throughput
    submit_creates: int = 4000
    submit_rounds: int = 5
    submit_concurrency: int = 64
    # hard limits, seconds
    timeout_cpu: float = 600.0
    timeout_requests: float = 600.0
    timeout_inflight: float = 900.0
    timeout_utilisation: float = 900.0
    timeout_memory: float = 300.0
    timeout_lag: float = 300.0
    timeout_submit: float = 300.0

    @classmethod
    def quick(cls) -> Params:
        return cls(
            cpu_lifecycles=100,
            cpu_rounds=3,
            req_in_flight=100,
            req_task_duration=2.0,
            req_processing_delay=0.2,
            req_lifecycles=1,
            req_baseline_interval=0.5,
            req_fast_baseline_interval=0.0,
            req_tuning_attempts=2,
            inflight_tasks=200,
            inflight_durations="2",
            inflight_lifecycles=1,
            inflight_rounds=1,
            timeout_inflight=120.0,
            util_durations="0.5,2",
            util_tasks="150,60",
            util_baseline_tasks=60,
            util_tuned_fairness=0.0,
            mem_handles=1000,
            mem_settle=1.5,
            lag_handles=1000,
            lag_window=4.0,
            submit_creates=500,
            submit_rounds=2,
            timeout_cpu=120.0,
            timeout_requests=120.0,
            timeout_utilisation=180.0,
            timeout_memory=90.0,
            timeout_lag=90.0,
            timeout_submit=90.0,
        )


def with_overrides(params: Params, assignments: list[str]) -> Params:
    """``params`` with each ``NAME=VALUE`` applied, VALUE cast to the field's type."""
    defaults = dataclasses.asdict(params)
    changes: dict[str, Any] = {}
    for assignment in assignments:
        name, _, value = assignment.partition("=")
        if name not in defaults or not value:
            raise ValueError(f"--set {assignment!r}: expected NAME=VALUE with NAME a parameter")
        changes[name] = type(defaults[name])(value)
    return dataclasses.replace(params, **changes)
