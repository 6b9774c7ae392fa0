"""
The control channel between the master and each worker: AMP over a pipe
pair that the master passes to the worker as extra file descriptors.

The worker reports C{Ready} and sends a C{Heartbeat}; the master tells the
one worker that should run cron jobs to C{StartCron}.  EOF on the channel
tells a worker that its master is gone.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, Callable, Iterable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IProcessTransport, ITransport
from twisted.protocols import amp
from zope.interface import implementer


class ExitStatus(IntEnum):
    """Exit codes, after gunicorn's."""

    OK = 0
    CRASH_LOOP = 1  # the master gave up on a crash loop
    BOOT_ERROR = 3  # a startup hook failed, or the port could not be adopted
    APP_LOAD_ERROR = 4  # --app could not be imported or is not servable


def heartbeat_interval(timeout: float) -> float:
    """How often a worker beats (and the master checks), for a silence
    C{timeout}: often enough that one late beat never looks like a hang."""
    return max(0.05, min(1.0, timeout / 5))


#: File descriptors as the worker sees them.
LISTEN_FD = 3
CONTROL_FROM_WORKER = 4  # the worker writes, the master reads
CONTROL_TO_WORKER = 5  # the master writes, the worker reads
CONNECTIONS_FD = 6  # --balance round-robin: connections from the master


class Ready(amp.Command):
    """Worker -> master: the port is adopted, the app is serving."""

    requiresAnswer = False


class Heartbeat(amp.Command):
    """Worker -> master: the reactor is alive."""

    requiresAnswer = False


class Stopping(amp.Command):
    """Worker -> master: I am shutting down; send me no more connections.
    The answer means the master has taken the worker out of its rotation."""


class WorkerCount(amp.Command):
    """Master -> worker: the cluster now has C{count} workers."""

    arguments = [(b"count", amp.Integer())]
    requiresAnswer = False


class StartCron(amp.Command):
    """Master -> worker: you are worker 1 now; start the cron jobs."""

    requiresAnswer = False


@implementer(IAddress)
class PipeAddress:
    """Either end of a control pipe: it has no address."""

    def __repr__(self) -> str:
        return "PipeAddress()"


@implementer(ITransport)
class ChildPipeTransport:
    """Writes to one of a child's pipes, so AMP can run over it."""

    def __init__(self, process: IProcessTransport, fd: int) -> None:
        self._process = process
        self._fd = fd

    def write(self, data: bytes) -> None:
        self._process.writeToChild(self._fd, data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        self._process.closeChildFD(self._fd)

    def getPeer(self) -> PipeAddress:
        return PipeAddress()

    def getHost(self) -> PipeAddress:
        return PipeAddress()


class _QuietAMP(amp.AMP):
    """AMP without its connection established/lost log lines: the master
    logs each worker's start and exit itself."""

    def makeConnection(self, transport: ITransport) -> None:
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)


class MasterSide(_QuietAMP):
    """The master's end of one worker's channel."""

    def __init__(self, on_ready: Callable[[], None], on_heartbeat: Callable[[], None],
                 on_stopping: Callable[[], None]):
        super().__init__()
        self._on_ready = on_ready
        self._on_heartbeat = on_heartbeat
        self._on_stopping = on_stopping

    @Ready.responder
    def ready(self) -> dict:
        self._on_ready()
        return {}

    @Heartbeat.responder
    def heartbeat(self) -> dict:
        self._on_heartbeat()
        return {}

    @Stopping.responder
    def stopping(self) -> dict:
        self._on_stopping()
        return {}

    def start_cron(self) -> None:
        self.callRemote(StartCron)

    def tell_count(self, count: int) -> None:
        self.callRemote(WorkerCount, count=count)


class WorkerSide(_QuietAMP):
    """A worker's end of its channel to the master."""

    def __init__(self, on_start_cron: Callable[[], None], on_master_lost: Callable[[], None],
                 on_count: Callable[[int], None]):
        super().__init__()
        self._on_start_cron = on_start_cron
        self._on_master_lost = on_master_lost
        self._on_count = on_count

    @StartCron.responder
    def start_cron(self) -> dict:
        self._on_start_cron()
        return {}

    @WorkerCount.responder
    def worker_count(self, count: int) -> dict:
        self._on_count(count)
        return {}

    def report_ready(self) -> None:
        self.callRemote(Ready)

    def heartbeat(self) -> None:
        self.callRemote(Heartbeat)

    def report_stopping(self, clock: Any, timeout: float = 1.0) -> Deferred:
        """Tell the master we are stopping; fires once it has answered
        (or after C{timeout}, or at once if the master is gone)."""
        return (self.callRemote(Stopping).addTimeout(timeout, clock)
                .addErrback(lambda failure: None))

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)
        self._on_master_lost()
