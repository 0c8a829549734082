"""``python -m memoplan`` runs the command-line interface."""

from memoplan.cli.app import main

main()
