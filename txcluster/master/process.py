"""
Real worker processes: spawned with C{reactor.spawnProcess}, given the
listening socket and a control channel as extra file descriptors, their
output re-logged under their worker id.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any, Callable, Dict, List, Mapping, Optional

import attr
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

from ..cpus import Pinning
from ..settings import ROUND_ROBIN, STEERED_MODES, Settings
from ..wire import (
    CONNECTIONS_FD, CONTROL_FROM_WORKER, CONTROL_TO_WORKER, LEDGER_FD, LISTEN_FD,
    WorkerEnvironment,
)
from .channel import ChildPipeTransport, MasterSide
from .dispatch import ConnectionDispatcher, WorkerChannel
from .fairshare import LedgerDealer
from .output import LineSplitter, OutputTail
from .sockets import Listeners
from .supervisor import ExitInfo, Worker

log = Logger(namespace="txcluster.master")


class WorkerProcessProtocol(ProcessProtocol):
    """The master's view of one worker process.

    @param channel: where the master sends this worker connections (all of
        them in round-robin), and gets back those it hands back; closed when
        the process ends, after C{release_channel}.
    """

    def __init__(self, worker: Worker, channel: Optional[WorkerChannel] = None,
                 release_channel: Callable[[WorkerChannel], None] = lambda channel: None,
                 takes_back: Callable[[], bool] = lambda: False) -> None:
        self.worker = worker
        self.pid: int = 0
        self.channel = channel
        self._release_channel = release_channel
        self._tail = OutputTail()
        self._control = MasterSide(on_ready=worker.ready, on_heartbeat=worker.heartbeat,
                                   on_stopping=worker.leaving, on_failed=worker.failed,
                                   takes_back=takes_back)
        self._output = {
            1: LineSplitter(self._stdout_line),
            2: LineSplitter(self._stderr_line),
        }

    # ProcessHandle, for the supervisor ----------------------------------------

    def signal(self, signum: int) -> None:
        try:
            self.transport.signalProcess(signum)
        except ProcessExitedAlready:
            pass

    def start_cron(self) -> None:
        self._control.start_cron()

    def tell_count(self, count: int) -> None:
        self._control.tell_count(count)

    def tell_leaving(self) -> None:
        self._control.tell_leaving()

    def output_tail(self) -> List[str]:
        return self._tail.lines()

    # ProcessProtocol ------------------------------------------------------------

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        self.transport.closeStdin()
        self._control.makeConnection(ChildPipeTransport(self.transport, CONTROL_TO_WORKER))

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == CONTROL_FROM_WORKER:
            self._control.dataReceived(data)
        elif childFD in self._output:
            self._output[childFD].feed(data)

    def processEnded(self, reason: Any) -> None:
        for splitter in self._output.values():
            splitter.flush()
        if self.channel is not None:
            self._release_channel(self.channel)
            self.channel.socket.close()
        self.worker.exited(ExitInfo(status=reason.value.exitCode, signal=reason.value.signal))

    def _stdout_line(self, line: str) -> None:
        self._tail.append(line)
        log.info("{line}", line=line, log_system=f"worker {self.worker.id}")

    def _stderr_line(self, line: str) -> None:
        self._tail.append(line)
        log.error("{line}", line=line, log_system=f"worker {self.worker.id}")


class WorkerSpawner:
    """
    Spawn worker processes: C{python -m txcluster.worker} with the
    descriptors and the environment of L{txcluster.wire}.

    @param listeners: the listening sockets, one of which each worker gets
        (not in round-robin mode, where the master accepts).
    @param pinning: with C{--cpu-affinity}, which CPU each worker runs on.
    @param dispatcher: deals connections to the workers' channels, and
        takes back those a worker hands on over its channel.
    @param ledger: reuseport mode: the dealer that keeps the ledger of
        loads each worker keeps its fair share by (L{txcluster.ledger}),
        and gives each process its row.
    """

    def __init__(
        self, reactor: Any, settings: Settings, listeners: Listeners,
        pinning: Optional[Pinning] = None, environ: Mapping[str, str] = os.environ,
        dispatcher: Optional[ConnectionDispatcher] = None,
        ledger: Optional[LedgerDealer] = None,
    ) -> None:
        self._reactor = reactor
        self._settings = settings
        self._listeners = listeners
        self._pinning = pinning
        self._environ = environ
        self._dispatcher = dispatcher
        self._ledger = ledger

    def __call__(self, worker: Worker, count: int) -> WorkerProcessProtocol:
        child_fds: Dict[int, Any] = {
            0: "w", 1: "r", 2: "r", CONTROL_FROM_WORKER: "r", CONTROL_TO_WORKER: "w",
        }
        if self._settings.balance != ROUND_ROBIN:
            child_fds[LISTEN_FD] = self._listeners.fileno(worker.id)
        row = 0
        if self._ledger is not None:
            child_fds[LEDGER_FD] = self._ledger.ledger.fileno()
            row = self._ledger.allocate()
        # Every worker has a connection channel: connections come through it
        # in round-robin, and in every mode those the master accepts for it
        # or that another worker hands back.
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        child_fds[CONNECTIONS_FD] = theirs.fileno()
        channel = WorkerChannel(ours, self._cpu_of(worker.id), worker.id, row)
        dispatcher = self._dispatcher
        protocol = WorkerProcessProtocol(
            worker, channel,
            release_channel=dispatcher.release if dispatcher else (lambda channel: None),
            takes_back=dispatcher.takes_back if dispatcher else (lambda: False))
        try:
            self._spawn(protocol, self.environment(worker.id, count, row), child_fds)
        except BaseException:
            channel.socket.close()
            if dispatcher is not None:
                dispatcher.release(channel)
            raise
        finally:
            theirs.close()  # the worker has its copy now
        if self._pinning is not None:
            self._pin(protocol.pid, worker.id)
        if dispatcher is not None:
            dispatcher.watch(channel)
        return protocol

    def _cpu_of(self, worker_id: int) -> Optional[int]:
        """The CPU worker C{worker_id} runs on, as its channel tells the
        dealer; known before the process exists, so that the channel is
        whole before the protocol is built.  C{None} without --cpu-affinity,
        or where processes cannot be pinned (not Linux: L{_pin} warns).
        Should pinning fail all the same (warned), the dealer only prefers
        that worker for connections received on a CPU it does not run on."""
        if self._pinning is None or not hasattr(os, "sched_setaffinity"):
            return None
        return self._pinning.cpu_of(worker_id)

    def _pin(self, pid: int, worker_id: int) -> None:
        """--cpu-affinity: pin the new process to its CPU (it may have run a
        few instructions elsewhere first, which is harmless)."""
        assert self._pinning is not None
        cpu = self._pinning.cpu_of(worker_id)
        try:
            os.sched_setaffinity(pid, {cpu})
        except (OSError, AttributeError) as e:  # AttributeError: not Linux
            log.warn("could not pin worker {id} to CPU {cpu}: {error}",
                     id=worker_id, cpu=cpu, error=e)
            return
        log.info("worker {id} (pid {pid}) pinned to CPU {cpu}", id=worker_id, pid=pid, cpu=cpu)

    def _spawn(self, protocol: WorkerProcessProtocol, environment: WorkerEnvironment,
               child_fds: Dict[int, Any]) -> None:
        self._reactor.spawnProcess(
            protocol,
            sys.executable,
            [sys.executable, "-m", "txcluster.worker"],
            env=environment.to_environ(self._environ),
            # `python -m` puts this directory first on sys.path, so --app
            # imports the way it would for the user who started twistd.
            path=os.getcwd(),
            childFDs=child_fds,
        )

    def environment(self, worker_id: int, count: int, row: int = 0) -> WorkerEnvironment:
        """What worker C{worker_id} is told (and, with reuseport, its
        process's ledger C{row}).  With --cpu-affinity, a worker whose new
        connections come from its own CPU also learns the CPUs, so that it
        sends back clients that moved (not if the kernel cannot steer them
        to it: each would just be hashed again)."""
        environment = WorkerEnvironment(worker_id, count, os.getpid(), self._settings,
                                        ledger_row=row or None)
        if (self._pinning is not None and self._settings.balance in STEERED_MODES
                and self._listeners.steers(worker_id)):
            environment = attr.evolve(environment, home_cpu=self._pinning.cpu_of(worker_id),
                                      cpus=self._pinning.cpus)
        return environment
