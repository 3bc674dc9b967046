"""Run every benchmark, one after the other, and print their JSON as one object.

Each benchmark runs in a process of its own (so one's leftovers cannot skew the
next) with the options given here; its progress goes to stderr as it runs::

    python benchmarks/run_all.py            # the full runs, about 35 minutes on 2 cores
    python benchmarks/run_all.py --quick    # smoke runs, about 4 minutes

The run fails (exit status 1) when any goal of a figure measured with default
settings is missed, or (exit status 3) when a figure got worse than the last one
recorded in ``last_figures.json`` by more than its noise; a benchmark that
failed gives its own status first. The JSON's ``verdict`` says which, and so does
stderr, loudly. ``--record`` writes this run's figures as the last ones (after
a change that moves them on purpose; commit the file with the change)::

    python benchmarks/run_all.py --record
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _verdict import Judged, judged, load_last, missed, record, worse

HERE = Path(__file__).resolve().parent

#: Each benchmark's script and its arguments, full run and quick run.
BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "callbacks": (["--tasks", "1000"], ["--tasks", "50"]),
    "scale": ([], ["--quick"]),
    "latency": ([], ["--quick"]),
    "scaleout": ([], ["--quick"]),
    "journal": ([], ["--quick"]),
}


def run(name: str, arguments: list[str]) -> tuple[int, Any]:
    """Run one benchmark; return its exit status and its JSON (or the error)."""
    command = [sys.executable, str(HERE / f"{name}.py"), *arguments]
    print(f"run_all: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    except KeyboardInterrupt:
        return 130, {"error": "interrupted"}
    elapsed = round(time.perf_counter() - started, 1)
    try:
        return done.returncode, {**json.loads(done.stdout), "run_all_elapsed_s": elapsed}
    except json.JSONDecodeError:
        return done.returncode or 1, {"error": f"no JSON on stdout, exit {done.returncode}"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small counts: smoke runs")
    parser.add_argument(
        "--only", default=",".join(BENCHMARKS), help="comma-separated benchmarks to run"
    )
    parser.add_argument(
        "--record",
        action="store_true",
        help="write this run's figures to last_figures.json as the last recorded ones",
    )
    arguments = parser.parse_args()
    names = [name.strip() for name in arguments.only.split(",") if name.strip()]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; choose from {', '.join(BENCHMARKS)}")
    results: dict[str, Any] = {}
    status = 0
    for name in names:
        full, quick = BENCHMARKS[name]
        code, results[name] = run(name, quick if arguments.quick else full)
        status = status or code
        if code == 130:
            break
    mode = "quick" if arguments.quick else "full"
    figures = [figure for name, result in results.items() for figure in judged(name, result)]
    verdict = judge(mode, figures)
    print(json.dumps({"benchmarks": results, "verdict": verdict}, indent=2))
    if arguments.record and status == 0:
        record(mode, figures, f"run_all.py{' --quick' if arguments.quick else ''}, {time.ctime()}")
        print("run_all: figures recorded in last_figures.json", file=sys.stderr)
    if status:
        return status
    if verdict["goals_missed"] and mode == "full":
        return 1
    return 3 if verdict["worse_than_last"] else 0


def judge(mode: str, figures: list[Judged]) -> dict[str, Any]:
    """The goals missed and the figures worse than last time, said loudly on stderr.

    A quick run's goals are not judged (its short tasks and small counts only
    smoke-test the code paths); its figures are compared with the last quick run's.
    """
    goals_missed = missed(figures)
    worse_than_last = worse(figures, load_last(mode))
    for name in goals_missed:
        print(f"run_all: GOAL MISSED (default settings): {name}", file=sys.stderr)
    for entry in worse_than_last:
        print(
            f"run_all: WORSE THAN LAST RECORDED: {entry['figure']}: {entry['last']} -> "
            f"{entry['now']} ({entry['worse_by']:+.0%}, noise {entry['noise']:.0%})",
            file=sys.stderr,
        )
    return {
        "mode": mode,
        "goals_judged": mode == "full",
        "goals_missed": goals_missed,
        "worse_than_last": worse_than_last,
        "figures": {f.name: {"value": f.value, "met": f.met} for f in figures},
    }


if __name__ == "__main__":
    sys.exit(main())
