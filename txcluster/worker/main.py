"""
A worker process, from spawn to exit: C{python -m txcluster.worker}.

The master spawns it with the descriptors and the environment of
L{txcluster.wire}.  L{WorkerProcess} ties the pieces together (the control
channel, the heartbeat, the L{WorkerService}, what to do when the master
goes away), with the reactor, the clock and the process's exits injected,
so a unit test drives it on a L{MemoryReactorClock}; L{main} runs it for real.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import traceback
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ..app import Cluster, WorkerInfo, load_app
from ..ledger import Ledger, LedgerSlot
from ..wire import (
    CONTROL_FROM_WORKER, CONTROL_TO_WORKER, LEDGER_FD, ExitStatus, WorkerEnvironment,
    heartbeat_interval,
)
from .control import WorkerSide
from .listen import listen
from .locality import Locality
from .service import WorkerService

log = Logger(namespace="txcluster.worker")

#: How long an orphaned worker (its master is gone) lets requests finish,
#: and when it exits whatever is left: the contract says within 2 s.
ORPHAN_DRAIN_SECONDS = 1.0
ORPHAN_EXIT_SECONDS = 1.8

#: Given the reactor, the settings and the site, return the listening port.
Listen = Callable[[Any, Any, IProtocolFactory], IListeningPort]


class WorkerProcess:
    """
    One worker process's life.

    @param parent_pid: this process's parent now; when it is no longer the
        master, the master is gone (and Linux sent us SIGTERM for it).
    @param exit_now: ends the process at once, whatever is still running.
    """

    def __init__(
        self,
        reactor: Any,
        environment: WorkerEnvironment,
        listen: Listen = listen,
        load: Callable[[str], Cluster] = load_app,
        locality: Optional[Locality] = None,
        parent_pid: Callable[[], int] = os.getppid,
        exit_now: Callable[[int], None] = os._exit,
        on_connections: Callable[[int], None] = lambda open: None,
    ) -> None:
        self.reactor = reactor
        self.environment = environment
        #: the reactor is shutting down (our before-shutdown trigger ran)
        self.stopping = False
        self._stop_asked = False
        self._parent_pid = parent_pid
        self._exit_now = exit_now
        settings = environment.settings
        self.control = WorkerSide(on_start_cron=self._start_cron,
                                  on_master_lost=self.master_lost,
                                  on_count=self._set_count,
                                  on_leaving=lambda: self.service.leaving())
        self.service = WorkerService(
            reactor, settings,
            WorkerInfo(id=environment.worker_id, count=environment.count, pid=os.getpid()),
            listen=lambda site: listen(reactor, settings, site),
            on_ready=self.control.report_ready,
            load=load,
            locality=locality,
            on_failed=lambda status, summary, failure: self.control.report_failure(
                status, summary, traceback_text(failure)),
            on_connections=on_connections,
        )
        self.heartbeat = LoopingCall(self.beat)
        self.heartbeat.clock = reactor

    def beat(self) -> None:
        """Tell the master we are alive, and what we have served."""
        self.control.heartbeat(self.service.stats())

    def start(self) -> None:
        """Once the reactor runs: beat, and serve."""
        self.heartbeat.start(heartbeat_interval(self.environment.settings.timeout))
        self.service.startService()
        self.service.started.addErrback(self._start_failed)

    def shutdown(self) -> Deferred:
        """Before the reactor stops (SIGTERM from the master, or the master
        is gone): leave the master's rotation, then drain.  Heartbeats go on
        while draining: a long drain is not a hang."""
        self.stopping = True
        if self._parent_pid() != self.environment.master_pid:  # PR_SET_PDEATHSIG's SIGTERM
            self.master_lost()
        left = self.control.report_stopping(self.reactor)

        def drain(takes_back: bool) -> Deferred:
            self.service.may_hand_back = takes_back
            return self.service.stopService()

        drained = left.addCallback(drain)
        # The last counts, so that the master's totals miss no request; an
        # answered command, since the pipe closes as the reactor stops.
        return drained.addCallback(
            lambda _: self.control.say_goodbye(self.reactor, self.service.stats()))

    def install_signal_handlers(self) -> None:
        """
        Once the reactor runs (it installs its own handlers as it starts):

        - SIGINT is ignored: Ctrl-C in a terminal reaches the whole process
          group, and the master decides what happens to workers;
        - SIGTERM stops once, however many arrive (the master's, and the
          one systemd or a shell sends to the whole group);
        - SIGQUIT stops without waiting for the requests in flight;
        - SIGUSR1 reopens the access log (logrotate); it was ignored
          while we started (L{txcluster.worker.__main__}, which also made
          SIGUSR2 write every thread's stack from the start).
        """
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for signum, action in ((signal.SIGTERM, self.stop),
                               (signal.SIGQUIT, self.stop_fast),
                               (signal.SIGUSR1, self.reopen_logs)):
            signal.signal(signum, lambda n, frame, a=action: self.reactor.callFromThread(a))

    def stop(self) -> None:
        """Stop the reactor once, whoever asks (a signal, the master's
        departure, a failed start), however often."""
        if self.reactor.running and not self._stop_asked:
            self._stop_asked = True
            self.reactor.stop()

    def stop_fast(self) -> None:
        self.service.hurry()
        self.stop()

    def reopen_logs(self) -> None:
        if self.service.site is not None:
            self.service.site.reopen_access_log()

    def master_lost(self) -> None:
        """No orphan keeps serving: drain briefly, and exit in any case
        within L{ORPHAN_EXIT_SECONDS}."""
        if not self.reactor.running:
            return
        self.service.drain_seconds = min(self.service.drain_seconds, ORPHAN_DRAIN_SECONDS)
        self.reactor.callLater(ORPHAN_EXIT_SECONDS, self._exit_now, int(ExitStatus.OK))
        if not self.stopping:
            log.warn("master (pid {pid}) is gone; shutting down",
                     pid=self.environment.master_pid)
            self.stop()

    def _start_cron(self) -> None:
        self.service.start_cron()

    def _set_count(self, count: int) -> None:
        self.service.set_count(count)

    def _start_failed(self, failure: Any) -> None:
        # The master has been told why; exit_status says which failure it was.
        self.stop()

    def run(self) -> int:
        """Connect the control channel, run the reactor; the exit status."""
        from twisted.internet.stdio import StandardIO

        StandardIO(self.control, stdin=CONTROL_TO_WORKER, stdout=CONTROL_FROM_WORKER,
                   reactor=self.reactor)
        self.reactor.callWhenRunning(self.install_signal_handlers)
        self.reactor.callWhenRunning(self.start)
        self.reactor.addSystemEventTrigger("before", "shutdown", self.shutdown)
        self.reactor.run()
        return int(self.service.exit_status)


def traceback_text(failure: Any) -> str:
    """A failure's traceback as Python prints it."""
    error = failure.value
    return "".join(traceback.format_exception(type(error), error, error.__traceback__))


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM us when the master dies (EOF on the control
    channel is the portable signal; this one also reaches a busy worker)."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def main() -> None:
    """Entry point of a worker process; the master sets up fds and env."""
    from twisted.internet import reactor

    from .logs import start_worker_logging

    _die_with_parent()
    start_worker_logging(sys.stdout)
    environment = WorkerEnvironment.from_environ(os.environ)
    slot = None
    if environment.ledger_row is not None:
        # This worker's load, which it shares with the master and the others.
        slot = LedgerSlot(Ledger(LEDGER_FD), environment.ledger_row)
    worker = WorkerProcess(reactor, environment,
                           listen=functools.partial(listen, slot=slot),
                           locality=Locality.of_worker(
                               environment, steered=slot.steering if slot else lambda: True),
                           on_connections=slot.set_open if slot else lambda open: None)
    sys.exit(worker.run())
