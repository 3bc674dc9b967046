"""The ``kling_async`` logger, and ``KLING_LOG`` to turn it on without code.

Every module logs to the one ``logging.getLogger("kling_async")``: DEBUG has a
line per HTTP exchange (method, path, HTTP status, Kling's code on an error,
request_id, seconds) and per downloaded file; INFO has retries, re-signed
tokens and quota changes; WARNING has polls that failed and batches stopped
with creates in doubt. Like any library's logger it is silent until the
application configures logging, or until ``KLING_LOG`` is set.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping

ENV_LOG = "KLING_LOG"
logger = logging.getLogger("kling_async")

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure_from_environment(environ: Mapping[str, str] = os.environ) -> None:
    """Apply ``KLING_LOG=debug|info|warning|error``, as ``OPENAI_LOG`` does for
    openai-python: the ``kling_async`` logger gets that level, and if the
    application has not configured logging itself, its records go to stderr
    with a timestamp.

    Only the ``kling_async`` logger is touched, never the root logger: a root
    handler would also print every record of the application's other libraries
    that keep handlers of their own (arq's lines came out twice).
    """
    value = environ.get(ENV_LOG, "").strip()
    if not value:
        return
    level = _LEVELS.get(value.lower())
    if level is None:
        warnings.warn(
            f"{ENV_LOG}={value!r} is ignored: use one of {', '.join(_LEVELS)}",
            RuntimeWarning,
            stacklevel=2,
        )
        return
    logger.setLevel(level)
    if not any(isinstance(handler, _StderrUntilConfigured) for handler in logger.handlers):
        logger.addHandler(_StderrUntilConfigured())


class _StderrUntilConfigured(logging.StreamHandler):  # type: ignore[type-arg]
    """Prints ``kling_async`` records to stderr while the application has not
    configured logging; once the root logger has handlers, they print them (the
    records propagate), so nothing is printed twice whenever ``basicConfig`` runs."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)
