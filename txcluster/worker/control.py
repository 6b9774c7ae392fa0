"""
A worker's end of its control channel to the master: AMP over the pipes
L{txcluster.wire.CONTROL_TO_WORKER} and L{txcluster.wire.CONTROL_FROM_WORKER}.
EOF on the channel tells the worker that its master is gone.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, succeed

from ..wire import (
    MAX_DETAILS, Failed, Goodbye, Heartbeat, Leaving, QuietAMP, Ready, StartCron, Stopping,
    WorkerCount, WorkerStats,
)


class WorkerSide(QuietAMP):
    """A worker's end of its channel to the master."""

    def __init__(self, on_start_cron: Callable[[], None], on_master_lost: Callable[[], None],
                 on_count: Callable[[int], None],
                 on_leaving: Callable[[], None] = lambda: None):
        super().__init__()
        self._on_leaving = on_leaving
        self._on_start_cron = on_start_cron
        self._on_master_lost = on_master_lost
        self._on_count = on_count

    @StartCron.responder
    def start_cron(self) -> dict:
        self._on_start_cron()
        return {}

    @Leaving.responder
    def leaving(self) -> dict:
        self._on_leaving()
        return {}

    @WorkerCount.responder
    def worker_count(self, count: int) -> dict:
        self._on_count(count)
        return {}

    def report_ready(self) -> None:
        self.callRemote(Ready)

    def heartbeat(self, stats: Optional[WorkerStats] = None) -> None:
        if stats is None:
            self.callRemote(Heartbeat)
        else:
            self.callRemote(Heartbeat, stats=stats.to_json())

    def report_failure(self, status: int, summary: str, details: str) -> None:
        """Why this worker could not start; the master logs it (once, when
        every worker fails the same way)."""
        self.callRemote(Failed, status=int(status), summary=summary[:1000],
                        details=details[-MAX_DETAILS:])

    def say_goodbye(self, clock: Any, stats: Optional[WorkerStats],
                    timeout: float = 1.0) -> Deferred:
        """The last counts, once drained; fires once the master has them
        (or after C{timeout}, or at once if the master is gone)."""
        if stats is None:
            return succeed(None)
        return (self.callRemote(Goodbye, stats=stats.to_json()).addTimeout(timeout, clock)
                .addErrback(lambda failure: None))

    def report_stopping(self, clock: Any, timeout: float = 1.0) -> Deferred:
        """Tell the master we are stopping; fires once it has answered (or
        after C{timeout}, or at once if the master is gone) with whether it
        takes idle connections back."""
        return (self.callRemote(Stopping).addTimeout(timeout, clock)
                .addCallbacks(lambda answer: answer["take_back"], lambda failure: False))

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)
        self._on_master_lost()
