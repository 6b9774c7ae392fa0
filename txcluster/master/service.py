"""
The master as a twistd service: it holds the listening sockets, turns
signals into actions, and exits with a status systemd understands.

L{build_master} makes its parts once, in dependency order: the CPUs
workers are pinned to, the listening sockets (bound at once, before twistd
drops privileges), the spawner, the round-robin dispatcher, and the
L{Supervisor} that ties them together.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Callable, Dict, List, Mapping, Optional

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.logger import Logger

from ..cpus import Pinning, usable_cpus
from ..settings import REUSEPORT, ROUND_ROBIN, Settings
from ..wire import ExitStatus
from .dispatch import ConnectionDispatcher
from .process import WorkerSpawner
from .sockets import Listeners, SharedSocket, bind, describe
from .supervisor import RestartPolicy, Supervisor, Worker
from .systemd import notify_systemd

log = Logger(namespace="txcluster.master")


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

    def __init__(self, reactor: Any, settings: Settings) -> None:
        super().__init__()
        self.reactor = reactor
        self.settings = settings
        self.exit_status = ExitStatus.OK
        self._stop_requests = 0
        self._stopping = False

    def startService(self) -> None:
        for warning in self.settings.warnings:
            log.warn("{warning}", warning=warning)
        super().startService()
        self.reactor.callWhenRunning(self._install_signal_handlers)

    def signal_actions(self) -> Dict[int, Callable[[], Any]]:
        return {
            signal.SIGTERM: self.request_stop,
            signal.SIGINT: self.request_stop,
            # Without a handler SIGHUP would kill, SIGTTIN/TTOU suspend us.
            signal.SIGHUP: self.not_supported("SIGHUP (rolling restart)"),
            signal.SIGTTIN: self.not_supported("SIGTTIN (one worker more)"),
            signal.SIGTTOU: self.not_supported("SIGTTOU (one worker fewer)"),
        }

    @staticmethod
    def not_supported(what: str) -> Callable[[], None]:
        return lambda: log.warn("{what} needs workers; ignored with --single", what=what)

    def _install_signal_handlers(self) -> None:
        """Replace the reactor's SIGTERM/SIGINT handlers (after which twistd
        would kill itself with the signal: a graceful stop must exit 0) and
        add ours.  Each handler only schedules its action in the reactor."""
        for signum, action in self.signal_actions().items():
            signal.signal(signum, lambda n, frame, a=action: self.reactor.callFromThread(a))

    def request_stop(self) -> None:
        """SIGTERM or SIGINT: stop gracefully; a second one stops at once."""
        self._stop_requests += 1
        if self._stop_requests == 1:
            log.info("graceful shutdown (send SIGINT again to stop at once)")
            self.stop_reactor()
        else:
            self.stop_now()

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
                 dispatcher: Optional[ConnectionDispatcher] = None) -> None:
        super().__init__(reactor, settings)
        self.listeners = listeners
        self.dispatcher = dispatcher
        self.supervisor = Supervisor(
            reactor, spawner, settings.workers, policy_from(settings),
            on_crash_loop=self._crash_loop,
            on_all_ready=self._all_ready,
            on_serving=self._serving,
        )

    def startService(self) -> None:
        super().startService()
        log.info("txcluster master (pid {pid}) listening on {address} with {n} workers",
                 pid=os.getpid(), address=describe(self.listeners.listening),
                 n=self.settings.workers)
        self.supervisor.start()

    def _serving(self, workers: List[Worker]) -> None:
        """Round-robin: deal new connections to these workers only."""
        if self.dispatcher is not None:
            self.dispatcher.serve([w.process.channel for w in workers
                                   if w.process is not None and w.process.channel is not None])

    def stopService(self) -> Deferred:
        super().stopService()
        if not self.supervisor.slots:
            return succeed(None)  # never started
        log.info("shutting down {n} workers (timeout {s}s)",
                 n=len(self.supervisor.processes), s=self.settings.shutdown_timeout)
        notify_systemd(b"STOPPING=1")
        if self.dispatcher is not None:
            self.dispatcher.close()
        return self.supervisor.stop().addCallback(
            lambda _: log.info("all workers stopped; master exiting"))

    def _all_ready(self) -> None:
        """systemd hears READY=1 only now, not when the master starts."""
        notify_systemd(f"READY=1\nSTATUS={self.supervisor.count} workers ready on "
                       f"{describe(self.listeners.listening)}".encode())

    def _crash_loop(self) -> None:
        self.exit_status = ExitStatus.CRASH_LOOP
        self.stop_reactor()

    # Signals ------------------------------------------------------------------

    def signal_actions(self) -> Dict[int, Callable[[], Any]]:
        return {
            **super().signal_actions(),
            signal.SIGHUP: self.reload,
            signal.SIGTTIN: self.add_worker,
            signal.SIGTTOU: self.remove_worker,
        }

    def stop_now(self) -> None:
        log.warn("stopping now: killing all workers")
        self.supervisor.kill_all()

    def reload(self) -> Deferred:
        log.info("SIGHUP: rolling restart")
        return ensureDeferred(self.supervisor.rolling_restart())

    def add_worker(self) -> None:
        log.info("SIGTTIN: one worker more")
        self.supervisor.scale_up()

    def remove_worker(self) -> None:
        log.info("SIGTTOU: one worker fewer")
        removed = self.supervisor.scale_down()
        if removed is not None:
            self.listeners.release(removed)


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
                              cpu_of=None if pinning is None else pinning.cpu_of)
    return SharedSocket(bind(reactor, settings.listen))


def build_master(reactor: Any, settings: Settings,
                 environ: Mapping[str, str] = os.environ) -> MasterService:
    """The master's parts, each built once, in dependency order.

    @raise txcluster.master.sockets.StartupError: C{--listen} cannot be bound.
    """
    pinning = Pinning(usable_cpus()) if settings.cpu_affinity else None
    listeners = bind_listeners(reactor, settings, pinning)
    spawner = WorkerSpawner(reactor, settings, listeners, pinning, environ)
    dispatcher = None
    if settings.balance == ROUND_ROBIN:
        dispatcher = ConnectionDispatcher(reactor, listeners.listening.fileno())
    return MasterService(reactor, settings, listeners, spawner, dispatcher)
