"""The ``kling-async`` commands (needs the ``cli`` extra; ``kling_async.cli``
imports this package only when the command runs).

With no credentials set, or with ``--mock``, every command runs against an
embedded :class:`~kling_async.testing.FakeKlingServer` on loopback and says so on
stderr: a new user sees the whole flow, and gets real PNG files, offline. The
simulation keeps its tasks in the user's cache directory, so ``status``,
``list`` and ``download`` find what an earlier ``generate`` made.

Along its seams: ``group`` (the group and its global options), ``options``
(options several commands take, and a task command's, derived from its request
model), ``session`` (the parsed settings, the run with its signal handling),
``wording`` (failures in the CLI's words), one module per command group (``create``: a command
per task endpoint, derived from the declarations; ``lookup``: status, list,
download, resume; ``batch``; ``costs``; ``serve``: mcp), and ``runner`` (the resumable
batch runner). What the CLI shares with the MCP server is in ``_frontend``.
"""

from __future__ import annotations

from . import batch, costs, create, lookup, serve  # noqa: F401  (each registers its commands)
from .group import main as main  # kling_async.cli runs it

__all__: list[str] = []
