"""What a worker has served, counted as each request ends, for the master
(L{txcluster.wire.WorkerStats}: recycling, metrics, status)."""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter

from ..wire import DURATION_BUCKETS, WorkerStats


class RequestStats:
    """
    @param detailed: also count by status code and time each request (for
        C{--metrics}); without it, only the number of requests.
    """

    def __init__(self, detailed: bool = False) -> None:
        self.detailed = detailed
        self.requests = 0
        self._by_code: Counter = Counter()
        self._durations = [0] * (len(DURATION_BUCKETS) + 1)
        self._duration_sum = 0.0

    def record(self, code: int, duration: float) -> None:
        self.requests += 1
        if self.detailed:
            self._by_code[code] += 1
            self._durations[bisect_left(DURATION_BUCKETS, duration)] += 1
            self._duration_sum += duration

    def snapshot(self, connections: int) -> WorkerStats:
        if not self.detailed:
            return WorkerStats(self.requests, connections)
        return WorkerStats(self.requests, connections, dict(self._by_code),
                           tuple(self._durations), self._duration_sum)
