"""
The master: bind once, spawn and supervise the workers, turn signals into
actions, and exit with a status systemd understands.

The master never imports the app and never reads from the listening socket.
"""

from __future__ import annotations

import os
import signal
import socket
from typing import Any, Callable, Dict, List, Optional

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from .balancing import REUSEPORT, ROUND_ROBIN, ConnectionDispatcher, WorkerChannel
from .control import ExitStatus
from .listening import bind, describe
from .options import Settings
from .process import WorkerSpawner
from .reuseport import ReusePortGroup
from .supervisor import RestartPolicy, Supervisor

log = Logger(namespace="txcluster.master")


def policy_from(settings: Settings) -> RestartPolicy:
    return RestartPolicy(
        max_delay=settings.respawn_delay,
        silence_timeout=settings.timeout,
        ready_timeout=settings.ready_timeout,
        shutdown_timeout=settings.shutdown_timeout,
    )


def notify_systemd(state: bytes) -> None:
    """Tell systemd (C{Type=notify}) our state; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(state, address)


class BoundService(MultiService):
    """Binds C{settings.listen} in C{privilegedStartService}, before twistd
    drops privileges (and, under C{twist}, which has no privileged phase,
    in C{startService})."""

    def __init__(self, reactor: Any, settings: Settings) -> None:
        super().__init__()
        self.reactor = reactor
        self.settings = settings
        self.exit_status = ExitStatus.OK
        self.listening: Optional[IListeningPort] = None
        self._stop_requests = 0
        self._stopping = False

    def privilegedStartService(self) -> None:
        if self.listening is None:
            self.listening = self.bind()
        super().privilegedStartService()

    def startService(self) -> None:
        if self.listening is None:
            self.listening = self.bind()
        for warning in self.settings.warnings:
            log.warn("{warning}", warning=warning)
        super().startService()
        self.reactor.callWhenRunning(self._install_signal_handlers)

    def bind(self) -> IListeningPort:
        return bind(self.reactor, self.settings.listen)

    # Signals ------------------------------------------------------------------

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


class MasterService(BoundService):
    """Supervise N worker processes sharing the bound port."""

    def __init__(self, reactor: Any, settings: Settings) -> None:
        super().__init__(reactor, settings)
        self.supervisor: Optional[Supervisor] = None
        self.dispatcher: Optional[ConnectionDispatcher] = None
        self.sockets: Optional[ReusePortGroup] = None  # --balance reuseport
        self.spawner = WorkerSpawner(reactor, settings, self._listening_fd,
                                     steered=self._steered)

    def bind(self) -> IListeningPort:
        if self.settings.balance != REUSEPORT:
            return super().bind()
        # Each socket is marked with the CPU its worker will be pinned to.
        self.sockets = ReusePortGroup(
            self.reactor, self.settings.listen, self.settings.workers,
            cpu_of=self.spawner.cpu_of if self.settings.cpu_affinity else None)
        return self.sockets.first

    def _listening_fd(self, worker_id: int) -> int:
        """The listening socket worker C{worker_id} is given."""
        if self.sockets is not None:
            return self.sockets.fileno(worker_id)
        assert self.listening is not None
        return self.listening.fileno()

    def _steered(self, worker_id: int) -> bool:
        """With --cpu-affinity: do worker C{worker_id}'s new connections
        come from its CPU?  (Asked after L{_listening_fd}.)"""
        return self.sockets is None or self.sockets.steers(worker_id)

    def startService(self) -> None:
        super().startService()
        assert self.listening is not None
        log.info("txcluster master (pid {pid}) listening on {address} with {n} workers",
                 pid=os.getpid(), address=describe(self.listening), n=self.settings.workers)
        self.supervisor = Supervisor(
            self.reactor,
            self.spawner,
            self.settings.workers,
            policy_from(self.settings),
            on_crash_loop=self._crash_loop,
            on_all_ready=self._all_ready,
            on_worker_ready=lambda worker: self._start_dispatching(),
        )
        if self.settings.balance == ROUND_ROBIN:
            self.dispatcher = ConnectionDispatcher(
                self.reactor, self.listening.fileno(), self._connection_channels)
        self.supervisor.start()

    def _connection_channels(self) -> List[WorkerChannel]:
        return [w.process.channel for w in self.supervisor.serving()
                if w.process.channel is not None]

    def _start_dispatching(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.start()

    def stopService(self) -> Deferred:
        super().stopService()
        if self.supervisor is None:
            return succeed(None)
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
                       f"{describe(self.listening)}".encode())

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
        if removed is not None and self.sockets is not None:
            self.sockets.release(removed)


class SingleProcessService(BoundService):
    """C{--single}: the app, its hooks and its cron jobs run in this process."""

    def __init__(self, reactor: Any, settings: Settings) -> None:
        super().__init__(reactor, settings)
        self.worker: Any = None

    def startService(self) -> None:
        super().startService()
        assert self.listening is not None
        log.info("txcluster (pid {pid}) listening on {address}, single process",
                 pid=os.getpid(), address=describe(self.listening))
        from .app import WorkerInfo
        from .listening import adopt
        from .worker import WorkerService

        fd = self.listening.fileno()
        self.worker = WorkerService(
            self.reactor, self.settings, WorkerInfo(id=1, count=1, pid=os.getpid()),
            listen=lambda site: adopt(self.reactor, fd, site, self.settings.listen),
            on_ready=self._ready,
        )
        self.worker.started.addErrback(self._start_failed)
        self.worker.setServiceParent(self)

    def stop_now(self) -> None:
        log.warn("stopping now: dropping open connections")
        if self.worker is not None and self.worker.site is not None:
            self.worker.site.abort()

    def _ready(self) -> None:
        log.info("ready")
        self.worker.start_cron()
        notify_systemd(b"READY=1")

    def _start_failed(self, failure: Any) -> None:
        self.exit_status = self.worker.exit_status
        self.stop_reactor()
