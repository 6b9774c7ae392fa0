"""
Worker supervision: which worker ids exist, which process serves each, and
what happens when one starts, goes silent, exits, or is replaced.

This is pure bookkeeping over an injected clock and an injected C{spawn}
function, so every rule (respawn, fast-crash counting, back-off, rolling
order, timeout kill, scaling) is tested with L{twisted.internet.task.Clock}
and fake processes.  L{txcluster.master.process} supplies the real processes.
"""

from __future__ import annotations

import random
import signal
from collections import Counter
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Protocol, Set, Tuple

import attr
from twisted.internet.defer import (
    Deferred, DeferredList, DeferredLock, ensureDeferred, fail, succeed,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ..wire import ExitStatus, WorkerStats, heartbeat_interval
from .served import Served

if TYPE_CHECKING:
    from .dispatch import WorkerChannel

log = Logger(namespace="txcluster.master")

#: Why a worker process was replaced (C{txcluster_worker_restarts_total}).
RESTART_REASONS = ("crash", "timeout", "recycle", "reload", "scale")


@attr.s(frozen=True, auto_attribs=True)
class RestartPolicy:
    """When to respawn, when to give up, and how long to wait."""

    #: a worker that dies sooner than this after starting crashed fast
    fast_crash_seconds: float = 5.0
    #: back-off after the first fast crash; it doubles up to max_delay
    min_delay: float = 0.1
    max_delay: float = 2.0
    #: a worker silent this long (no heartbeat) is killed and replaced
    silence_timeout: float = 30.0
    #: how long a new worker gets to become ready during a rolling restart
    ready_timeout: float = 30.0
    #: in-flight requests get this long on shutdown ...
    shutdown_timeout: float = 30.0
    #: ... and the worker this much more for its shutdown hooks, then SIGKILL
    kill_grace: float = 2.0
    #: a hung worker is asked for its stack, and killed this much later
    stack_dump_grace: float = 1.0
    #: the longest wait before recycling a worker again whose successor failed
    max_recycle_delay: float = 300.0

    def respawn_delay(self, fast_crashes: int) -> float:
        if fast_crashes == 0:
            return 0.0
        return min(self.max_delay, self.min_delay * 2 ** (fast_crashes - 1))


@attr.s(frozen=True, auto_attribs=True)
class RecyclePolicy:
    """When a worker is replaced although nothing is wrong with it
    (C{--max-requests}, C{--max-requests-jitter}, C{--max-memory}), the
    way a rolling restart replaces it: gunicorn's C{max_requests}, PM2's
    C{max_memory_restart}."""

    #: requests after which a worker is replaced (0: never) ...
    max_requests: int = 0
    #: ... plus a random 0..jitter of its own, so that workers do not all go at once
    jitter: int = 0
    #: resident memory, in MiB, above which a worker is replaced (0: no limit)
    max_memory: int = 0

    @property
    def active(self) -> bool:
        return bool(self.max_requests or self.max_memory)

    def request_limit(self, randint: Callable[[int, int], int]) -> Optional[int]:
        """A new worker's own limit."""
        if not self.max_requests:
            return None
        return self.max_requests + (randint(0, self.jitter) if self.jitter else 0)

    def why(self, worker: Worker, limit: Optional[int]) -> Optional[str]:
        """Why C{worker} should be replaced now, or C{None}."""
        if limit is not None and worker.stats.requests >= limit:
            return f"{worker.stats.requests} requests"
        if self.max_memory and worker.rss > self.max_memory * MIB:
            return f"RSS {worker.rss // MIB} MiB > {self.max_memory} MiB"
        return None


MIB = 1024 * 1024


@attr.s(frozen=True, auto_attribs=True)
class ExitInfo:
    """How a process ended: an exit status or a signal number."""

    status: Optional[int] = None
    signal: Optional[int] = None
    #: why it never ran (spawnProcess itself failed)
    error: Optional[str] = None

    def __str__(self) -> str:
        if self.error is not None:
            return f"could not start: {self.error}"
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = str(self.signal)
            return f"exited on signal {self.signal} ({name})"
        meaning = ExitStatus.meaning(self.status) if self.status else None
        if meaning is not None:
            return f"exited with status {self.status} ({meaning})"
        return f"exited with status {self.status}"


class ProcessHandle(Protocol):
    """What the supervisor needs of a running worker process."""

    pid: int
    #: round-robin mode: where the master sends this worker its connections
    channel: Optional[WorkerChannel]

    def signal(self, signum: int) -> None: ...

    def start_cron(self) -> None: ...

    def tell_count(self, count: int) -> None: ...

    def tell_leaving(self) -> None: ...

    def output_tail(self) -> List[str]: ...


class Worker:
    """One worker process, as the supervisor tracks it.

    A Worker lives as long as its process: a respawn or a replacement makes
    a new one, and the worker id's slot (L{Supervisor.slots}) moves to it.
    It starts its process as it is made (C{spawn}); the process side then
    calls L{ready}, L{heartbeat} and L{exited}.
    """

    def __init__(self, supervisor: "Supervisor", worker_id: int, now: float,
                 spawn: Callable[["Worker"], ProcessHandle]) -> None:
        self.id = worker_id
        self.started_at = now
        self.last_heard = now
        self.is_ready = False
        self.retiring = False
        self.runs_cron = False
        self.exit: Optional[ExitInfo] = None
        #: what it last reported having served
        self.stats = WorkerStats()
        #: resident memory in bytes, as the master last read it (0: not yet)
        self.rss = 0
        #: killed because it stopped sending heartbeats
        self.timed_out = False
        #: --max-requests with this worker's jitter (set when first needed)
        self.request_limit: Optional[int] = None
        self._supervisor = supervisor
        self._ready_waiters: List[Deferred] = []
        self._exit_waiters: List[Deferred] = []
        #: its process, started last, once the rest is set; None if it
        #: could not be (then L{start_error} says why)
        self.process: Optional[ProcessHandle] = None
        self.start_error: Optional[Exception] = None
        try:
            self.process = spawn(self)
        except Exception as e:  # EMFILE, EAGAIN
            self.start_error = e

    def __repr__(self) -> str:
        return f"worker {self.id} (pid {self.pid})"

    @property
    def pid(self) -> Optional[int]:
        return None if self.process is None else self.process.pid

    @property
    def alive(self) -> bool:
        return self.exit is None

    # Called by the process side.

    def ready(self) -> None:
        if self.is_ready or not self.alive:
            return
        self.is_ready = True
        self.last_heard = self._supervisor.clock.seconds()
        for waiter in self._take(self._ready_waiters):
            waiter.callback(self)
        self._supervisor.worker_ready(self)

    def heartbeat(self, stats: Optional[WorkerStats] = None) -> None:
        self.last_heard = self._supervisor.clock.seconds()
        if stats is not None:
            self.stats = stats
            self._supervisor.worker_reported(self)

    def failed(self, status: int, summary: str, details: str) -> None:
        """The worker could not start (it exits with C{status} next)."""
        self._supervisor.worker_failed(self, status, summary, details)

    def leaving(self) -> None:
        """The worker is shutting down (told to, or on its own)."""
        self._supervisor.retire_from_serving(self)

    def exited(self, info: ExitInfo) -> None:
        self.exit = info
        self._supervisor.worker_exited(self)
        for waiter in self._take(self._ready_waiters):
            waiter.errback(WorkerDied(f"{self!r} {info} before it was ready"))
        for waiter in self._take(self._exit_waiters):
            waiter.callback(info)

    # Used by the supervisor.

    def when_ready(self) -> Deferred:
        if self.is_ready:
            return succeed(self)
        if not self.alive:
            return fail(WorkerDied(f"{self!r} {self.exit}"))
        waiter: Deferred = Deferred()
        self._ready_waiters.append(waiter)
        return waiter

    def when_exited(self) -> Deferred:
        if not self.alive:
            return succeed(self.exit)
        waiter: Deferred = Deferred()
        self._exit_waiters.append(waiter)
        return waiter

    def signal(self, signum: int) -> None:
        if self.alive and self.process is not None:
            self.process.signal(signum)

    @staticmethod
    def _take(waiters: List[Deferred]) -> List[Deferred]:
        taken = list(waiters)
        waiters.clear()
        return taken


class WorkerDied(Exception):
    """A worker exited before it became ready."""


#: spawn(worker, count) starts the process for C{worker} and returns it.
Spawn = Callable[[Worker, int], ProcessHandle]


class Supervisor:
    """
    Keep one live, ready process per worker id.

    @ivar slots: the current process of each worker id (None between a
        crash and its respawn).
    """

    def __init__(
        self,
        clock: IReactorTime,
        spawn: Spawn,
        count: int,
        policy: RestartPolicy = RestartPolicy(),
        on_crash_loop: Callable[[], None] = lambda: None,
        on_all_ready: Callable[[], None] = lambda: None,
        on_serving: Callable[[List[Worker]], None] = lambda workers: None,
        recycling: RecyclePolicy = RecyclePolicy(),
        randint: Callable[[int, int], int] = random.randint,
    ) -> None:
        self.clock = clock
        self.policy = policy
        self.slots: Dict[int, Optional[Worker]] = {}
        self.processes: List[Worker] = []  # every live process, incl. retiring
        self.fast_crashes = 0
        self.stopping = False
        self.reloading = False
        self.announced_ready = False
        self._count = count
        self._spawn = spawn
        self._on_crash_loop = on_crash_loop
        self._on_all_ready = on_all_ready
        self._on_serving = on_serving
        self.recycling = recycling
        self._randint = randint
        #: what the workers have served while this supervisor lives
        self.served = Served()
        self._respawns: Dict[int, IDelayedCall] = {}
        self._last_fast_crash = float("-inf")
        #: the last start failure a worker reported: (summary, details)
        self._last_failure: Optional[Tuple[str, str]] = None
        #: processes replaced, by reason (see RESTART_REASONS)
        self.restarts: Counter = Counter()
        #: one replacement (rolling restart or recycling) at a time
        self._replacements = DeferredLock()
        #: worker id -> when to try recycling it again, after a failure
        self._recycle_retry_at: Dict[int, float] = {}
        self._recycle_delay: Dict[int, float] = {}
        #: why the last replacement failed (its successor died, or was too slow)
        self.replace_error: Optional[str] = None
        self._recycling: Set[Worker] = set()
        self._watchdog = LoopingCall(self._check_silence)
        self._watchdog.clock = clock

    @property
    def count(self) -> int:
        """How many workers there should be."""
        return self._count

    #: Workers spawned per reactor turn at start: between two batches the
    #: master handles signals (a SIGTERM while hundreds of workers start).
    START_BATCH = 8

    def start(self) -> None:
        self.slots = {worker_id: None for worker_id in range(1, self._count + 1)}
        self._watchdog.start(heartbeat_interval(self.policy.silence_timeout), now=False)
        self._start_batch(1)

    def _start_batch(self, first: int) -> None:
        last = min(first + self.START_BATCH - 1, max(self.slots, default=0))
        for worker_id in range(first, last + 1):
            if self.stopping:
                return
            if worker_id in self.slots and self.slots[worker_id] is None \
                    and worker_id not in self._respawns:
                self.slots[worker_id] = self._start_process(worker_id)
        if last < max(self.slots, default=0):
            self.clock.callLater(0, self._start_batch, last + 1)

    # Process lifecycle --------------------------------------------------------

    def _start_process(self, worker_id: int) -> Worker:
        worker = Worker(self, worker_id, self.clock.seconds(),
                        lambda worker: self._spawn(worker, self._count))
        self.processes.append(worker)
        error = worker.start_error
        if error is not None:  # counts as a fast crash
            log.error("cannot start worker {id}: {error}", id=worker_id, error=error)
            self.clock.callLater(0, worker.exited, ExitInfo(error=str(error)))
            return worker
        log.info("worker {id} (pid {pid}) started", id=worker_id, pid=worker.pid)
        self.clock.callLater(self.policy.fast_crash_seconds, self._survived, worker)
        # Not serving yet, but its id may have just got a listening socket
        # that nobody accepts on until it is ready (reuseport: the master does).
        self._serving_changed()
        return worker

    def _survived(self, worker: Worker) -> None:
        """A worker started since the last fast crash lived long enough:
        whatever was crashing has stopped, so the count starts again."""
        if worker.alive and worker.started_at >= self._last_fast_crash:
            self.fast_crashes = 0

    def worker_ready(self, worker: Worker) -> None:
        log.info("worker {id} (pid {pid}) ready", id=worker.id, pid=worker.pid)
        self._last_failure = None  # a crash loop from now on is another story
        self._serving_changed()
        self._assign_cron()
        if not self.announced_ready and self._all_ready():
            self.announced_ready = True
            log.info("all {count} workers ready", count=self.count)
            self._on_all_ready()

    def serving(self) -> List[Worker]:
        """The workers that should get new connections: each id's current
        process, once ready; none while stopping."""
        if self.stopping:
            return []
        return [w for w in self.slots.values()
                if w is not None and w.is_ready and w.alive and not w.retiring]

    def worker_reported(self, worker: Worker) -> None:
        self.served.add(worker, worker.id, worker.stats)
        self._check_recycling(worker)

    def memory_read(self, worker: Worker, rss: int) -> None:
        worker.rss = rss
        self._check_recycling(worker)

    def _check_recycling(self, worker: Worker) -> None:
        if not self.recycling.active or not worker.is_ready:
            return
        if worker.request_limit is None and self.recycling.max_requests:
            worker.request_limit = self.recycling.request_limit(self._randint)
        why = self.recycling.why(worker, worker.request_limit)
        if why is not None:
            self.recycle(worker, why)

    def retire_from_serving(self, worker: Worker) -> None:
        """C{worker} gets no new connections from now on."""
        if not worker.retiring:
            worker.retiring = True
            self._serving_changed()

    def _serving_changed(self) -> None:
        self._on_serving(self.serving())

    def _all_ready(self) -> bool:
        return all(w is not None and w.is_ready for w in self.slots.values())

    def worker_failed(self, worker: Worker, status: int, summary: str, details: str) -> None:
        """Log why a worker could not start: in full once, then in one line
        for every worker that fails the same way (they all import the same
        app), so a broken app does not fill the log N times over."""
        what = ExitStatus.meaning(status) or "failed"
        if self._last_failure is not None and self._last_failure[1] == details:
            log.error("{worker!r} {what}: {summary} (the same error again)",
                      worker=worker, what=what, summary=summary)
        else:
            log.error("{worker!r} {what}: {summary}", worker=worker, what=what, summary=summary)
            for line in details.rstrip("\n").splitlines():
                log.error("{line}", line=line, log_system=f"worker {worker.id}")
        self._last_failure = (summary, details)

    def worker_exited(self, worker: Worker) -> None:
        self.processes.remove(worker)
        self.served.forget(worker)
        self._serving_changed()
        uptime = self.clock.seconds() - worker.started_at
        log.info("worker {id} (pid {pid}) {exit} after {uptime:.1f}s",
                 id=worker.id, pid=worker.pid, exit=worker.exit, uptime=uptime)
        if self.slots.get(worker.id) is not worker or self.stopping:
            self._assign_cron()  # a retired worker 1 may have handed over cron
            return
        self.slots[worker.id] = None
        if uptime < self.policy.fast_crash_seconds:
            self.fast_crashes += 1
            self._last_fast_crash = self.clock.seconds()
        else:
            self.fast_crashes = 0
        if self.fast_crashes >= max(1, self.count):
            self._crash_loop(worker)
            return
        delay = self.policy.respawn_delay(self.fast_crashes)
        self.restarts["timeout" if worker.timed_out else "crash"] += 1
        log.info("respawning worker {id} in {delay:.1f}s", id=worker.id, delay=delay)
        self._respawns[worker.id] = self.clock.callLater(delay, self._respawn, worker.id)

    def _respawn(self, worker_id: int) -> None:
        del self._respawns[worker_id]
        if not self.stopping and worker_id in self.slots:
            self.slots[worker_id] = self._start_process(worker_id)

    def _crash_loop(self, last: Worker) -> None:
        """Give up, with one closing line that names the last error (the
        error itself was logged as it happened)."""
        self.stopping = True  # respawn nothing more; the master stops the rest
        log.critical("crash loop: {n} workers in a row died within {s:.0f}s of starting; "
                     "giving up; the last error: {error}", n=self.fast_crashes,
                     s=self.policy.fast_crash_seconds, error=self._last_error(last))
        self._on_crash_loop()

    def _last_error(self, last: Worker) -> str:
        """What the worker reported, else the last line it printed, else how it ended."""
        if self._last_failure is not None:
            return self._last_failure[0]
        tail = last.process.output_tail() if last.process is not None else []
        printed = [line.strip() for line in tail if line.strip()]
        return printed[-1] if printed else str(last.exit)

    def _assign_cron(self) -> None:
        """Worker 1 runs cron once it is ready and no older worker 1 lives."""
        first = self.slots.get(1)
        if first is None or not first.is_ready or first.runs_cron or self.stopping:
            return
        if any(w.id == 1 and w is not first for w in self.processes):
            return
        first.runs_cron = True
        if first.process is not None:
            first.process.start_cron()

    def _check_silence(self) -> None:
        now = self.clock.seconds()
        for worker in list(self.processes):
            silent = now - worker.last_heard
            if worker.alive and silent > self.policy.silence_timeout:
                log.warn("{worker!r} silent for {silent:.1f}s (timeout {timeout}s); "
                         "its stack follows, then it is killed",
                         worker=worker, silent=silent, timeout=self.policy.silence_timeout)
                worker.last_heard = now  # one kill per timeout
                worker.timed_out = True
                # faulthandler in the worker writes every thread's stack to
                # its stderr, which the master logs under its id.
                worker.signal(signal.SIGUSR2)
                self.clock.callLater(self.policy.stack_dump_grace, worker.signal, signal.SIGKILL)

    # Stopping -----------------------------------------------------------------

    def stop(self, fast: bool = False) -> Deferred:
        """Stop every worker gracefully (SIGTERM: they drain) and kill what
        is left after the timeout; C{fast}: tell them not to wait for the
        requests in flight (SIGQUIT), and kill what is left sooner."""
        self.stopping = True
        self._serving_changed()
        if self._watchdog.running:
            self._watchdog.stop()
        for call in self._respawns.values():
            call.cancel()
        self._respawns.clear()
        if fast:
            return DeferredList([
                self._retire(worker, signal.SIGQUIT, self.policy.kill_grace)
                for worker in list(self.processes)])
        return DeferredList([self._retire(worker) for worker in list(self.processes)])

    def kill_all(self) -> None:
        """Stop at once (a second SIGINT)."""
        self.stopping = True
        self._serving_changed()
        for worker in list(self.processes):
            worker.signal(signal.SIGKILL)

    def _retire(self, worker: Worker, signum: int = signal.SIGTERM,
                deadline: Optional[float] = None) -> Deferred:
        """C{signum}, then SIGKILL if it outlives C{deadline} (by default,
        the shutdown timeout and the grace for its shutdown hooks)."""
        self.retire_from_serving(worker)
        exited = worker.when_exited()
        if not worker.alive:
            return exited
        worker.signal(signum)
        if deadline is None:
            deadline = self.policy.shutdown_timeout + self.policy.kill_grace

        def kill() -> None:
            log.warn("{worker!r} still running {deadline:.0f}s after SIGTERM; killing it",
                     worker=worker, deadline=deadline)
            worker.signal(signal.SIGKILL)

        call = self.clock.callLater(deadline, kill)
        exited.addBoth(lambda result: (call.active() and call.cancel(), result)[1])
        return exited

    # Rolling restart and scaling ------------------------------------------------

    async def rolling_restart(self) -> bool:
        """Replace each worker in turn, new one ready before the old one
        stops; stop at the first that fails.  True if all were replaced."""
        if self.reloading or self.stopping:
            self.replace_error = ("the master is stopping" if self.stopping
                                  else "a rolling restart is already in progress")
            log.info("{why}; rolling restart ignored", why=self.replace_error)
            return False
        self.replace_error = None
        self.reloading = True
        log.info("rolling restart of {count} workers", count=self.count)
        try:
            for worker_id in sorted(self.slots):
                if not await self._replace_in_turn(worker_id, "reload"):
                    if self.stopping:
                        self.replace_error = "the master is stopping"
                    return False
            log.info("rolling restart done")
            return True
        finally:
            self.reloading = False

    def recycle(self, worker: Worker, why: str) -> None:
        """Replace C{worker} the way a rolling restart would (its successor
        is ready before it stops), because of C{why}.  A successor that
        fails (new code that does not load, say) is retried later and
        later, not at every heartbeat."""
        now = self.clock.seconds()
        if (worker in self._recycling or self.stopping or worker.retiring
                or self.slots.get(worker.id) is not worker
                or now < self._recycle_retry_at.get(worker.id, 0.0)
                or now - worker.started_at < self.policy.fast_crash_seconds):
            return
        self._recycling.add(worker)
        log.info("{worker!r} recycled: {why}", worker=worker, why=why)

        def replace() -> Deferred:
            if self.slots.get(worker.id) is not worker:  # replaced meanwhile
                return succeed(True)
            return ensureDeferred(self._replace(worker.id, "recycle"))

        def done(replaced: bool) -> None:
            delay = self._recycle_delay.get(worker.id, 0.0)
            if replaced:
                self._recycle_delay.pop(worker.id, None)
                return
            delay = min(self.policy.max_recycle_delay, max(1.0, delay * 2))
            self._recycle_delay[worker.id] = delay
            self._recycle_retry_at[worker.id] = self.clock.seconds() + delay
            log.warn("{worker!r} stays; recycling it again in {delay:.0f}s",
                     worker=worker, delay=delay)

        replacing = self._replacements.run(replace).addCallback(done)
        replacing.addErrback(lambda failure: log.failure(
            "recycling {worker!r} failed", failure, worker=worker))
        replacing.addBoth(lambda result: self._recycling.discard(worker))

    def _replace_in_turn(self, worker_id: int, reason: str) -> Deferred:
        return self._replacements.run(lambda: ensureDeferred(self._replace(worker_id, reason)))

    async def _replace(self, worker_id: int, reason: str) -> bool:
        old = self.slots.get(worker_id)
        if old is None or self.stopping:
            return not self.stopping
        # Until it is ready the new process is not the slot's: its death
        # respawns nothing and fails only this step.
        new = self._start_process(worker_id)

        def too_slow() -> None:
            log.error("{new!r} not ready after {s}s; killing it", new=new,
                      s=self.policy.ready_timeout)
            new.signal(signal.SIGKILL)

        timeout = self.clock.callLater(self.policy.ready_timeout, too_slow)
        try:
            await new.when_ready()
        except WorkerDied as e:
            what = "rolling restart stopped" if reason == "reload" else f"{reason} failed"
            self.replace_error = f"{e}; the last error: {self._last_error(new)}"
            log.error("{what}: {why}; keeping {old!r}", what=what, why=self.replace_error,
                      old=old)
            return False
        finally:
            if timeout.active():
                timeout.cancel()
        if self.stopping or self.slots.get(worker_id) is not old:
            # the old one died meanwhile (and was respawned) or we are stopping
            await self._retire(new)
            return not self.stopping
        self.slots[worker_id] = new
        self.restarts[reason] += 1
        await self._retire(old)
        self._assign_cron()
        return True

    def scale_up(self) -> Optional[int]:
        """Add a worker with the lowest free id; return the id."""
        if self.stopping:
            return None
        worker_id = next(i for i in range(1, self.count + 2) if i not in self.slots)
        log.info("adding worker {id}", id=worker_id)
        self.restarts["scale"] += 1
        self._count += 1
        self._tell_count()
        self.slots[worker_id] = self._start_process(worker_id)
        return worker_id

    def scale_down(self) -> Optional[int]:
        """Retire the highest worker id (never the last one)."""
        if self.count <= 1 or self.stopping:
            log.info("not removing a worker: {why}",
                     why="the master is stopping" if self.stopping else "it is the last one")
            return None
        worker_id = max(self.slots)
        worker = self.slots.pop(worker_id)
        self._count -= 1
        pending = self._respawns.pop(worker_id, None)
        if pending is not None:
            pending.cancel()
        log.info("removing worker {id}", id=worker_id)
        self.restarts["scale"] += 1
        if worker is not None:
            self._retire(worker)
        self._tell_count()
        return worker_id

    def _tell_count(self) -> None:
        """Every worker that keeps serving learns the new worker count."""
        for worker in self.slots.values():
            if worker is not None and worker.process is not None and worker.alive:
                worker.process.tell_count(self._count)
