"""``python -m kling_async`` runs the ``kling-async`` command line."""

from .cli import main

main()
