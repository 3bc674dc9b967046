"""What ``run_all.py`` judges: every goal of every benchmark, and every figure
against the last one recorded (``last_figures.json``).

A benchmark's JSON gives its figures in one of two shapes: ``figures`` (scale,
journal), each entry with ``sdk``, ``ratio``, ``goal`` and ``met``, and
``uses.*.goals`` (latency), each with ``value`` and ``met``. Both are read into
:class:`Judged` records here, so the gate and the comparison do not care which.

Only figures measured with default settings gate the run (``settings`` absent
or not ``TUNED: ...``); TUNED rows are reported, not judged. A figure is worse than the
last recorded one when it moved the wrong way by more than its noise: a share
of the recorded value, generous for timings on a shared VM (more so for tail
latencies), small for counts, and never less than the rounding of the figures
compared (0.005 -> 0.006 is one step of their last digit, not a 20 % change).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

#: The recorded figures, per mode (``full`` or ``quick``).
LAST_FIGURES = Path(__file__).resolve().parent / "last_figures.json"
#: Relative change a figure may make the wrong way before it counts as worse.
TIMING_NOISE = 0.25
COUNT_NOISE = 0.10
#: A tail latency (a p99 of a few ms) on a shared VM: the loop-lag p99 was 4.9,
#: 2.2 and 3.6 ms in three recorded runs of one day, polling unchanged between them.
TAIL_NOISE = 1.0
#: Words in a figure's name that say it counts something (not a timing).
COUNT_WORDS = ("requests", "polls", "structurings", "utilisation", "bytes", "rss")
#: Words in a figure's name that say it is a tail latency.
TAIL_WORDS = ("p99",)


@attrs.frozen
class Judged:
    """One figure as the gate sees it: its value (the ratio when the goal
    judges a ratio), whether lower is better, and whether its goal was met
    (``None``: no goal)."""

    name: str
    value: float | None
    lower_is_better: bool
    met: bool | None
    default: bool

    @property
    def noise(self) -> float:
        name = self.name.lower()
        if any(word in name for word in COUNT_WORDS):
            return COUNT_NOISE
        return TAIL_NOISE if any(word in name for word in TAIL_WORDS) else TIMING_NOISE


def judged(benchmark: str, result: Mapping[str, Any]) -> Iterator[Judged]:
    """Every figure of ``benchmark``'s JSON that has a goal or a value to track."""
    for name, entry in (result.get("figures") or {}).items():
        goal = entry.get("goal") or ""
        if not goal:
            continue  # context, not a goal: which way is worse is not said
        uses_ratio = goal.startswith("ratio") and entry.get("ratio") is not None
        value = entry.get("ratio") if uses_ratio else entry.get("sdk")
        settings = entry.get("settings")
        yield Judged(
            name=f"{benchmark}.{name}",
            value=value if isinstance(value, (int, float)) else None,
            lower_is_better=">=" not in goal,
            met=entry.get("met"),
            default=not str(settings or "").startswith("TUNED"),
        )
    for use, outcome in (result.get("uses") or {}).items():
        for name, check in (outcome.get("goals") or {}).items():
            value = check.get("value")
            yield Judged(
                name=f"{benchmark}.{use}.{name}",
                value=value if isinstance(value, (int, float)) else None,
                lower_is_better=True,
                met=check.get("met"),
                default=True,
            )


def missed(figures: list[Judged]) -> list[str]:
    """The default-settings figures whose goal was not met."""
    return [f.name for f in figures if f.default and f.met is False]


def worse(figures: list[Judged], last: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The figures that got worse than ``last`` (name -> recorded value) beyond noise."""
    found = []
    for figure in figures:
        before = last.get(figure.name)
        if figure.value is None or not isinstance(before, (int, float)) or before == 0:
            continue
        if abs(figure.value - before) <= min(_last_digit(before), _last_digit(figure.value)):
            continue  # within the rounding of the figures compared
        change = (figure.value - before) / abs(before)
        if not figure.lower_is_better:
            change = -change
        if change > figure.noise:
            found.append(
                {
                    "figure": figure.name,
                    "last": before,
                    "now": figure.value,
                    "worse_by": round(change, 3),
                    "noise": figure.noise,
                }
            )
    return found


def _last_digit(value: float) -> float:
    """One unit of the last decimal ``value`` shows (``0.001`` for ``0.005``): the
    benchmarks round their figures, so two of them closer than that may be one
    figure rounded two ways. Nothing for a whole number, which may be exact."""
    text = repr(float(value))
    decimals = len(text.partition(".")[2].rstrip("0"))
    if "e" in text or "n" in text or not decimals:  # 1e-05, inf, nan, 12.0
        return 0.0
    return 10.0**-decimals


def load_last(mode: str, path: Path = LAST_FIGURES) -> dict[str, Any]:
    """The recorded figures of ``mode``; empty when there are none (or the file
    is unreadable: a comparison is then skipped, never a crash)."""
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
        figures = recorded.get(mode, {}).get("figures", {})
        return figures if isinstance(figures, dict) else {}
    except (OSError, ValueError, AttributeError):
        return {}


def record(mode: str, figures: list[Judged], note: str, path: Path = LAST_FIGURES) -> None:
    """Write ``figures`` as the last recorded ones of ``mode`` (others kept)."""
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(recorded, dict):
            recorded = {}
    except (OSError, ValueError):
        recorded = {}
    kept = recorded.get(mode)
    previous = kept.get("figures") if isinstance(kept, dict) else None
    previous = previous if isinstance(previous, dict) else {}
    merged = {**previous, **{f.name: f.value for f in figures if f.value is not None}}
    recorded[mode] = {"note": note, "figures": dict(sorted(merged.items()))}
    path.write_text(json.dumps(recorded, indent=2) + "\n", encoding="utf-8")
