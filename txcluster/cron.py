"""
Cron jobs: a L{LoopingCall} per job, run in one process only.

The first run comes one interval after start.  A failing run is logged and
the job goes on.  A run still going when the next is due delays it (the
LoopingCall waits for the run's Deferred), so runs never overlap.
"""

from __future__ import annotations

from typing import Callable, List, Sequence

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from .app import CronSpec, call_job

log = Logger(namespace="txcluster.cron")

#: Wraps one run of a job, e.g. to take a lease first; see L{txcluster.redis}.
RunGuard = Callable[[CronSpec, Callable[[], Deferred]], Deferred]


def run_unguarded(spec: CronSpec, run: Callable[[], Deferred]) -> Deferred:
    return run()


class CronJob:
    """One job on its own L{LoopingCall}."""

    def __init__(self, spec: CronSpec, clock: IReactorTime, guard: RunGuard) -> None:
        self.spec = spec
        self.runs = 0
        self.failures = 0
        self._guard = guard
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock
        self._stopped: Deferred = succeed(None)

    def start(self) -> None:
        self._stopped = self._loop.start(self.spec.seconds, now=False)

    def stop(self) -> Deferred:
        """Stop scheduling; the Deferred fires once a run in progress ends."""
        if self._loop.running:
            self._loop.stop()
        return self._stopped

    def _tick(self) -> Deferred:
        return self._guard(self.spec, self._run_once).addErrback(self._failed)

    def _run_once(self) -> Deferred:
        self.runs += 1
        return call_job(self.spec.job)

    def _failed(self, failure: Failure) -> None:
        self.failures += 1
        log.failure("cron job {job} failed; it runs again in {seconds}s",
                    failure, job=self.spec.name, seconds=self.spec.seconds)


class CronService:
    """All of an app's cron jobs; started only where cron is to run.

    @param guard: wraps every run (L{txcluster.redis.RedisLease} takes a
        lease for jobs declared with C{lock=True}).
    """

    def __init__(
        self, specs: Sequence[CronSpec], clock: IReactorTime,
        guard: RunGuard = run_unguarded,
    ) -> None:
        self.jobs: List[CronJob] = [CronJob(spec, clock, guard) for spec in specs]
        self.running = False

    def start(self) -> None:
        if self.running:
            return
        self.running = True
        for job in self.jobs:
            job.start()
            log.info("cron job {job} every {seconds}s", job=job.spec.name,
                     seconds=job.spec.seconds)

    def stop(self) -> Deferred:
        """Stop every job and wait for the runs in progress."""
        self.running = False
        return DeferredList([job.stop() for job in self.jobs])
