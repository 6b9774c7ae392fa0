"""
The master's end of one worker's control channel: AMP over the pipes the
worker was spawned with (L{txcluster.wire.CONTROL_FROM_WORKER} and
L{txcluster.wire.CONTROL_TO_WORKER}).
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

from twisted.internet.interfaces import IAddress, IProcessTransport, ITransport
from zope.interface import implementer

from ..wire import (
    Failed, Goodbye, Heartbeat, Leaving, QuietAMP, Ready, StartCron, Stopping, WorkerCount,
    WorkerStats,
)

#: on_failed(status, summary, details)
OnFailed = Callable[[int, str, str], None]


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


class MasterSide(QuietAMP):
    """The master's end of one worker's channel."""

    def __init__(self, on_ready: Callable[[], None],
                 on_heartbeat: Callable[[Optional[WorkerStats]], None],
                 on_stopping: Callable[[], None], on_failed: Optional[OnFailed] = None,
                 takes_back: Callable[[], bool] = lambda: False):
        super().__init__()
        self._takes_back = takes_back
        self._on_ready = on_ready
        self._on_heartbeat = on_heartbeat
        self._on_stopping = on_stopping
        self._on_failed = on_failed or (lambda status, summary, details: None)

    @Ready.responder
    def ready(self) -> dict:
        self._on_ready()
        return {}

    @Heartbeat.responder
    def heartbeat(self, stats: Optional[str] = None) -> dict:
        self._on_heartbeat(None if stats is None else WorkerStats.from_json(stats))
        return {}

    @Goodbye.responder
    def goodbye(self, stats: str) -> dict:
        self._on_heartbeat(WorkerStats.from_json(stats))
        return {}

    @Failed.responder
    def failed(self, status: int, summary: str, details: str) -> dict:
        self._on_failed(status, summary, details)
        return {}

    @Stopping.responder
    def stopping(self) -> dict:
        self._on_stopping()
        return {"take_back": self._takes_back()}

    def start_cron(self) -> None:
        self.callRemote(StartCron)

    def tell_leaving(self) -> None:
        self.callRemote(Leaving)

    def tell_count(self, count: int) -> None:
        self.callRemote(WorkerCount, count=count)
