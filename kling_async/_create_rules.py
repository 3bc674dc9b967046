"""What to do next with a create: pure decisions over what happened so far.

A create that fails may still have created (and billed) its task: the answer was
lost, the connection dropped after sending, the gateway timed out, Kling failed
with a 5xx after acting. Every create carries an ``external_task_id``, unique per
account, so the client can always ask Kling whether it has the task (a lookup),
and re-sending under the same id can never make a second task: at worst Kling
answers "external_task_id already exists".

These functions decide, from a :class:`CreateProgress` and the latest outcome,
the next :class:`Step`: send (again), look the id up, re-sign the token, wait
for quota units again (1303), or stop: created, not created, or uncertain. They
do no I/O and read no clock (the caller passes the elapsed time), so every rule
is table-tested without a server. ``_submissions`` carries them out.

The rules in words:

- an ambiguous failure (no answer after sending, a timeout, a 5xx, or a 2xx
  answer that cannot be read: cut short, a gateway's HTML page, success with
  no task_id) means the task may exist: look it up, with backoff; if Kling has
  it, it is created; if not, send again under the same id while the retry
  budget lasts;
- "external_task_id already exists" is Kling saying it has a task of this id:
  always looked up, never believed as a refusal (another try of the same
  create landed, in this process or before a crash); if the lookups never
  find it the create is *uncertain*, never "not created";
- once a try may have landed, no refusal is believed until a lookup settles
  it (a 1303 may be our own orphan holding the units);
- 1303 (the account's quota is full) waits for units again, when the client
  has a limiter, with the same id; without one it is final;
- 1302 and refused connections (nothing reached Kling) are sent again;
- an expired or not-yet-valid JWT (1003/1004) is re-signed once;
- every other refusal is final: the task was not created;
- the last try, too, is followed by lookups when it may have landed; if the
  lookups themselves fail the create is *uncertain*, reported with its id.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import attrs

from ._config import RetryPolicy
from ._exceptions import (
    RESIGN_CODES,
    APIError,
    AuthenticationError,
    ConcurrencyLimitError,
    ConfigurationError,
    InvalidRequestError,
    KlingError,
    TransportError,
    is_ambiguous,
    is_retryable,
)

#: Lookups that settle a create which may have landed, whatever the retry
#: policy says: a create is money, and a lost answer is usually one blip.
MIN_LOOKUPS = 3

#: Words by which a 1200/1201 refusal claims the external_task_id is taken.
#: Kling's wording is not documented (and may be Chinese): any of them makes the
#: refusal a claim that the task exists, which a lookup settles. A false match
#: costs a few GETs; a miss would lose a billed task.
_EXISTING_ID_WORDS = ("external", "exist", "duplicat", "already", "重复", "已存在")


def claims_existing_id(error: KlingError) -> bool:
    """Whether a create's refusal says a task of its external_task_id exists
    ("external_task_id already exists"): Kling has the task, so it is looked up."""
    if not isinstance(error, InvalidRequestError) or error.code not in (None, 1200, 1201):
        return False
    text = error.message.lower()
    return any(word in text for word in _EXISTING_ID_WORDS)


def is_unreadable_success(error: KlingError) -> bool:
    """Whether ``error`` is an HTTP 2xx answer that could not be read as Kling's
    envelope or as a task (no Kling code): whoever answered 2xx may well have
    acted, so for a create it is as ambiguous as a lost answer, and for a lookup
    it is worth asking again."""
    return (
        type(error) is APIError
        and error.code is None
        and error.http_status is not None
        and 200 <= error.http_status < 300
    )


def may_have_landed(error: KlingError) -> bool:
    """Whether a create that met ``error`` may have created its task: the one
    place that decides ambiguity (see the module docstring)."""
    return is_ambiguous(error) or is_unreadable_success(error) or claims_existing_id(error)


def never_sent(error: KlingError) -> bool:
    """Whether a request that met ``error`` never reached Kling: the client
    refused to send it (missing or unusable credentials, a setting aiohttp
    rejects) or no connection was ever made. Kling cannot have acted on it."""
    if isinstance(error, ConfigurationError):
        return True
    return isinstance(error, TransportError) and not error.may_have_reached_server


class Step(enum.Enum):
    """The next thing to do with a create."""

    SEND = "send"
    LOOKUP = "lookup"
    RESIGN = "resign"
    REQUEUE = "requeue"
    CREATED = "created"
    NOT_CREATED = "not_created"
    UNCERTAIN = "uncertain"

    @property
    def final(self) -> bool:
        """True when the create is settled one way or the other."""
        return self in (Step.CREATED, Step.NOT_CREATED, Step.UNCERTAIN)


@attrs.frozen(kw_only=True)
class CreateProgress:
    """What has happened to one create so far.

    ``sends`` and ``failures`` count within the current round (a 1303 re-queue
    starts a new one: waiting for quota is not failing); ``lookups`` since the
    last send. ``possibly_landed`` stays set once any try may have created the
    task, across rounds. ``settling`` means no more sends: the remaining lookups
    decide between created and not created. ``error`` is the failure to report
    if the task turns out not to exist.
    """

    sends: int = 0
    lookups: int = 0
    failures: int = 0
    possibly_landed: bool = False
    #: Kling said a task of this id exists ("already exists"): lookups that
    #: never find it leave the create uncertain, not "not created".
    claimed: bool = False
    resigned: bool = False
    settling: bool = False
    error: KlingError | None = attrs.field(default=None, eq=False)


@attrs.frozen
class Decision:
    """The next step, the progress to carry into it, and how long to wait first.

    For :attr:`Step.RESIGN`, ``then`` is the step to repeat once a new token is
    signed, and ``otherwise`` the decision to follow when the credentials
    cannot be renewed (a static token).
    """

    step: Step
    progress: CreateProgress
    delay: float = 0.0
    then: Step | None = None
    otherwise: Decision | None = None

    @property
    def error(self) -> KlingError | None:
        """The failure to report when the step is NOT_CREATED or UNCERTAIN."""
        return self.progress.error


def lookup_budget(policy: RetryPolicy) -> int:
    """How many lookups may follow one send."""
    return max(MIN_LOOKUPS, policy.max_attempts)


def _may_send(progress: CreateProgress, policy: RetryPolicy, elapsed: float, delay: float) -> bool:
    return progress.sends < policy.max_attempts and elapsed + delay < policy.max_elapsed


def _retry_after(error: KlingError) -> float | None:
    return error.retry_after if isinstance(error, APIError) else None


def _resignable(error: KlingError, progress: CreateProgress) -> bool:
    return (
        isinstance(error, AuthenticationError)
        and error.code in RESIGN_CODES
        and not progress.resigned
    )


def _resigning(
    decide: Callable[..., Decision],
    progress: CreateProgress,
    outcome: KlingError,
    counted: CreateProgress,
    then: Step,
    context: dict[str, Any],
) -> Decision:
    """Re-sign an expired or not-yet-valid JWT once, then repeat ``then``; should
    the credentials not renew (a static token), ``decide`` again as if the
    token could not be re-signed."""
    otherwise = decide(attrs.evolve(progress, resigned=True), outcome, **context)
    resigned = attrs.evolve(counted, resigned=True)
    return Decision(Step.RESIGN, resigned, then=then, otherwise=otherwise)


def after_sent(
    progress: CreateProgress,
    error: KlingError | None,
    *,
    policy: RetryPolicy,
    elapsed: float,
    can_requeue: bool,
) -> Decision:
    """Decide after a send: ``error`` is ``None`` when Kling answered with the task."""
    sent = attrs.evolve(progress, sends=progress.sends + 1, lookups=0)
    if error is None:
        return Decision(Step.CREATED, sent)
    if _resignable(error, sent):
        context = {"policy": policy, "elapsed": elapsed, "can_requeue": can_requeue}
        return _resigning(after_sent, progress, error, sent, Step.SEND, context)
    failures = sent.failures + 1
    if claims_existing_id(error):
        # Kling has a task of this id: another try of this create landed (a
        # lost answer, a resume elsewhere, a crash before the answer). Only a
        # lookup can hand it over; sending again would hear the same.
        claimed = attrs.evolve(
            sent,
            possibly_landed=True,
            claimed=True,
            settling=True,
            failures=failures,
            error=error,
        )
        return Decision(Step.LOOKUP, claimed)
    if may_have_landed(error):
        landed = attrs.evolve(sent, possibly_landed=True, failures=failures, error=error)
        return Decision(Step.LOOKUP, landed, policy.delay(failures, _retry_after(error)))
    requeue = isinstance(error, ConcurrencyLimitError) and can_requeue
    if sent.possibly_landed:
        # Whatever Kling says now may be about the earlier try that landed:
        # "external_task_id already exists", or 1303 because our own orphan
        # holds the units. Ask before believing it.
        delay = policy.delay(failures, _retry_after(error))
        retry = is_retryable(error) and _may_send(sent, policy, elapsed, delay)
        checked = attrs.evolve(
            sent, failures=failures, error=error, settling=not (requeue or retry)
        )
        return Decision(Step.LOOKUP, checked, delay if retry else 0.0)
    if requeue:
        return Decision(Step.REQUEUE, _new_round(sent, error))
    if is_retryable(error):
        delay = policy.delay(failures, _retry_after(error))
        if _may_send(sent, policy, elapsed, delay):
            return Decision(Step.SEND, attrs.evolve(sent, failures=failures, error=error), delay)
    return Decision(Step.NOT_CREATED, attrs.evolve(sent, error=error))


def after_lookup(
    progress: CreateProgress,
    found: bool | KlingError,
    *,
    policy: RetryPolicy,
    elapsed: float,
    can_requeue: bool,
) -> Decision:
    """Decide after a lookup by external_task_id: ``found`` is True (Kling has
    the task), False (it answered "not found"), or the error the lookup met."""
    looked = attrs.evolve(progress, lookups=progress.lookups + 1)
    if found is True:
        return Decision(Step.CREATED, looked)
    failures = looked.failures + 1
    if isinstance(found, KlingError):
        if _resignable(found, looked):
            context = {"policy": policy, "elapsed": elapsed, "can_requeue": can_requeue}
            return _resigning(after_lookup, progress, found, looked, Step.LOOKUP, context)
        worth_asking = is_retryable(found) or is_unreadable_success(found)
        if worth_asking and looked.lookups < lookup_budget(policy):
            delay = policy.delay(failures, _retry_after(found))
            return Decision(Step.LOOKUP, attrs.evolve(looked, failures=failures), delay)
        return Decision(Step.UNCERTAIN, attrs.evolve(looked, error=looked.error or found))
    if not looked.settling:
        if isinstance(looked.error, ConcurrencyLimitError) and can_requeue:
            return Decision(Step.REQUEUE, _new_round(looked, looked.error))
        if _may_send(looked, policy, elapsed, 0.0):
            return Decision(Step.SEND, looked)
        looked = attrs.evolve(looked, settling=True)
    # Not found, and no sends left to ask with. A task created an instant ago
    # may not be visible yet (read-after-write lag): ask a few more times.
    if looked.lookups < lookup_budget(policy):
        return Decision(
            Step.LOOKUP, attrs.evolve(looked, failures=failures), policy.delay(failures)
        )
    if looked.claimed:  # Kling said it has the task: never "not created"
        return Decision(Step.UNCERTAIN, looked)
    return Decision(Step.NOT_CREATED, looked)


def _new_round(progress: CreateProgress, error: KlingError) -> CreateProgress:
    """After 1303 the create waits for quota units, then starts afresh: waiting
    is not failing, so the retry budget is full again (the id stays the same)."""
    return attrs.evolve(progress, sends=0, lookups=0, failures=0, settling=False, error=error)
