"""C{python -m txcluster}: the C{txcluster} command."""

from .cli import main

main()
