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
    openai-python: the logger gets that level, and if the application has not
    configured logging itself, records go to stderr with a timestamp.
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
    # A no-op when the application has configured the root logger already.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(level)
