"""``python -m livemask`` runs the command line (as the ``livemask`` console script)."""

from livemask._entry import main

main()
