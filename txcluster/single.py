"""
C{--single}: no workers.  The app, its hooks and its cron jobs run in the
process that bound the port, which otherwise behaves like a master
(signals, exit status).
"""

from __future__ import annotations

import os
from typing import Any, Optional

from twisted.logger import Logger

from .app import WorkerInfo
from .master.service import SignalledService
from .master.sockets import bind, close_our_copy, describe
from .settings import Settings
from .worker.listen import adopt, wrapped
from .worker.service import WorkerService

log = Logger(namespace="txcluster.master")


class SingleProcessService(SignalledService):
    """Serve the app in this process on the socket bound by L{build_single}."""

    def __init__(self, reactor: Any, settings: Settings, listening: Any) -> None:
        super().__init__(reactor, settings)
        self.listening = listening
        fd = listening.fileno()
        self.worker = WorkerService(
            reactor, settings, WorkerInfo(id=1, count=1, pid=os.getpid()),
            listen=lambda site: adopt(reactor, fd, wrapped(reactor, site, settings.listen)),
            on_ready=self._ready,
        )

    def startService(self) -> None:
        super().startService()
        log.info("txcluster (pid {pid}) listening on {address}, single process",
                 pid=os.getpid(), address=describe(self.listening))
        self.worker.started.addErrback(self._start_failed)
        self.worker.setServiceParent(self)

    def stopService(self) -> Any:
        # The socket this process bound: closed first, so that new
        # connections are refused at once while the drain goes on.
        close_our_copy(self.listening)
        return super().stopService()

    def announce_leaving(self) -> None:
        if self.worker.site is not None:
            self.worker.site.leaving = True

    def reopen_app_logs(self) -> None:
        if self.worker.site is not None:
            self.worker.site.reopen_access_log()

    def stop_fast(self) -> None:
        self.worker.hurry()
        super().stop_fast()

    def stop_now(self) -> None:
        log.warn("stopping now: dropping open connections")
        if self.worker.site is not None:
            self.worker.site.abort()

    def _ready(self) -> None:
        log.info("ready")
        self.worker.start_cron()
        self.systemd.ready(f"ready on {describe(self.listening)}")

    def _start_failed(self, failure: Optional[Any]) -> None:
        self.exit_status = self.worker.exit_status
        self.stop_reactor()


def build_single(reactor: Any, settings: Settings) -> SingleProcessService:
    """@raise txcluster.master.sockets.StartupError: C{--listen} cannot be bound."""
    return SingleProcessService(reactor, settings, bind(reactor, settings.listen, settings.backlog))
