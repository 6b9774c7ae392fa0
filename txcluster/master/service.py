"""
The master as a twistd service: it holds the listening sockets, turns
signals into actions, and exits with a status systemd understands.

L{build_master} makes its parts once, in dependency order: the CPUs
workers are pinned to, the listening sockets (bound at once, before twistd
drops privileges), the spawner, the dispatcher (and with reuseport its
stand-ins), the
L{Supervisor} that ties them together, and the ports of C{--metrics} and
C{--control}, which read and drive it.
"""

from __future__ import annotations

import inspect
import os
import signal
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Set, Union

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..cpus import Pinning, usable_cpus
from ..ledger import Ledger
from ..settings import REUSEPORT, ROUND_ROBIN, Settings
from ..wire import ExitStatus
from .dispatch import ConnectionDispatcher, StandIns
from .fairshare import LedgerDealer
from .process import WorkerSpawner
from .recycling import MemoryWatch
from .steering import SteeringGuard
from .sockets import Listeners, SharedSocket, bind, describe, listen
from .supervisor import RecyclePolicy, RestartPolicy, Supervisor, Worker, WorkerDied
from .systemd import Systemd

log = Logger(namespace="txcluster.master")

#: How often C{txcluster scale} looks again for a worker being respawned.
RESPAWN_POLL_SECONDS = 0.1

#: Signals whose default action is not to end the process (it ignores,
#: stops or continues it): they need no handler to be harmless.
NOT_FATAL_BY_DEFAULT = frozenset({
    signal.SIGCHLD, signal.SIGCONT, signal.SIGURG, signal.SIGWINCH,
    signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU,
})

#: Faults, and the signals no process may catch: a fault's handler that
#: returns runs the faulting instruction again, so they keep killing (and
#: dumping core).
LEFT_FATAL = frozenset({
    signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGABRT,
    signal.SIGTRAP, signal.SIGSYS, signal.SIGKILL, signal.SIGSTOP,
})

#: Ignored without a log line: a write to a closed pipe or socket says
#: EPIPE anyway, and happens whenever a worker or a client goes away.
QUIET_SIGNALS = frozenset({signal.SIGPIPE})


def harmless_signals(used: Iterable[int]) -> List[int]:
    """
    The signals to make harmless in a process that handles C{used}: every
    catchable one whose default action would end it (SIGUSR2, SIGALRM,
    SIGPIPE, real-time signals, ...), but the faults.  Their handler at
    most logs them, and unlike SIG_IGN is not inherited by the workers.
    """
    return sorted(set(signal.valid_signals()) - NOT_FATAL_BY_DEFAULT - LEFT_FATAL - set(used))


def signal_name(signum: int) -> str:
    """C{SIGALRM}; Linux's real-time signals have no name of their own:
    C{SIGRTMIN+1}."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"SIGRTMIN+{signum - signal.SIGRTMIN}"


def twistd_log_file(handler: Any) -> Optional[Any]:
    """
    The log file twistd opened for C{--logfile}, found through the SIGUSR1
    handler it installs to rotate it (twistd keeps no other reference we
    can reach).  C{None} when twistd logs to stdout or syslog, under
    C{twist}, or if a future twistd changes its handler;
    C{tests/test_operations.py} runs a real daemon, so such a change fails
    there.
    """
    try:
        candidate = inspect.getclosurevars(handler).nonlocals.get("logFile")
    except TypeError:  # SIG_DFL, SIG_IGN, or a builtin
        return None
    return candidate if callable(getattr(candidate, "reopen", None)) else None


def recycle_policy_from(settings: Settings) -> RecyclePolicy:
    return RecyclePolicy(max_requests=settings.max_requests,
                         jitter=settings.max_requests_jitter,
                         max_memory=settings.max_memory)


def policy_from(settings: Settings) -> RestartPolicy:
    return RestartPolicy(
        max_delay=settings.respawn_delay,
        silence_timeout=settings.timeout,
        ready_timeout=settings.ready_timeout,
        shutdown_timeout=settings.shutdown_timeout,
    )


class SignalledService(MultiService):
    """
    What the master and the C{--single} process share: the settings, the
    exit status, and the signals (SIGTERM/SIGINT stop gracefully, a second
    one at once; the others are the subclass's).
    """

    def __init__(self, reactor: Any, settings: Settings,
                 systemd: Optional[Systemd] = None) -> None:
        super().__init__()
        self.reactor = reactor
        self.settings = settings
        self.systemd = Systemd(reactor) if systemd is None else systemd
        self.exit_status = ExitStatus.OK
        #: SIGQUIT: workers do not wait for the requests in flight
        self.fast = False
        self._stop_requests = 0
        self._stopping = False
        self._leaving = False
        self._log_file: Optional[Any] = None
        #: harmless signals that have arrived (each is logged the first time)
        self._ignored: Set[int] = set()
        #: what the process's setup did, logged once it runs
        self.notes: List[str] = []

    def startService(self) -> None:
        # twistd starts services before the reactor runs: ours go in now, so
        # that a SIGTERM from now on is a graceful stop (before the reactor
        # runs, its action waits in the reactor's queue), and again once the
        # reactor has installed its own, which replace them.
        self._install_signal_handlers()
        self.reactor.callWhenRunning(self._install_signal_handlers)
        for note in [*self.settings.notes, *self.notes]:
            log.info("{note}", note=note)
        for warning in self.settings.warnings:
            log.warn("{warning}", warning=warning)
        self.systemd.start_watchdog()
        super().startService()

    def signal_actions(self) -> Dict[int, Callable[[], Any]]:
        return {
            signal.SIGTERM: self.request_stop,
            signal.SIGINT: self.request_stop,
            signal.SIGQUIT: self.stop_fast,
            signal.SIGUSR1: self.reopen_logs,
            # Without a handler SIGHUP would kill, SIGTTIN/TTOU suspend us.
            signal.SIGHUP: self.not_supported("SIGHUP (rolling restart)"),
            signal.SIGTTIN: self.not_supported("SIGTTIN (one worker more)"),
            signal.SIGTTOU: self.not_supported("SIGTTOU (one worker fewer)"),
        }

    @staticmethod
    def not_supported(what: str) -> Callable[[], None]:
        return lambda: log.warn("{what} needs workers; ignored with --single", what=what)

    def _run_signal_action(self, action: Callable[[], Any]) -> None:
        """In the reactor's thread; an error is logged, never left unhandled."""
        try:
            result = action()
        except Exception:
            log.failure("handling a signal failed")
            return
        if isinstance(result, Deferred):
            result.addErrback(lambda failure: log.failure("handling a signal failed", failure))

    def _install_signal_handlers(self) -> None:
        """Replace the reactor's SIGTERM/SIGINT handlers (after which twistd
        would kill itself with the signal: a graceful stop must exit 0) and
        add ours.  Each handler only schedules its action in the reactor."""
        if self._log_file is None:
            self._log_file = twistd_log_file(signal.getsignal(signal.SIGUSR1))
        actions = self.signal_actions()
        for signum, action in actions.items():
            signal.signal(signum, lambda n, frame, a=action: self.reactor.callFromThread(
                self._run_signal_action, a))
        for signum in harmless_signals(actions):
            signal.signal(signum, (lambda n, frame: None) if signum in QUIET_SIGNALS else
                          lambda n, frame: self.reactor.callFromThread(self.ignored, n))

    def ignored(self, signum: int) -> None:
        """A signal we have no use for arrived: said once, then silently."""
        if signum not in self._ignored:
            self._ignored.add(signum)
            log.info("ignored {name}: txcluster has no use for it (not logged again)",
                     name=signal_name(signum))

    def reopen_logs(self) -> None:
        """SIGUSR1 (logrotate): reopen every log file, ours and the app's."""
        if self._log_file is not None:
            self._log_file.reopen()
        log.info("SIGUSR1: reopened the log files")
        self.reopen_app_logs()

    def reopen_app_logs(self) -> None:
        """The access log, which the workers (or the single process) write."""

    def stop_fast(self) -> None:
        """SIGQUIT: stop without waiting for the requests in flight; exit 0
        (even if a graceful stop is already under way: it is cut short)."""
        log.info("SIGQUIT: fast shutdown")
        already = self._stopping
        self.fast = True
        self.stop_reactor()
        if already:
            self.hurry()

    def hurry(self) -> None:
        """A graceful stop under way becomes a fast one."""

    def stop_gracefully(self) -> None:
        """As SIGTERM, but a repeat never escalates (C{txcluster stop})."""
        if not self._stopping and not self._leaving:
            log.info("graceful shutdown (txcluster stop)")
        self._stop_after_delay()

    def request_stop(self) -> None:
        """SIGTERM or SIGINT: stop gracefully; a second one stops at once."""
        self._stop_requests += 1
        if self._stop_requests == 1:
            log.info("graceful shutdown (send SIGINT again to stop at once)")
            self._stop_after_delay()
        else:
            self.stop_now()

    def _stop_after_delay(self) -> None:
        """C{--shutdown-delay}: health checks answer 503 while requests are
        still served, so that a load balancer takes this host out first;
        then accepting stops and the drain begins."""
        delay = self.settings.shutdown_delay
        if delay <= 0 or self._stopping or self._leaving:
            self.stop_reactor()
            return
        self._leaving = True
        log.info("health checks answer 503 for {delay}s, then the drain begins", delay=delay)
        self.announce_leaving()
        self.reactor.callLater(delay, self.stop_reactor)

    def announce_leaving(self) -> None:
        """Health checks answer 503 from now on."""

    def stop_reactor(self) -> None:
        """Stop the reactor once, whoever asks (signal, crash loop, failure)."""
        if self._stopping:
            return
        self._stopping = True
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)

    def stop_now(self) -> None:
        """Stop without waiting for in-flight requests."""
        raise NotImplementedError


class MasterService(SignalledService):
    """Supervise N worker processes sharing the bound port."""

    def __init__(self, reactor: Any, settings: Settings, listeners: Listeners,
                 spawner: WorkerSpawner,
                 dispatcher: Optional[ConnectionDispatcher] = None,
                 systemd: Optional[Systemd] = None,
                 stand_ins: Optional[StandIns] = None) -> None:
        super().__init__(reactor, settings, systemd)
        self.listeners = listeners
        self.dispatcher = dispatcher
        self.stand_ins = stand_ins
        self.supervisor = Supervisor(
            reactor, spawner, settings.workers, policy_from(settings),
            on_crash_loop=self._crash_loop,
            on_all_ready=self._all_ready,
            on_serving=self._serving,
            recycling=recycle_policy_from(settings),
        )
        self.memory = MemoryWatch(self.supervisor, reactor)
        self.started_at = reactor.seconds()
        #: workers still starting when the logs were reopened: each is told
        #: to reopen its own once it is ready
        self._reopen_once_ready: Set[Worker] = set()
        #: the callers of the rolling restart under way, if there is one
        self._reload_waiters: List[Deferred] = []

    def startService(self) -> None:
        super().startService()
        self.started_at = self.reactor.seconds()
        log.info("txcluster master (pid {pid}) listening on {address} with {n} workers",
                 pid=os.getpid(), address=describe(self.listeners.listening),
                 n=self.settings.workers)
        self.reactor.callWhenRunning(self.supervisor.start)
        self.memory.start()

    def _serving(self, workers: List[Worker]) -> None:
        """Deal connections (new ones in round-robin, handed back ones in
        every mode) to these workers only; with reuseport, accept on the
        sockets of the others."""
        if self.dispatcher is None and self.stand_ins is None:
            return
        channels = [w.process.channel for w in workers
                    if w.process is not None and w.process.channel is not None]
        if self.dispatcher is not None:
            self.dispatcher.serve(channels)
        if self.stand_ins is not None:
            self.stand_ins.serve(self.listeners.unserved({w.id for w in workers}))

    def stopService(self) -> Deferred:
        super().stopService()  # the control socket and the metrics port close
        self.memory.stop()
        if not self.supervisor.slots:
            return succeed(None)  # never started
        log.info("shutting down {n} workers (timeout {s}s)",
                 n=len(self.supervisor.processes), s=self.settings.shutdown_timeout)
        self.systemd.stopping()
        if self.dispatcher is not None:
            self.dispatcher.close()
        if self.stand_ins is not None:
            self.stand_ins.close()
        self.listeners.close()
        return self.supervisor.stop(fast=self.fast).addCallback(
            lambda _: log.info("all workers stopped; master exiting"))

    def _all_ready(self) -> None:
        """systemd hears READY=1 only now, not when the master starts."""
        self.systemd.ready(self._status())

    def _status(self) -> str:
        """For C{systemctl status}."""
        return (f"{len(self.supervisor.serving())} workers ready "
                f"on {describe(self.listeners.listening)}")

    def _crash_loop(self) -> None:
        self.exit_status = ExitStatus.CRASH_LOOP
        self.stop_reactor()

    # Signals ------------------------------------------------------------------

    def signal_actions(self) -> Dict[int, Callable[[], Any]]:
        return {
            **super().signal_actions(),
            signal.SIGHUP: self.reload,
            signal.SIGTTIN: self.add_worker,
            signal.SIGTTOU: self.remove_worker_on_signal,
        }

    def stop_now(self) -> None:
        log.warn("stopping now: killing all workers")
        self.supervisor.kill_all()

    def announce_leaving(self) -> None:
        for worker in self.supervisor.processes:
            if worker.is_ready and worker.process is not None:
                worker.process.tell_leaving()

    def reopen_app_logs(self) -> None:
        """Every worker reopens its access log: a ready one at once; one
        still starting, which may have opened the rotated file already, as
        soon as it is ready (only then is its SIGUSR1 handler sure to be
        installed)."""
        for worker in self.supervisor.processes:
            if worker.is_ready:
                worker.signal(signal.SIGUSR1)
            elif worker not in self._reopen_once_ready:
                self._reopen_once_ready.add(worker)
                worker.when_ready().addCallbacks(
                    lambda ready: ready.signal(signal.SIGUSR1),
                    lambda failure: failure.trap(WorkerDied)).addBoth(
                    lambda _, w=worker: self._reopen_once_ready.discard(w))

    def reload(self) -> Deferred:
        """SIGHUP: a rolling restart.  For systemd (Type=notify-reload)
        every request is RELOADING=1, and the end of the rolling restart it
        started or joined (one is under way) is READY=1, done or not.
        Fires with None when done, else why not."""
        log.info("rolling restart requested")
        if self.supervisor.stopping:
            log.info("the master is stopping; rolling restart ignored")
            return succeed("the master is stopping")
        self.systemd.reloading()
        waiter: Deferred = Deferred()
        self._reload_waiters.append(waiter)
        if len(self._reload_waiters) > 1:
            log.info("a rolling restart is under way: this request waits for its end")
        else:
            ensureDeferred(self.supervisor.rolling_restart()).addBoth(self._reload_over)
        return waiter

    def _reload_over(self, outcome: Union[bool, Failure]) -> None:
        """READY=1 once, and every request that waited hears the outcome."""
        waiters, self._reload_waiters = self._reload_waiters, []
        if not self.supervisor.stopping:
            self.systemd.ready(self._status())
        for waiter in waiters:
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(None if outcome else self.supervisor.replace_error or "not done")

    def hurry(self) -> None:
        self.supervisor.stop(fast=True)

    def status(self) -> Dict[str, Any]:
        """The master and each of its worker processes (C{txcluster status})."""
        now = self.reactor.seconds()
        workers = [{
            "id": w.id, "pid": w.pid,
            "state": "draining" if w.retiring else "ready" if w.is_ready else "starting",
            "uptime": round(now - w.started_at, 1), "requests": w.stats.requests, "rss": w.rss,
        } for w in sorted(self.supervisor.processes, key=lambda w: (w.id, w.started_at))]
        return {"pid": os.getpid(), "uptime": round(now - self.started_at, 1),
                "listen": describe(self.listeners.listening),
                "balance": self.settings.balance, "workers": workers}

    async def scale_to(self, count: int) -> None:
        """C{txcluster scale N}: returns once N workers are ready.

        @raise ControlError: the master is stopping, or a worker died first.
        """
        from ..control import ControlError

        if count != self.supervisor.count:
            log.info("scaling from {old} to {new} workers", old=self.supervisor.count, new=count)
        while self.supervisor.count < count:
            if self.supervisor.scale_up() is None:
                raise ControlError("the master is stopping")
        while self.supervisor.count > count:
            if self.remove_worker() is None:
                raise ControlError("the master is stopping")
        for worker_id in sorted(self.supervisor.slots):
            while True:
                if self.supervisor.stopping:
                    raise ControlError("the master is stopping")
                worker = self.supervisor.slots.get(worker_id)
                if worker is not None:
                    try:
                        await worker.when_ready()
                        break
                    except WorkerDied:  # it is respawned: wait for the next one
                        pass
                await deferLater(self.reactor, RESPAWN_POLL_SECONDS, lambda: None)

    def add_worker(self) -> None:
        log.info("SIGTTIN: one worker more")
        self.supervisor.scale_up()

    def remove_worker_on_signal(self) -> None:
        log.info("SIGTTOU: one worker fewer")
        self.remove_worker()

    def remove_worker(self) -> Optional[int]:
        removed = self.supervisor.scale_down()
        if removed is not None:
            self.listeners.release(removed)
            self._serving(self.supervisor.serving())  # with reuseport, its socket is left to us
        return removed


def bind_listeners(reactor: Any, settings: Settings,
                   pinning: Optional[Pinning] = None) -> Listeners:
    """Bind C{--listen}: one socket, or with reuseport one per worker id,
    each marked with its worker's CPU (C{pinning}).

    @raise txcluster.master.sockets.StartupError: it cannot be bound.
    """
    if settings.balance == REUSEPORT:
        # Only this mode imports twisted.internet.tcp (and so pyOpenSSL).
        from .reuseport import ReusePortGroup

        return ReusePortGroup(reactor, settings.listen, settings.workers,
                              cpu_of=None if pinning is None else pinning.cpu_of,
                              backlog=settings.backlog)
    return SharedSocket(bind(reactor, settings.listen, settings.backlog))


def steering_guard(reactor: Any, ledger: LedgerDealer, group: Any,
                   dispatcher: ConnectionDispatcher) -> SteeringGuard:
    """Steer connections by CPU (the sockets of C{group} are marked, and
    the workers told through the ledger) while the workers hand on little
    of what the kernel gives them (L{SteeringGuard})."""

    def steer(on: bool) -> None:
        group.steer(on)
        ledger.ledger.set_steering(on)

    steer(True)
    return SteeringGuard(reactor, kept=ledger.kept, handed_on=lambda: dispatcher.handed_back,
                         serving=ledger.serving, steer=steer)


class ListeningService(Service):
    """A port opened at once (so that an address in use is a startup
    error), and closed when the master stops: C{--metrics}, C{--control}."""

    def __init__(self, port: Any, what: str) -> None:
        self.port = port
        self.what = what

    def startService(self) -> None:
        super().startService()
        log.info("{what} on {address}", what=self.what, address=describe(self.port))

    def stopService(self) -> Deferred:
        super().stopService()
        return maybeDeferred(self.port.stopListening)


def build_master(reactor: Any, settings: Settings,
                 environ: Mapping[str, str] = os.environ) -> MasterService:
    """The master's parts, each built once, in dependency order.

    @raise txcluster.master.sockets.StartupError: C{--listen}, C{--metrics}
        or C{--control} cannot be bound.
    """
    pinning = Pinning(usable_cpus()) if settings.cpu_affinity else None
    listeners = bind_listeners(reactor, settings, pinning)
    # With reuseport, workers accept themselves and keep a fair share by a
    # tally they share with the master's dealer.
    ledger = LedgerDealer(Ledger.create()) if settings.balance == REUSEPORT else None
    # Its dealer deals every connection the master passes on: those it
    # accepts (round-robin, or with its stand-ins a reuseport socket no
    # worker accepts on), those a worker hands on (reuseport: more than its
    # share) and those a stopping worker hands back (every mode).
    dispatcher = ConnectionDispatcher(reactor, ledger)
    if settings.balance == ROUND_ROBIN:
        dispatcher.accept_on(listeners.listening.fileno())
    spawner = WorkerSpawner(reactor, settings, listeners, pinning, environ, dispatcher,
                            ledger)
    stand_ins = StandIns(dispatcher) if settings.balance == REUSEPORT else None
    master = MasterService(reactor, settings, listeners, spawner, dispatcher,
                           stand_ins=stand_ins)
    if ledger is not None and getattr(listeners, "steering", False):
        steering_guard(reactor, ledger, listeners, dispatcher).setServiceParent(master)
    if settings.metrics:
        from .metrics import ClusterMetrics, metrics_site

        site = metrics_site(ClusterMetrics(master.supervisor), reactor)
        port = listen(reactor, settings.metrics, site, option="--metrics")
        ListeningService(port, "metrics").setServiceParent(master)
    if settings.control:
        from .control import ControlFactory, listen_control

        port = listen_control(reactor, settings.control, ControlFactory(master))
        ListeningService(port, "control socket").setServiceParent(master)
    return master
