"""The quota rules the Lua scripts mirror: :mod:`kling_async._quota_rules`
(one module for both limiters), re-exported where the scripts live."""

from kling_async._quota_rules import (
    QuotaParams,
    QuotaState,
    admit,
    created,
    fits,
    grow,
    initial,
    paused,
    rate_limited,
    rejected,
    spaced,
)

__all__ = [
    "QuotaParams",
    "QuotaState",
    "admit",
    "created",
    "fits",
    "grow",
    "initial",
    "paused",
    "rate_limited",
    "rejected",
    "spaced",
]
