"""``kling-async``: generate images from a terminal (needs the ``cli`` extra).

Importing this module needs nothing beyond the core: the commands, and click and
rich with them, are imported when :func:`main` runs, which says what to install
when they are missing (httpx's ``_main`` does the same).
"""

from __future__ import annotations

import sys

__all__ = ["main"]

INSTALL_HINT = (
    "kling-async needs click and rich, its cli extra: pip install '.[cli]' in the "
    "kling-async checkout, or pip install click rich"
)


def main() -> None:
    """Run the ``kling-async`` command line."""
    try:
        from ._cli import main as command
    except ModuleNotFoundError as error:
        if error.name not in ("click", "rich"):
            raise
        sys.exit(INSTALL_HINT)
    command()


if __name__ == "__main__":  # pragma: no cover
    main()
