"""Run every benchmark, one after the other, and print their JSON as one object.

Each benchmark runs in a process of its own (so one's leftovers cannot skew the
next) with the options given here; its progress goes to stderr as it runs::

    python benchmarks/run_all.py            # the full runs, about 29 minutes on 2 cores
    python benchmarks/run_all.py --quick    # smoke runs, about 4 minutes

The exit status is that of the first benchmark that failed, else 0.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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
    print(json.dumps({"benchmarks": results}, indent=2))
    return status


if __name__ == "__main__":
    sys.exit(main())
