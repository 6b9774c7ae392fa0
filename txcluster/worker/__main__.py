"""C{python -m txcluster.worker}: the process the master spawns."""

from .main import main

main()
