"""
What the workers have served, in total, while the master lives.

Each worker process reports cumulative counts with its heartbeats
(L{txcluster.wire.WorkerStats}); L{Served} adds each report's increase to
totals by worker id, so the totals keep growing when a process is replaced
(and its successor starts again from zero).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Dict, List

from ..wire import DURATION_BUCKETS, WorkerStats


class Served:
    def __init__(self) -> None:
        #: (worker id, status code) -> requests
        self.requests: Counter = Counter()
        #: worker id -> requests per duration bucket (not cumulative; +Inf last)
        self.durations: Dict[int, List[int]] = {}
        #: worker id -> seconds, all requests' durations added up
        self.duration_sums: Counter = Counter()
        self._last: Dict[Any, WorkerStats] = {}  # process -> its last report

    def add(self, process: Any, worker_id: int, now: WorkerStats) -> None:
        """C{process} (of worker C{worker_id}) reported C{now}."""
        last = self._last.get(process, WorkerStats())
        self._last[process] = now
        for code, n in now.by_code.items():
            self.requests[(worker_id, code)] += n - last.by_code.get(code, 0)
        if now.durations:
            totals = self.durations.setdefault(worker_id, [0] * (len(DURATION_BUCKETS) + 1))
            before = last.durations or (0,) * len(now.durations)
            for i, (a, b) in enumerate(zip(now.durations, before)):
                totals[i] += a - b
            self.duration_sums[worker_id] += now.duration_sum - last.duration_sum

    def forget(self, process: Any) -> None:
        """C{process} has exited: what it reported is in the totals."""
        self._last.pop(process, None)
