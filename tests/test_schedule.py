"""The poll schedule and the learned durations: pure functions, no clock, no server."""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

import attrs
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from kling_async import ImageGenerationRequest, MultiImageRequest, PollPolicy
from kling_async import _endpoints as _endpoints_module
from kling_async._durations import (
    DEFAULT_PRIOR,
    HALF_LIFE,
    MIN_KIND_SAMPLES,
    PRIORS,
    WINDOW,
    DurationLearner,
    kind_of,
    prior_for,
)
from kling_async._endpoints import by_request_type, declarations
from kling_async._models import (
    Endpoint,
    ExpandRequest,
    MultiShotRequest,
    OmniImageRequest,
    VirtualTryOnRequest,
)
from kling_async._schedule import (
    PRIOR_STRETCH,
    Durations,
    Prior,
    next_delay,
    overdue_age,
    poll_delay,
)
from tests.imagedata import png

IMAGE = png(400, 400)

DEFAULT = PollPolicy(rng=random.Random(0))
#: Tasks end uniformly between 8 and 12 s: median 10, floor 0.06 * 10 = 0.6 s.
UNIFORM = Durations(ages=(8.0, 10.0, 12.0), done=(0.0, 0.5, 1.0), samples=20)
GEN = Endpoint.GENERATIONS
URL = "https://example.com/a.png"


# --- the distribution ------------------------------------------------------------------


def test_no_samples_no_distribution() -> None:
    assert Durations.from_samples([]) is None
    assert Durations.from_samples([(5.0, 0.0), (math.nan, 1.0), (-1.0, 1.0)]) is None


@pytest.mark.parametrize(
    ("samples", "ages", "done"),
    [
        # One sample: its extremes are poorly known, the window is half a duration wide.
        ([(10.0, 1.0)], (5.0, 10.0, 15.0), (0.0, 0.5, 1.0)),
        # Two: each at the middle of its step; padded by a quarter and the spread / 3.
        ([(8.0, 1.0), (12.0, 1.0)], (8 - 2 - 4 / 3, 8.0, 12.0, 12 + 3 + 4 / 3), (0, 0.25, 0.75, 1)),
        # Weights move the steps: 8 s three times as likely as 12 s.
        (
            [(8.0, 3.0), (12.0, 1.0)],
            (8 - 2 - 4 / 3, 8.0, 12.0, 12 + 3 + 4 / 3),
            (0, 0.375, 0.875, 1),
        ),
        # Equal durations are one step; with many samples the pad is 3 % each side.
        ([(2.0, 1.0)] * 40, (1.94, 2.0, 2.06), (0.0, 0.5, 1.0)),
    ],
)
def test_distribution_from_samples(
    samples: list[tuple[float, float]], ages: tuple[float, ...], done: tuple[float, ...]
) -> None:
    durations = Durations.from_samples(samples)
    assert isinstance(durations, Durations)
    assert durations.ages == pytest.approx(ages)
    assert durations.done == pytest.approx(done)
    assert durations.samples == len(samples)


@pytest.mark.parametrize(
    ("age", "fraction"),
    [(0.0, 0.0), (8.0, 0.0), (9.0, 0.25), (10.0, 0.5), (11.5, 0.875), (12.0, 1.0), (99.0, 1.0)],
)
def test_fraction_done_and_quantile_are_inverse(age: float, fraction: float) -> None:
    assert UNIFORM.fraction_done(age) == pytest.approx(fraction)
    if 8.0 <= age <= 12.0:
        assert UNIFORM.quantile(fraction) == pytest.approx(age)
    assert UNIFORM.median == 10.0
    assert (UNIFORM.start, UNIFORM.end) == (8.0, 12.0)


@given(
    st.lists(st.tuples(st.floats(0.0, 3600.0), st.floats(0.01, 1.0)), min_size=1, max_size=70),
    st.floats(0.0, 1.0),
)
# Two durations one float apart: no age between them to invert the CDF at (found by CI).
@example([(3600.0, 1.0), (3599.9999999999995, 1.0)], 0.5)
def test_any_learned_distribution_is_a_proper_cdf(
    samples: list[tuple[float, float]], fraction: float
) -> None:
    durations = Durations.from_samples(samples)
    assert isinstance(durations, Durations)
    assert all(b > a for a, b in itertools.pairwise(durations.ages))
    assert all(b > a for a, b in itertools.pairwise(durations.done))
    assert (durations.done[0], durations.done[-1]) == (0.0, 1.0)
    age = durations.quantile(fraction)
    assert durations.start <= age <= durations.end
    assert durations.fraction_done(age) == pytest.approx(fraction, abs=1e-9)


# --- the schedule ------------------------------------------------------------------------

# (age, distribution, policy changes, sharing, noise, expected delay)
SCHEDULE = [
    # Cold (nothing learned): the schedule the SDK always had, 0.5 * age within 1..10 s.
    (0.0, None, {}, 1, 0.0, 1.0),
    (10.0, None, {}, 1, 0.0, 5.0),
    (100.0, None, {}, 1, 0.0, 10.0),
    (10.0, None, {}, 1, 1.0, 5.5),  # jitter: +10 % at the top of the draw
    (10.0, None, {}, 1, -1.0, 4.5),
    (0.0, None, {"initial_delay": 0.2}, 1, 0.0, 0.2),
    # Learned, surely running: nothing until the task may have ended (Q(0.15) = 8.6 s).
    (0.0, UNIFORM, {}, 1, 0.0, 8.6),
    (0.0, UNIFORM, {}, 1, 1.0, 8.6),  # no jitter in the window: tasks spread by their age
    (4.0, UNIFORM, {}, 1, 0.0, 4.6),
    # A list page serving 10 tasks: polls are cheap, come sooner (Q(0.05) = 8.2 s).
    (0.0, UNIFORM, {}, 10, 0.0, 8.2),
    (0.0, UNIFORM, {}, 2, 0.0, 8.3),  # 0.15 / 2 = 0.075
    # In the window: 15 % of what remains (F(9) = 0.25 -> 0.3625 -> 9.45 s)...
    (9.0, UNIFORM, {"min_gap": 0.0}, 1, 0.0, 0.45),
    (9.0, UNIFORM, {"min_gap": 0.0}, 10, 0.0, 0.15),  # 5 % on a shared page
    # ...never closer than 6 % of the typical duration (0.6 s)...
    (9.0, UNIFORM, {}, 1, 0.0, 0.6),
    (11.0, UNIFORM, {}, 1, 0.0, 0.6),
    # ...nor than half the window (4 s wide here), nor 50 ms.
    (9.0, UNIFORM, {"min_gap": 1.0}, 1, 0.0, 2.0),
    (11.99, UNIFORM, {"min_gap": 0.0}, 1, 0.0, 0.05),
    # Overdue: from the floor, growing by half of how overdue it is.
    (12.0, UNIFORM, {}, 1, 0.0, 0.6),
    (16.0, UNIFORM, {}, 1, 0.0, 2.6),
    (16.0, UNIFORM, {}, 1, 1.0, 2.86),
    (100.0, UNIFORM, {}, 1, 0.0, 10.0),  # never beyond max_delay
    # The user's bounds win: max_delay caps every gap, also the wait for the window.
    (0.0, UNIFORM, {"max_delay": 2.0}, 1, 0.0, 2.0),
    (0.0, UNIFORM, {"poll_chance": 0.5}, 1, 0.0, 10.0),  # Q(0.5) = 10 s
]


@pytest.mark.parametrize(("age", "durations", "changes", "sharing", "noise", "expected"), SCHEDULE)
def test_next_delay(
    age: float,
    durations: Durations | None,
    changes: dict[str, float],
    sharing: int,
    noise: float,
    expected: float,
) -> None:
    policy = PollPolicy(**changes)  # type: ignore[arg-type]
    assert next_delay(age, durations, policy, sharing=sharing, noise=noise) == pytest.approx(
        expected
    )


def test_tasks_that_all_take_as_long_are_polled_closely_around_their_end() -> None:
    exact = Durations.from_samples([(10.0, 1.0)] * 64)  # the window: 9.7 to 10.3 s
    assert exact is not None
    age, polls = 0.0, []
    while age < 10.4:
        age += next_delay(age, exact, DEFAULT)
        polls.append(round(age, 3))
    assert polls == [9.79, 10.09, 10.39, 10.735]  # 0.3 s apart, not 0.6 s; then overdue


def test_tiny_tasks_are_not_polled_more_often_than_every_50_ms() -> None:
    tiny = Durations.from_samples([(0.1, 1.0)] * 10)
    assert tiny is not None
    assert next_delay(0.099, tiny, DEFAULT) == pytest.approx(0.05)


def test_polls_are_densest_where_tasks_end() -> None:
    # Log-uniform 5-20 s (median 10 s): walk one task's schedule from creation.
    samples = [(5 * 4 ** (i / 63), 1.0) for i in range(64)]
    durations = Durations.from_samples(samples)
    assert isinstance(durations, Durations)
    age, polls = 0.0, []
    while age < 25:
        age += next_delay(age, durations, DEFAULT)
        polls.append(age)
    assert polls[0] > 5.0  # nothing while it surely runs
    window = [p for p in polls if 5 <= p <= 20]
    gaps = [b - a for a, b in itertools.pairwise(window)]
    assert all(0.6 - 1e-9 <= gap <= 1.5 for gap in gaps)  # dense, above the floor
    assert gaps[0] > 1.5 * gaps[-1]  # densest near the end, where the hazard is highest
    # A task sees the polls made while it still runs: about 1 / poll_chance of them.
    expected_polls = sum(1 - durations.fraction_done(p) for p in polls)
    assert expected_polls <= 1 / DEFAULT.poll_chance


@pytest.mark.parametrize(
    ("age", "durations", "expected"),
    [
        (0.0, None, 30.0),  # nothing learned: the safety net itself
        (29.0, None, 10.0),  # the normal gap is longer than what is left: no shorter
        (30.0, None, 10.0),  # overdue: the cold schedule, 0.5 * 30 -> capped at 10
        (0.0, UNIFORM, 20.0),  # overdue at 2 x the median (and past the longest, 12 s)
        (19.0, UNIFORM, 4.1),  # likewise: 0.6 + 0.5 * 7
        (20.0, UNIFORM, 4.6),  # overdue by 8 s past the window: 0.6 + 0.5 * 8
    ],
)
def test_callbacks_expected_make_polling_a_safety_net(
    age: float, durations: Durations | None, expected: float
) -> None:
    assert poll_delay(age, durations, DEFAULT, callbacks=True) == pytest.approx(expected)


def test_overdue_age() -> None:
    assert overdue_age(None, DEFAULT) == 30.0
    assert overdue_age(UNIFORM, DEFAULT) == 20.0
    assert overdue_age(UNIFORM, PollPolicy(overdue_factor=1.0)) == 12.0  # never before the end
    assert overdue_age(UNIFORM, PollPolicy(callback_delay=5.0)) == 20.0


# --- learning -----------------------------------------------------------------------------


def test_the_kind_is_what_changes_the_duration() -> None:
    plain = ImageGenerationRequest(prompt="a fox")
    assert kind_of(plain) == ("images/generations", "kling-v3", 1, None, 0)
    bigger = ImageGenerationRequest(prompt="a fox", n=4, resolution="2k", model_name="kling-v2-1")
    assert kind_of(bigger) == ("images/generations", "kling-v2-1", 4, "2k", 0)
    referenced = ImageGenerationRequest(prompt="a fox", image=IMAGE, element_ids=[1, 2])
    assert kind_of(referenced) == ("images/generations", "kling-v3", 1, None, 3)
    multi = MultiImageRequest(subject_images=[IMAGE, IMAGE], style_image=IMAGE)
    assert kind_of(multi) == ("images/multi-image2image", "kling-v2", 1, None, 3)
    # The prompt does not change the kind, and equal kinds are one shared object.
    learner = DurationLearner()
    first = learner.kind(plain)
    assert learner.kind(ImageGenerationRequest(prompt="another")) is first


def test_a_kind_borrows_its_endpoints_durations_until_it_has_its_own() -> None:
    learner = DurationLearner()
    fast = learner.kind(ImageGenerationRequest(prompt="p"))
    slow = learner.kind(ImageGenerationRequest(prompt="p", n=9))
    assert isinstance(learner.durations(GEN, fast), Prior)  # nothing learned yet
    assert learner.typical is None
    for _ in range(MIN_KIND_SAMPLES):
        learner.observe(GEN, fast, 2.0)
    borrowed = learner.durations(GEN, slow)
    assert isinstance(borrowed, Durations)
    assert borrowed.median == pytest.approx(2.0)
    for _ in range(MIN_KIND_SAMPLES - 1):
        learner.observe(GEN, slow, 20.0)
    mixed = learner.durations(GEN, slow)  # not enough of its own yet: the endpoint's
    assert isinstance(mixed, Durations)
    assert 2.0 < mixed.median < 20.0
    learner.observe(GEN, slow, 20.0)
    own = learner.durations(GEN, slow)
    assert isinstance(own, Durations)
    assert own.median == pytest.approx(20.0)
    fast_durations = learner.durations(GEN, fast)
    assert isinstance(fast_durations, Durations)
    assert fast_durations.median == pytest.approx(2.0)
    assert isinstance(learner.durations(Endpoint.MULTI_IMAGE, None), Prior)  # another endpoint


def test_old_evidence_decays() -> None:
    learner = DurationLearner()
    for _ in range(WINDOW):
        learner.observe(GEN, None, 10.0)
    for _ in range(HALF_LIFE):  # Kling got faster
        learner.observe(GEN, None, 4.0)
    durations = learner.durations(GEN, None)
    assert isinstance(durations, Durations)
    # 16 new ones weigh more than the 48 old ones still kept: the median moved.
    assert durations.median < 7.0
    assert learner.typical == pytest.approx(durations.median)
    for _ in range(WINDOW):
        learner.observe(GEN, None, 4.0)
    forgotten = learner.durations(GEN, None)
    assert isinstance(forgotten, Durations)
    assert forgotten.end < 5.0  # the 10 s ones are gone


# --- PollPolicy's delay (mutation test pol04) -----------------------------------------------------


def test_poll_policy_delay_arithmetic() -> None:
    policy = PollPolicy(
        initial_delay=1.0, multiplier=1.5, max_delay=10.0, jitter=0.1, rng=random.Random(4)
    )
    for age, base in ((0, 1.0), (1, 1.0), (4, 2.0), (10, 5.0), (100, 10.0), (1e300, 10.0)):
        for _ in range(20):
            assert base * 0.9 <= policy.delay(age) <= base * 1.1
    with pytest.raises(ValueError, match="positive"):
        PollPolicy(initial_delay=0)


# --- kinds derived from the endpoint declarations (issue 29) ------------------------------

OMNI_4K_SERIES = OmniImageRequest(
    prompt="<<<image_1>>> in the snow",
    model_name="kling-v3-omni",
    images=[URL, URL],
    element_ids=[7],
    resolution="4k",
    result_type="series",
    series_amount=6,
)


@pytest.mark.parametrize(
    ("request_", "kind"),
    [
        (OMNI_4K_SERIES, ("images/omni-image", "kling-v3-omni", 6, "4k", 3)),
        (
            ExpandRequest(
                image=URL,
                n=2,
                up_expansion_ratio=0.1,
                down_expansion_ratio=0.1,
                left_expansion_ratio=0.1,
                right_expansion_ratio=0.1,
            ),
            ("images/editing/expand", "kling-v1-5", 2, None, 0),
        ),
        (MultiShotRequest(element_frontal_image=URL), ("general/ai-multi-shot", None, 1, None, 0)),
    ],
)
def test_a_kind_is_what_the_endpoints_declaration_says_changes_its_duration(
    request_: Any, kind: tuple[object, ...]
) -> None:
    declaration = by_request_type(request_)
    expected = (declaration.duration_key, *declaration.duration_features(request_))
    assert kind_of(request_) == expected
    assert kind_of(request_)[0] == kind[0]
    assert kind_of(request_)[2:] == kind[2:]


def test_a_new_endpoints_kind_needs_nothing_in_the_learner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A declaration changed (as a new endpoint's would be written): the learner follows it.
    declaration = by_request_type(VirtualTryOnRequest)
    renamed = attrs.evolve(
        declaration,
        duration_key="images/try-on-v2",
        duration_features=lambda request: ("m", 5, "2k", 2),
    )
    registry = [renamed if d is declaration else d for d in _endpoints_module._REGISTRY]
    monkeypatch.setattr(_endpoints_module, "_REGISTRY", registry)
    request = VirtualTryOnRequest(human_image=URL, cloth_image=URL)
    assert kind_of(request) == ("images/try-on-v2", "m", 5, "2k", 2)
    learner = DurationLearner()
    learner.observe(Endpoint.VIRTUAL_TRY_ON, learner.kind(request), 4.0)
    learned = learner.durations(Endpoint.VIRTUAL_TRY_ON, learner.kind(request))
    assert isinstance(learned, Durations)
    assert learned.median == pytest.approx(4.0)


def test_a_task_attached_without_a_request_learns_and_borrows_under_its_duration_key() -> None:
    learner = DurationLearner()
    omni = learner.kind(OMNI_4K_SERIES)
    learner.observe(Endpoint.OMNI_IMAGE, None, 30.0)  # attached by id: no kind
    borrowed = learner.durations(Endpoint.OMNI_IMAGE, omni)
    assert isinstance(borrowed, Durations)
    assert borrowed.median == pytest.approx(30.0)
    learner.observe(Endpoint.OMNI_IMAGE, omni, 40.0)
    pooled = learner.durations(Endpoint.OMNI_IMAGE, None)
    assert isinstance(pooled, Durations)
    assert 30.0 < pooled.median < 40.0
    assert isinstance(learner.durations(GEN, None), Prior)  # another key learned nothing


# --- priors (issue 26: a cold start uses a documented prior) -------------------------------


def test_every_declared_endpoint_has_a_documented_prior() -> None:
    for declaration in declarations():
        prior = prior_for(declaration.duration_key, None)
        assert prior.earliest > 0
        assert "no task durations" in prior.source  # honest about where it comes from
    # The table names today's endpoints; one declared later gets the default.
    assert {key for key, _ in PRIORS} == {d.duration_key for d in declarations()}
    assert prior_for("videos/text2video", None) is DEFAULT_PRIOR


@given(
    earliest=st.floats(0.0, 60.0),
    ages=st.lists(st.floats(0.0, 600.0), min_size=1, max_size=20),
    noise=st.floats(-1.0, 1.0),
    initial=st.floats(0.01, 5.0),
)
def test_a_prior_never_shortens_a_cold_gap(
    earliest: float, ages: list[float], noise: float, initial: float
) -> None:
    policy = PollPolicy(initial_delay=initial, max_delay=max(initial, 10.0))
    prior = Prior(earliest=earliest, source="test")
    for age in ages:
        cold = next_delay(age, None, policy, noise=noise)
        shaped = next_delay(age, prior, policy, noise=noise)
        assert shaped >= cold
        # ... and defers no poll past its earliest end, nor past PRIOR_STRETCH
        # initial delays (give or take the jitter every gap gets).
        bound = max(0.0, min(earliest, PRIOR_STRETCH * initial) - age) * (1 + policy.jitter)
        assert shaped <= max(cold, bound) + 1e-9


def _cold_round(policy: PollPolicy, prior: Prior | None, duration: float) -> tuple[int, float]:
    """Polls until a task of ``duration`` is seen ended, and when: one task alone."""
    age, polls = 0.0, 0
    while age < duration:
        age += next_delay(age, prior, policy)
        polls += 1
    return polls, age


def test_a_prior_skips_the_polls_that_cannot_find_a_task_ended() -> None:
    policy = PollPolicy()
    prior = PRIORS["images/generations", None]
    for duration in (2.5, 5.0, 10.0, 15.0, 30.0):
        cold_polls, cold_seen = _cold_round(policy, None, duration)
        prior_polls, prior_seen = _cold_round(policy, prior, duration)
        assert prior_polls == cold_polls - 1  # the poll at 1 s, before any could end
        assert prior_seen <= cold_seen + 1e-9  # found no later
    assert next_delay(0.0, prior, policy) == pytest.approx(2.0)
    # A policy tuned for short tasks (tests, a fake server) is deferred little.
    quick = PollPolicy(initial_delay=0.05)
    assert next_delay(0.0, prior, quick) == pytest.approx(0.1)
    # While callbacks are expected, a prior is no evidence of being overdue.
    assert overdue_age(prior, policy) == policy.callback_delay
