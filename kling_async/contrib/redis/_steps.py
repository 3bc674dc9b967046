"""What to do with a ledger entry found in the shared ledger: pure decisions,
tested without Redis, Kling or a clock."""

from __future__ import annotations

import enum

from kling_async._ledger import EntryState, LedgerEntry

__all__ = ["Step", "adoption_step", "keyed_step"]


class Step(enum.Enum):
    """The next move for a request (or a claimed entry)."""

    CREATE = "create"
    """No entry: create it, recording it under its key."""
    RESULT = "result"
    """The task ended: its result is in the ledger; nothing is sent."""
    SETTLE = "settle"
    """It may or may not exist on Kling, and nobody is settling it: look its
    external_task_id up, and send it again (same id) only if Kling has none."""
    ADOPT = "adopt"
    """Its owner died: claim the dead member's entries first, then decide again."""
    REATTACH = "reattach"
    """Created, and ours: follow it, holding its units."""
    FOLLOW = "follow"
    """Created, and a live process holds it (and its units): just follow it."""
    WAIT = "wait"
    """A live process is creating it right now: wait until that settles."""


def keyed_step(entry: LedgerEntry | None, *, me: str, owner_alive: bool) -> Step:
    """What a request recorded under a key needs next (an arq job run again
    after its worker died, a rerun of a batch). ``owner_alive`` says whether
    the entry's owner holds a live lease; ``me`` is this process's member id."""
    if entry is None:
        return Step.CREATE
    if entry.state in (EntryState.TERMINAL, EntryState.GONE) and entry.task_id is not None:
        return Step.RESULT  # gone: the handle ends with TaskNotFoundError
    if entry.state in (EntryState.NOT_CREATED, EntryState.UNCERTAIN, EntryState.TERMINAL):
        # Refused, given up on, or ended without a task_id: nobody is on it.
        return Step.SETTLE
    ours = entry.owner is None or entry.owner == me
    if not ours and not owner_alive:
        return Step.ADOPT
    if entry.state is EntryState.CREATED and entry.task_id is not None:
        return Step.REATTACH if ours else Step.FOLLOW
    # Intended or sent: its owner's create is on the wire, or being looked up.
    return Step.WAIT


def adoption_step(entry: LedgerEntry) -> Step:
    """What a survivor does with an unsettled entry it claimed from a dead member."""
    if entry.state is EntryState.CREATED and entry.task_id is not None:
        return Step.REATTACH
    return Step.SETTLE
