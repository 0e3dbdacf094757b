"""``python -m livemask`` runs the command line."""

from livemask.cli import main

main()
