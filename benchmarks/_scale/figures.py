"""The scale benchmark's headline figures as data.

Each goal is written once, as a :class:`Goal`: its limit, how the JSON words it
and the test of whether a value reaches it. Each section turns its JSON into
:class:`Figure` records, and every entry of the JSON's ``figures`` is rendered
from one (:meth:`Figure.render`), so a goal's wording and its test cannot drift
apart.
"""

from __future__ import annotations

import argparse
import operator
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Literal

import attrs
from _common import ratio

from _scale.params import Params

__all__ = ["DEFAULT", "Figure", "Goal", "Section", "tuned", "unmeasured"]

#: The settings of a figure measured with the SDK as users get it.
DEFAULT = "DEFAULT"

_COMPARE: dict[str, Callable[[float, float], bool]] = {"<=": operator.le, ">=": operator.ge}


def tuned(how: str) -> str:
    """The settings of a figure measured with something a user would have to set."""
    return f"TUNED: {how}"


@attrs.frozen(kw_only=True)
class Goal:
    """What a figure must reach: its SDK value (``judges="sdk"``) or that value
    over the baseline's (``"ratio"``), ``op`` ``limit``.

    :attr:`text` words it for the JSON: ``subject`` (by default what it judges),
    the comparison, the limit and ``unit``, then ``more``, which words the
    figure's other conditions (:attr:`Figure.conditions`) or where the goal
    comes from.
    """

    judges: Literal["sdk", "ratio"]
    op: Literal["<=", ">="]
    limit: float
    subject: str = ""
    unit: str = ""
    more: str = ""

    @property
    def text(self) -> str:
        words = f"{self.subject or self.judges} {self.op} {self.limit:g}{self.unit}"
        return f"{words} {self.more}" if self.more else words

    def reached(self, value: float | None) -> bool:
        return value is not None and _COMPARE[self.op](value, self.limit)


@attrs.frozen(kw_only=True)
class Figure:
    """One entry of the JSON's ``figures``: the SDK's value, the baseline's and the
    goal they are judged by.

    ``settings`` says whether the SDK ran as users get it (:data:`DEFAULT`) or
    with something set (:func:`tuned`); ``conditions`` are the goal's tests
    besides its limit, by name, all of which must hold for it to be met;
    ``context`` is what else the JSON shows with the figure; ``error`` says why
    it was not measured (:func:`unmeasured`).
    """

    name: str
    goal: Goal
    sdk: float | None = None
    baseline: float | None = None
    settings: str | None = None
    conditions: Mapping[str, bool] = attrs.field(factory=dict)
    context: Mapping[str, Any] = attrs.field(factory=dict)
    note: str | None = None
    error: str | None = None

    @property
    def ratio(self) -> float | None:
        return ratio(self.sdk, self.baseline)

    @property
    def met(self) -> bool:
        judged = self.ratio if self.goal.judges == "ratio" else self.sdk
        return self.error is None and self.goal.reached(judged) and all(self.conditions.values())

    def render(self) -> dict[str, Any]:
        """The figure as the JSON gives it."""
        entry: dict[str, Any] = {
            "sdk": self.sdk,
            "baseline": self.baseline,
            "ratio": self.ratio,
            "goal": self.goal.text,
            "met": self.met,
        }
        if self.settings is not None:
            entry["settings"] = self.settings
        entry.update(self.context)
        if self.note is not None:
            entry["note"] = self.note
        if self.error is not None:
            entry["error"] = self.error
        return entry


def unmeasured(result: Mapping[str, Any], *expected: tuple[str, Goal]) -> list[Figure]:
    """The figures a section gives when it measured nothing: each not met, with
    the section's error, or ``section not run``."""
    error = str(result.get("error", "section not run"))
    return [Figure(name=name, goal=goal, error=error) for name, goal in expected]


@attrs.frozen(kw_only=True)
class Section:
    """One section of the benchmark: ``run`` measures and returns the section's
    JSON; ``figures`` reads that JSON (which may hold only an ``error``, or be
    empty when the section did not run) into its headline figures; ``worker``,
    where there is one, measures one side in a child process (``--worker``)."""

    name: str
    run: Callable[[Params], Coroutine[Any, Any, dict[str, Any]]]
    figures: Callable[[Params, Mapping[str, Any]], list[Figure]]
    worker: Callable[[argparse.Namespace], Coroutine[Any, Any, dict[str, Any]]] | None = None
