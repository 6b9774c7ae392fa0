"""
C{--balance reuseport} (and so C{auto}), the worker's side: accept on this
worker's own socket, and keep only a fair share.

The kernel picks which socket of the group a connection goes to: with
C{--cpu-affinity}, the one of the worker on the CPU that received it,
which keeps a client and its worker on one CPU, and no other process
touches the connection.  But the kernel knows nothing of the workers'
load, so each worker keeps a connection only while it is not busier than
the least loaded (L{txcluster.ledger.keeps}), and hands the others to the
master over its connection channel, which deals them to the least loaded.
Where clients are spread over the CPUs, almost every connection stays
where the kernel put it; where they are not (one client thread, one
receive queue), the master deals a part of them, as round-robin deals all.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable, List, Sequence

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from ..accepting import accept_waiting
from ..ledger import RATE_WINDOW, LedgerSlot, served_slack, share
from ..wire import ACCEPT_BATCH
from .receive import adopt_connection

log = Logger(namespace="txcluster.worker")

#: After accept() fails for another reason than one connection's (out of
#: descriptors, say), stop accepting for this long.
PAUSE_SECONDS = 0.1


@implementer(IReadDescriptor, IListeningPort)
class FairShareAcceptor:
    """
    Accept on the listening socket C{fd} (this process's copy: closed when
    it stops), keep this worker's fair share of the connections and give
    the rest to C{hand_on} (which returns False if the master cannot take
    them: they are then kept).

    Kept connections are adopted with C{reactor.adoptStreamConnection},
    the way round-robin adopts what the master sends.
    """

    def __init__(self, reactor: Any, fd: int, factory: IProtocolFactory, slot: LedgerSlot,
                 hand_on: Callable[[Sequence[int]], bool]) -> None:
        self._reactor = reactor
        self._socket = socket.socket(fileno=fd)
        self._socket.setblocking(False)
        self._family = self._socket.family
        self._factory = factory
        self._slot = slot
        self._hand_on = hand_on
        self._window_start = reactor.seconds()
        self._in_window = 0
        self._last_window = 0
        self._listening = False

    def fileno(self) -> int:
        return self._socket.fileno()

    def logPrefix(self) -> str:
        return "FairShareAcceptor"

    def getHost(self) -> Any:
        """The address this worker's socket listens on (an IPv4Address or
        IPv6Address, as a Twisted TCP port says)."""
        host, port = self._socket.getsockname()[:2]
        kind = IPv6Address if self._family == socket.AF_INET6 else IPv4Address
        return kind("TCP", host, port)

    def startListening(self) -> None:
        self._factory.doStart()
        self._resume()

    def stopListening(self) -> None:
        """Stop accepting and close this process's copy of the socket
        (the master's keeps it open: what waits in it is not lost)."""
        if self._socket.fileno() < 0:
            return
        self._pause()
        self._socket.close()
        self._factory.doStop()

    def _resume(self) -> None:
        if not self._listening and self._socket.fileno() >= 0:
            self._listening = True
            self._reactor.addReader(self)

    def _pause(self) -> None:
        if self._listening:
            self._listening = False
            self._reactor.removeReader(self)

    def accepted_last_window(self) -> int:
        """How many connections this worker accepted in the last full
        L{RATE_WINDOW} (none if that was longer ago)."""
        now = self._reactor.seconds()
        if now - self._window_start >= RATE_WINDOW:
            windows = (now - self._window_start) // RATE_WINDOW
            self._last_window = self._in_window if windows == 1 else 0
            self._in_window = 0
            self._window_start += windows * RATE_WINDOW
        return self._last_window

    def doRead(self) -> None:
        fds = self._accept_waiting()
        if not fds:
            return
        loads = self._slot.loads()
        slack = served_slack(self.accepted_last_window(), loads)
        self._in_window += len(fds)
        keeps = share(loads, self._slot.row, len(fds), slack)
        # Kept first: the master deals what it is handed by the ledger,
        # which must already count them, or it could deal them back here.
        self._keep([fd for fd, keep in zip(fds, keeps) if keep])
        on = [fd for fd, keep in zip(fds, keeps) if not keep]
        if not on:
            return
        if self._hand_on(on):
            for fd in on:
                os.close(fd)  # the master has its copy
        else:  # the master cannot take them: better here than nowhere
            self._keep(on)

    def _keep(self, fds: Sequence[int]) -> None:
        """Count C{fds} as this worker's (served, and open once adopted)
        and serve them."""
        if not fds:
            return
        self._slot.add_kept(len(fds))
        for fd in fds:
            adopt_connection(self._reactor, fd, self._family, self._factory)

    def _accept_waiting(self) -> List[int]:
        accepted, error = accept_waiting(self._socket, ACCEPT_BATCH)
        if error is not None:
            log.warn("accept() failed: {error}; pausing", error=error)
            self._pause()
            self._reactor.callLater(PAUSE_SECONDS, self._resume)
        return accepted

    def connectionLost(self, reason: Any) -> None:
        """doRead raised: Twisted has dropped us from the reactor."""
        log.failure("accepting failed; resuming", reason)
        self._listening = False
        self._reactor.callLater(PAUSE_SECONDS, self._resume)

