"""The pure decisions of the scale-out code: what to do with an entry found in
the shared ledger. No Redis, no server, no clock."""

from __future__ import annotations

import pytest

from kling_async import EntryState, LedgerEntry
from kling_async._models import Endpoint
from kling_async.contrib.redis import Step, adoption_step, keyed_step

ME, OTHER = "me", "other"


def entry(state: EntryState, owner: str | None = ME, task_id: str | None = None) -> LedgerEntry:
    return LedgerEntry(
        external_task_id="e",
        endpoint=Endpoint.GENERATIONS,
        body={"prompt": "p"},
        state=state,
        owner=owner,
        task_id=task_id,
    )


@pytest.mark.parametrize(
    ("found", "alive", "step"),
    [
        (None, True, Step.CREATE),
        (entry(EntryState.TERMINAL, OTHER, "t"), False, Step.RESULT),
        (entry(EntryState.TERMINAL, OTHER, None), True, Step.SETTLE),
        # Kling no longer knew the task: an outcome read back, never a WAIT for ever.
        (entry(EntryState.GONE, OTHER, "t"), True, Step.RESULT),
        (entry(EntryState.NOT_CREATED, OTHER), True, Step.SETTLE),
        (entry(EntryState.UNCERTAIN, OTHER), True, Step.SETTLE),
        (entry(EntryState.CREATED, OTHER, "t"), False, Step.ADOPT),
        (entry(EntryState.SENT, OTHER), False, Step.ADOPT),
        (entry(EntryState.INTENDED, OTHER), False, Step.ADOPT),
        (entry(EntryState.CREATED, OTHER, "t"), True, Step.FOLLOW),
        (entry(EntryState.CREATED, ME, "t"), True, Step.REATTACH),
        (entry(EntryState.CREATED, None, "t"), True, Step.REATTACH),
        (entry(EntryState.INTENDED, OTHER), True, Step.WAIT),
        (entry(EntryState.SENT, OTHER), True, Step.WAIT),
        (entry(EntryState.SENT, ME), True, Step.WAIT),
    ],
)
def test_keyed_step(found: LedgerEntry | None, alive: bool, step: Step) -> None:
    assert keyed_step(found, me=ME, owner_alive=alive) is step


@pytest.mark.parametrize(
    ("claimed", "step"),
    [
        (entry(EntryState.CREATED, OTHER, "t"), Step.REATTACH),
        (entry(EntryState.CREATED, OTHER, None), Step.SETTLE),
        (entry(EntryState.INTENDED, OTHER), Step.SETTLE),
        (entry(EntryState.SENT, OTHER), Step.SETTLE),
        (entry(EntryState.UNCERTAIN, OTHER), Step.SETTLE),
    ],
)
def test_adoption_step(claimed: LedgerEntry, step: Step) -> None:
    assert adoption_step(claimed) is step
