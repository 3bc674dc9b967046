"""The create decisions, table-tested: no server, no clock, no event loop."""

from __future__ import annotations

import random

import attrs
import pytest

from kling_async import (
    APIError,
    AuthenticationError,
    ConcurrencyLimitError,
    ContentPolicyError,
    InvalidRequestError,
    QuotaExceededError,
    RateLimitError,
    RetryPolicy,
    ServerError,
    TransportError,
)
from kling_async._create_rules import (
    CreateProgress,
    Step,
    after_lookup,
    after_sent,
    claims_existing_id,
    is_unreadable_success,
    lookup_budget,
    may_have_landed,
)
from kling_async._exceptions import KlingError

POLICY = RetryPolicy(
    max_attempts=3, initial_delay=0.5, max_delay=4.0, max_elapsed=30.0, rng=random.Random(0)
)

LOST = TransportError("no answer")  # sent; the answer never came
REFUSED = TransportError("connection refused", may_have_reached_server=False)
HTTP_500 = ServerError("bare 500", http_status=500)
KLING_5000 = ServerError("internal", code=5000, http_status=500)
RATE = RateLimitError("too fast", code=1302, http_status=429, retry_after=2.5)
FULL = ConcurrencyLimitError("quota full", code=1303, http_status=429)
EXISTS = InvalidRequestError("external_task_id already exists", code=1201, http_status=400)
UNSAFE = ContentPolicyError("unsafe", code=1301, http_status=400)
ARREARS = QuotaExceededError("in arrears", code=1101, http_status=429)
EXPIRED = AuthenticationError("expired", code=1004, http_status=401)
BAD_KEY = AuthenticationError("invalid", code=1002, http_status=401)
BAD_FIELD = InvalidRequestError("aspect_ratio: must be one of 1:1, 16:9", code=1201)
# A 2xx answer nobody can read: cut short, a gateway's HTML page, success
# without a task_id (what the transport and parse_created raise for them).
CUT_SHORT = APIError('response is not JSON (body: \'{"code":0,"da\')', http_status=200)
HTML_PAGE = APIError("response is not JSON (body: '<html>')", http_status=200)
NO_TASK_ID = APIError("answered with success but no task_id", http_status=200)
HTML_502 = ServerError("response is not JSON (body: '<html>')", http_status=502)

FRESH = CreateProgress()
LANDED = CreateProgress(sends=1, possibly_landed=True, failures=1, error=LOST)


def sent(
    progress: CreateProgress,
    error: KlingError | None,
    *,
    elapsed: float = 0.0,
    can_requeue: bool = False,
) -> tuple[Step, CreateProgress, float]:
    decision = after_sent(progress, error, policy=POLICY, elapsed=elapsed, can_requeue=can_requeue)
    return decision.step, decision.progress, decision.delay


def looked(
    progress: CreateProgress,
    found: bool | KlingError,
    *,
    elapsed: float = 0.0,
    can_requeue: bool = False,
) -> tuple[Step, CreateProgress, float]:
    decision = after_lookup(
        progress, found, policy=POLICY, elapsed=elapsed, can_requeue=can_requeue
    )
    return decision.step, decision.progress, decision.delay


@pytest.mark.parametrize(
    ("error", "can_requeue", "step"),
    [
        (None, False, Step.CREATED),
        # Kling may have acted: ask before anything else.
        (LOST, False, Step.LOOKUP),
        (HTTP_500, False, Step.LOOKUP),
        (KLING_5000, False, Step.LOOKUP),
        # Nothing reached Kling, or Kling said "too fast": send again.
        (REFUSED, False, Step.SEND),
        (RATE, False, Step.SEND),
        # The quota is full: wait for units when there is a limiter, else final.
        (FULL, True, Step.REQUEUE),
        (FULL, False, Step.NOT_CREATED),
        # Kling says it has a task of this id: only a lookup can hand it over.
        (EXISTS, False, Step.LOOKUP),
        # A 2xx answer that cannot be read: whoever answered may have acted.
        (CUT_SHORT, False, Step.LOOKUP),
        (HTML_PAGE, False, Step.LOOKUP),
        (NO_TASK_ID, False, Step.LOOKUP),
        # Refusals are final.
        (BAD_FIELD, False, Step.NOT_CREATED),
        (UNSAFE, False, Step.NOT_CREATED),
        (ARREARS, False, Step.NOT_CREATED),
        (BAD_KEY, False, Step.NOT_CREATED),
        # An expired JWT is re-signed once.
        (EXPIRED, False, Step.RESIGN),
    ],
)
def test_first_send(error: KlingError | None, can_requeue: bool, step: Step) -> None:
    assert sent(FRESH, error, can_requeue=can_requeue)[0] is step


def test_an_ambiguous_failure_marks_the_create_as_possibly_landed() -> None:
    step, progress, delay = sent(FRESH, LOST)
    assert step is Step.LOOKUP
    assert progress.possibly_landed
    assert progress.error is LOST
    assert 0.25 <= delay <= 0.5  # the first backoff wait, equal jitter


def test_retry_after_is_honoured() -> None:
    assert sent(FRESH, RATE)[2] == 2.5


@pytest.mark.parametrize("error", [EXISTS, UNSAFE, ARREARS, FULL])
def test_no_refusal_is_believed_once_a_try_may_have_landed(error: KlingError) -> None:
    # "external_task_id already exists" is the landed try speaking; a 1303 may be
    # our own orphan holding the units. Only a lookup can tell.
    step, progress, _ = sent(attrs.evolve(LANDED, lookups=1), error)
    assert step is Step.LOOKUP
    assert progress.error is error
    assert progress.settling  # no further send: the lookups decide


def test_a_1303_after_a_possible_landing_is_looked_up_before_waiting_for_units() -> None:
    step, progress, _ = sent(LANDED, FULL, can_requeue=True)
    assert step is Step.LOOKUP
    assert not progress.settling
    assert looked(progress, False, can_requeue=True)[0] is Step.REQUEUE
    assert looked(progress, True, can_requeue=True)[0] is Step.CREATED


def test_a_requeue_starts_a_new_round_but_remembers_a_possible_landing() -> None:
    worn = CreateProgress(sends=2, failures=2, possibly_landed=True, error=LOST)
    step, progress, _ = looked(attrs.evolve(worn, error=FULL), False, can_requeue=True)
    assert step is Step.REQUEUE
    assert progress.sends == 0
    assert progress.failures == 0
    assert progress.possibly_landed


def test_not_found_after_an_ambiguous_failure_sends_again() -> None:
    step, progress, _ = looked(LANDED, False)
    assert step is Step.SEND
    assert progress.possibly_landed


def test_found_settles_as_created() -> None:
    assert looked(LANDED, True)[0] is Step.CREATED


def test_the_last_send_is_looked_up_too() -> None:
    last = CreateProgress(sends=POLICY.max_attempts - 1, failures=2, possibly_landed=True)
    step, progress, _ = sent(last, LOST)
    assert step is Step.LOOKUP
    assert progress.sends == POLICY.max_attempts
    # Not found, and no sends left: more lookups (a new task may not be visible
    # yet), then "not created".
    for _ in range(lookup_budget(POLICY) - 1):
        step, progress, delay = looked(progress, False)
        assert step is Step.LOOKUP
        assert delay > 0
    step, progress, _ = looked(progress, False)
    assert step is Step.NOT_CREATED
    assert progress.error is LOST


def test_lookups_that_keep_failing_leave_the_create_uncertain() -> None:
    progress = LANDED
    for _ in range(lookup_budget(POLICY) - 1):
        step, progress, _ = looked(progress, LOST)
        assert step is Step.LOOKUP
    step, progress, _ = looked(progress, LOST)
    assert step is Step.UNCERTAIN
    assert progress.error is LOST  # the create's own failure is what is reported


def test_a_lookup_refused_for_good_leaves_the_create_uncertain() -> None:
    assert looked(LANDED, BAD_KEY)[0] is Step.UNCERTAIN


def test_lookups_get_a_budget_of_their_own_even_with_one_attempt() -> None:
    one = RetryPolicy(max_attempts=1)
    assert lookup_budget(one) >= 3
    decision = after_sent(FRESH, LOST, policy=one, elapsed=0.0, can_requeue=False)
    assert decision.step is Step.LOOKUP


def test_the_time_budget_stops_sends_but_not_the_settling_lookups() -> None:
    late = POLICY.max_elapsed
    assert sent(FRESH, REFUSED, elapsed=late)[0] is Step.NOT_CREATED
    step, progress, _ = sent(FRESH, LOST, elapsed=late)
    assert step is Step.LOOKUP
    assert looked(progress, False, elapsed=late)[0] is Step.LOOKUP


def test_retryable_failures_stop_after_max_attempts() -> None:
    progress = FRESH
    for _ in range(POLICY.max_attempts - 1):
        step, progress, _ = sent(progress, REFUSED)
        assert step is Step.SEND
    step, progress, _ = sent(progress, REFUSED)
    assert step is Step.NOT_CREATED
    assert progress.error is REFUSED


def test_a_jwt_is_resigned_once_and_a_static_token_falls_back() -> None:
    decision = after_sent(FRESH, EXPIRED, policy=POLICY, elapsed=0.0, can_requeue=False)
    assert decision.step is Step.RESIGN
    assert decision.then is Step.SEND
    assert decision.otherwise is not None
    assert decision.otherwise.step is Step.NOT_CREATED  # credentials that cannot renew
    again = sent(decision.progress, EXPIRED)
    assert again[0] is Step.NOT_CREATED  # the second expiry is final


def test_a_lookup_meeting_an_expired_jwt_resigns_and_looks_again() -> None:
    decision = after_lookup(LANDED, EXPIRED, policy=POLICY, elapsed=0.0, can_requeue=False)
    assert decision.step is Step.RESIGN
    assert decision.then is Step.LOOKUP
    assert decision.otherwise is not None
    assert decision.otherwise.step is Step.UNCERTAIN


# --- c03: "already exists" for our own id; c05: an unreadable 2xx answer ----------------------


@pytest.mark.parametrize(
    ("error", "claims"),
    [
        (EXISTS, True),
        (InvalidRequestError("external_task_id is duplicated", code=1201), True),
        (InvalidRequestError("参数错误: external_task_id 已存在", code=1201), True),
        (BAD_FIELD, False),
        (UNSAFE, False),
        (CUT_SHORT, False),
    ],
)
def test_which_refusals_claim_the_id_exists(error: KlingError, claims: bool) -> None:
    assert claims_existing_id(error) is claims


@pytest.mark.parametrize(
    ("error", "landed"),
    [
        (LOST, True),
        (HTTP_500, True),
        (HTML_502, True),
        (CUT_SHORT, True),
        (HTML_PAGE, True),
        (NO_TASK_ID, True),
        (EXISTS, True),
        (REFUSED, False),
        (RATE, False),
        (FULL, False),
        (BAD_FIELD, False),
        (UNSAFE, False),
        (ARREARS, False),
        (BAD_KEY, False),
        # A 4xx that is not JSON is Kling (or a gateway) refusing, not acting.
        (InvalidRequestError("response is not JSON (body: '<html>')", http_status=400), False),
    ],
)
def test_ambiguity_is_decided_in_one_place(error: KlingError, landed: bool) -> None:
    assert may_have_landed(error) is landed
    assert is_unreadable_success(error) is (error in (CUT_SHORT, HTML_PAGE, NO_TASK_ID))


def test_already_exists_on_a_first_send_is_looked_up_never_sent_again() -> None:
    step, progress, delay = sent(FRESH, EXISTS)
    assert (step, delay) == (Step.LOOKUP, 0.0)  # the task exists: ask at once
    assert progress.possibly_landed
    assert progress.claimed
    assert progress.settling  # sending again would only hear "already exists"
    assert looked(progress, True)[0] is Step.CREATED


def test_already_exists_never_ends_as_not_created() -> None:
    # Kling said it has the task: lookups that never find it (lag, a gateway
    # that cannot see it) leave the create uncertain, for resume() to settle.
    step, progress, _ = sent(FRESH, EXISTS)
    for _ in range(lookup_budget(POLICY) - 1):
        step, progress, delay = looked(progress, False)
        assert step is Step.LOOKUP
        assert delay > 0
    step, progress, _ = looked(progress, False)
    assert step is Step.UNCERTAIN
    assert progress.error is EXISTS


def test_already_exists_after_a_lost_answer_is_settled_by_lookups_too() -> None:
    step, progress, _ = sent(LANDED, EXISTS)
    assert step is Step.LOOKUP
    assert progress.claimed
    assert looked(progress, True)[0] is Step.CREATED


def test_an_unreadable_200_is_looked_up_and_sent_again_only_if_not_found() -> None:
    step, progress, delay = sent(FRESH, CUT_SHORT)
    assert step is Step.LOOKUP
    assert progress.possibly_landed
    assert progress.error is CUT_SHORT
    assert delay > 0
    assert looked(progress, True)[0] is Step.CREATED
    again, _, _ = looked(progress, False)
    assert again is Step.SEND  # same id: it cannot make a second task


def test_an_unreadable_answer_to_a_lookup_is_asked_again_then_uncertain() -> None:
    progress = LANDED
    for _ in range(lookup_budget(POLICY) - 1):
        step, progress, _ = looked(progress, HTML_PAGE)
        assert step is Step.LOOKUP
    step, progress, _ = looked(progress, HTML_PAGE)
    assert step is Step.UNCERTAIN
