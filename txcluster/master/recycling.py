"""
How big each worker is: the master reads C{/proc/PID/statm} every
L{MEMORY_POLL_SECONDS}, for C{--max-memory} (the supervisor's
L{txcluster.master.supervisor.RecyclePolicy} decides), C{status} and the
metrics.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from twisted.internet.task import LoopingCall

from .supervisor import Supervisor

#: How often the master reads every worker's resident memory.
MEMORY_POLL_SECONDS = 2.0


def resident_memory(pid: int, page_size: int = os.sysconf("SC_PAGE_SIZE")) -> int:
    """Bytes of C{pid}'s resident memory (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * page_size
    except (OSError, IndexError, ValueError):
        return 0


class MemoryWatch:
    """Read every worker's resident memory every L{MEMORY_POLL_SECONDS}
    (for C{--max-memory}, C{status} and the metrics)."""

    def __init__(self, supervisor: Supervisor, clock: Any,
                 rss: Callable[[int], int] = resident_memory) -> None:
        self._supervisor = supervisor
        self._rss = rss
        self._poll = LoopingCall(self.read)
        self._poll.clock = clock

    def start(self) -> None:
        self._poll.start(MEMORY_POLL_SECONDS, now=False)

    def stop(self) -> None:
        if self._poll.running:
            self._poll.stop()

    def read(self) -> None:
        for worker in list(self._supervisor.processes):
            if worker.pid:
                self._supervisor.memory_read(worker, self._rss(worker.pid))
