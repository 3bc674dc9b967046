"""Plain data for users and stores: ``to_dict``/``to_json``, the journal's rows, the
Redis ledger's entries.

Kling's wire has its own converter in ``_wire`` (request bodies out, answers in);
this one never reads or writes Kling's JSON, so a change to either format cannot
leak into the other. Times in records are ISO 8601 strings with their UTC offset,
statuses Kling's words, decimals strings; a ledger entry's own times are Unix
seconds (its fields are floats).
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import cattrs
from cattrs.gen import make_dict_unstructure_fn, override

from ._exceptions import KlingError
from ._models import Task, TaskStatus

records = cattrs.Converter()
"""The converter for data users keep and stores persist."""


records.register_unstructure_hook(datetime, datetime.isoformat)
records.register_structure_hook(datetime, lambda value, _type: datetime.fromisoformat(value))
# Amounts of money and units (ledger entries, costs) keep every digit as text.
records.register_unstructure_hook(Decimal, str)
records.register_structure_hook(Decimal, lambda value, _type: Decimal(str(value)))
records.register_unstructure_hook(TaskStatus, lambda status: status.value)
records.register_unstructure_hook(
    Task,
    make_dict_unstructure_fn(
        Task,
        records,
        images=override(unstruct_hook=lambda images: [records.unstructure(i) for i in images]),
        # Said only by the endpoints that have one (omni-image): left out otherwise.
        result_type=override(omit_if_default=True),
        # Kling's own dict, already plain data.
        raw=override(omit=True),
    ),
)
# An error's record is its own (``KlingError.to_dict``), so front ends need no converter.
records.register_unstructure_hook_func(
    lambda cls: isinstance(cls, type) and issubclass(cls, KlingError),
    lambda error: error.to_dict(),
)
