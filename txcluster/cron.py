"""
Cron jobs, run in one process only (worker 1, or the single process).

The first run comes one interval after start, and runs stay on that grid.
A failing run is logged and the job goes on.  A run still going when the
next is due delays it to the next point of the grid: runs never overlap.

A guard wraps every run: L{txcluster.redis.RedisLease} takes a lease first,
and may ask for the next attempt sooner than the grid would (when the lease
it found will expire), so that another host takes a dead one's place fast.

A job that blocks the reactor (a synchronous run lasting a second or more)
is logged as an error: nothing else in the worker ran meanwhile, requests
and lease renewals included.  C{thread=True} runs such a job in the
reactor's thread pool instead.
"""

from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Protocol, Sequence

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from .app import CronSpec, call_job

log = Logger(namespace="txcluster.cron")

#: One run of a job, given its lease (or C{None}).
Run = Callable[[Any], Deferred]

#: Runs a blocking function in a thread: C{(function, *args) -> Deferred}.
ThreadRunner = Callable[..., Deferred]

#: A synchronous run at least this long (and at least half its interval
#: for short ones) is logged as having blocked the reactor.
BLOCKING_SECONDS = 1.0


class RunGuard(Protocol):
    """Decides whether a run happens here (see L{txcluster.redis.RedisLease})."""

    def __call__(self, spec: CronSpec, run: Run) -> Deferred:
        """Call C{run(lease)}, or not.  Fires with C{None} (next attempt on
        the grid) or with the seconds until the next attempt."""

    def release(self) -> Deferred:
        """Give up whatever this guard holds; the worker is stopping."""


class Unguarded:
    """Every run happens, with no lease."""

    def __call__(self, spec: CronSpec, run: Run) -> Deferred:
        return run(None).addCallback(lambda _: None)

    def release(self) -> Deferred:
        return succeed(None)


def blocked_too_long(spec: CronSpec, seconds: float) -> bool:
    return seconds >= min(BLOCKING_SECONDS, spec.seconds / 2)


class CronJob:
    """One job on its own schedule: a grid of C{spec.seconds} from start."""

    def __init__(self, spec: CronSpec, clock: IReactorTime, guard: RunGuard,
                 in_thread: ThreadRunner) -> None:
        self.spec = spec
        self.runs = 0
        self.failures = 0
        self._clock = clock
        self._guard = guard
        self._in_thread = in_thread
        self._due = 0.0
        self._timer: Optional[IDelayedCall] = None
        self._running: Optional[Deferred] = None
        self._active = False

    def start(self) -> None:
        self._active = True
        self._due = self._clock.seconds() + self.spec.seconds
        self._timer = self._clock.callLater(self.spec.seconds, self._tick)

    def stop(self) -> Deferred:
        """Stop scheduling; the Deferred fires once a run in progress ends."""
        self._active = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._running is None:
            return succeed(None)
        finished: Deferred = Deferred()
        self._running.addBoth(lambda result: (finished.callback(None), result)[1])
        return finished

    def _tick(self) -> None:
        self._timer = None
        running = self._guard(self.spec, self._run_once)
        self._running = running
        running.addErrback(self._failed).addCallback(self._schedule_next)

    def _schedule_next(self, retry_in: Optional[float]) -> None:
        self._running = None
        if not self._active:
            return
        now = self._clock.seconds()
        if retry_in is not None:  # the guard knows better: e.g. a lease expires
            self._due = now + retry_in
        else:
            self._due += self.spec.seconds
            if self._due <= now:  # runs that were due meanwhile are skipped
                missed = math.floor((now - self._due) / self.spec.seconds) + 1
                self._due += missed * self.spec.seconds
        self._timer = self._clock.callLater(max(0.0, self._due - now), self._tick)

    def _run_once(self, lease: Any) -> Deferred:
        self.runs += 1
        args = (lease,) if self.spec.takes_lease else ()
        if self.spec.thread:
            return self._in_thread(self.spec.job, *args)
        started = self._clock.seconds()
        running = call_job(self.spec.job, *args)
        blocked = self._clock.seconds() - started
        if blocked_too_long(self.spec, blocked):
            log.error("cron job {job} blocked the reactor for {seconds:.1f}s: no request was "
                      "served and no lease renewed meanwhile; declare it with "
                      "@cluster.cron(..., thread=True) to run it in a thread",
                      job=self.spec.name, seconds=blocked)
        return running

    def _failed(self, failure: Failure) -> None:
        self.failures += 1
        log.failure("cron job {job} failed; it runs again in {seconds}s",
                    failure, job=self.spec.name, seconds=self.spec.seconds)


def _reactor_threads(reactor: Any) -> ThreadRunner:
    def in_thread(function: Callable[..., Any], *args: Any) -> Deferred:
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(reactor, reactor.getThreadPool(), function, *args)

    return in_thread


class CronService:
    """All of an app's cron jobs; started only where cron is to run.

    @param guard: wraps every run (L{txcluster.redis.RedisLease} takes a
        lease for jobs declared with C{lock=True}).
    @param in_thread: runs the jobs declared with C{thread=True}; the
        reactor's thread pool by default.
    """

    def __init__(
        self, specs: Sequence[CronSpec], clock: IReactorTime,
        guard: Optional[RunGuard] = None, in_thread: Optional[ThreadRunner] = None,
    ) -> None:
        self.guard: RunGuard = guard if guard is not None else Unguarded()
        threads = in_thread if in_thread is not None else _reactor_threads(clock)
        self.jobs: List[CronJob] = [CronJob(spec, clock, self.guard, threads)
                                    for spec in specs]
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
        """Stop every job, wait for the runs in progress, then release
        what the guard holds (so that another host runs the next tick)."""
        was_running, self.running = self.running, False
        stopped = DeferredList([job.stop() for job in self.jobs])
        if was_running:
            stopped.addCallback(lambda _: self.guard.release())
        return stopped
