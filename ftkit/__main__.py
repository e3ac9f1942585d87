"""``python -m ftkit`` is the ``ftkit`` command."""

from ftkit.cli import main

main()
