"""
The master's end of one worker's control channel: AMP over the pipes the
worker was spawned with (L{txcluster.wire.CONTROL_FROM_WORKER} and
L{txcluster.wire.CONTROL_TO_WORKER}).
"""

from __future__ import annotations

from typing import Callable, Iterable

from twisted.internet.interfaces import IAddress, IProcessTransport, ITransport
from zope.interface import implementer

from ..wire import Heartbeat, QuietAMP, Ready, StartCron, Stopping, WorkerCount


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
