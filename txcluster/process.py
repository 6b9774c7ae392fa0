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

from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

from .balancing import ROUND_ROBIN, STEERED_MODES, Locality, WorkerChannel, cpu_for
from .control import (
    CONNECTIONS_FD, CONTROL_FROM_WORKER, CONTROL_TO_WORKER, LISTEN_FD, ChildPipeTransport,
    MasterSide,
)
from .logs import LineSplitter, OutputTail
from .options import SETTINGS_VARIABLE, Settings
from .supervisor import ExitInfo, Worker

log = Logger(namespace="txcluster.master")


class WorkerProcessProtocol(ProcessProtocol):
    """The master's view of one worker process."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.pid: int = 0
        #: round-robin mode: where the master sends this worker its connections
        self.channel: Optional[WorkerChannel] = None
        self._tail = OutputTail()
        self._control = MasterSide(on_ready=worker.ready, on_heartbeat=worker.heartbeat,
                                   on_stopping=worker.leaving)
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
            self.channel.socket.close()
        self.worker.exited(ExitInfo(status=reason.value.exitCode, signal=reason.value.signal))

    def _stdout_line(self, line: str) -> None:
        self._tail.append(line)
        log.info("{line}", line=line, log_system=f"worker {self.worker.id}")

    def _stderr_line(self, line: str) -> None:
        self._tail.append(line)
        log.error("{line}", line=line, log_system=f"worker {self.worker.id}")


class WorkerSpawner:
    """Spawn worker processes.

    @param listen_fd: the listening descriptor worker C{worker_id} accepts
        on (not used in round-robin mode).
    @param steered: with --cpu-affinity, whether worker C{worker_id}'s new
        connections come from its own CPU, so that it should send back
        clients that moved (not if the kernel cannot steer them).
    """

    def __init__(
        self, reactor: Any, settings: Settings, listen_fd: Callable[[int], int],
        environ: Mapping[str, str] = os.environ,
        steered: Callable[[int], bool] = lambda worker_id: True,
    ) -> None:
        self._reactor = reactor
        self._settings = settings
        self._listen_fd = listen_fd
        self._steered = steered
        self._environ = environ
        #: the master's usable CPUs, which workers inherit and --cpu-affinity splits
        self._cpus = sorted(os.sched_getaffinity(0))

    def __call__(self, worker: Worker, count: int) -> WorkerProcessProtocol:
        child_fds: Dict[int, Any] = {
            0: "w", 1: "r", 2: "r", CONTROL_FROM_WORKER: "r", CONTROL_TO_WORKER: "w",
        }
        ours = theirs = None
        if self._settings.balance == ROUND_ROBIN:
            ours, theirs = socket.socketpair()
            ours.setblocking(False)
            child_fds[CONNECTIONS_FD] = theirs.fileno()
        else:
            child_fds[LISTEN_FD] = self._listen_fd(worker.id)
        protocol = WorkerProcessProtocol(worker)
        try:
            self._spawn(protocol, worker.id, count, child_fds)
        except BaseException:
            if ours is not None:
                ours.close()
            raise
        finally:
            if theirs is not None:
                theirs.close()  # the worker has its copy now
        cpu = self._pin(protocol.pid, worker.id) if self._settings.cpu_affinity else None
        if ours is not None:
            protocol.channel = WorkerChannel(ours, cpu)
        return protocol

    def _pin(self, pid: int, worker_id: int) -> Optional[int]:
        """--cpu-affinity: pin the new process to its CPU (it may have run a
        few instructions elsewhere first, which is harmless)."""
        cpu = self.cpu_of(worker_id)
        try:
            os.sched_setaffinity(pid, {cpu})
        except OSError as e:
            log.warn("could not pin worker {id} to CPU {cpu}: {error}",
                     id=worker_id, cpu=cpu, error=e)
            return None
        log.info("worker {id} (pid {pid}) pinned to CPU {cpu}", id=worker_id, pid=pid, cpu=cpu)
        return cpu

    def cpu_of(self, worker_id: int) -> int:
        """The CPU --cpu-affinity pins worker C{worker_id} to."""
        return cpu_for(worker_id, self._cpus)

    def _spawn(self, protocol: WorkerProcessProtocol, worker_id: int, count: int,
               child_fds: Dict[int, Any]) -> None:
        self._reactor.spawnProcess(
            protocol,
            sys.executable,
            [sys.executable, "-m", "txcluster.worker"],
            env=self.environment(worker_id, count),
            # `python -m` puts this directory first on sys.path, so --app
            # imports the way it would for the user who started twistd.
            path=os.getcwd(),
            childFDs=child_fds,
        )

    def environment(self, worker_id: int, count: int) -> Dict[str, str]:
        env = dict(self._environ)
        env.update(
            TXCLUSTER_WORKER_ID=str(worker_id),
            TXCLUSTER_WORKERS=str(count),
            TXCLUSTER_MASTER_PID=str(os.getpid()),
            PYTHONUNBUFFERED="1",
        )
        env[SETTINGS_VARIABLE] = self._settings.to_json()
        if (self._settings.cpu_affinity and self._settings.balance in STEERED_MODES
                and self._steered(worker_id)):
            home = self.cpu_of(worker_id)
            env.update(Locality(home, tuple(self._cpus), count).to_environment())
        return env
