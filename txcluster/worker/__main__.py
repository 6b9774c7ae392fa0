"""
C{python -m txcluster.worker}: the process the master spawns.

Its first lines run before the slow imports (Twisted, Klein, the app's
libraries): a SIGUSR1 or SIGUSR2 sent to the whole process group
(logrotate with C{killall}, an operator) must not kill a worker that is
still starting.

- SIGUSR1 is ignored until the worker's handler reopens the access log
  (L{txcluster.worker.main.WorkerProcess.install_signal_handlers}); the
  master tells a worker that was starting during a reopen to reopen again
  once it is ready;
- SIGUSR2 writes every thread's stack to stderr, at once, even if the
  reactor is stuck or not running yet: the master asks before it kills a
  hung worker.
"""

import faulthandler
import signal
import sys

signal.signal(signal.SIGUSR1, signal.SIG_IGN)
faulthandler.register(signal.SIGUSR2, file=sys.stderr, all_threads=True)

from .main import main  # noqa: E402 - after the signals, on purpose

main()
