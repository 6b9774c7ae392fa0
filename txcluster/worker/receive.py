"""
The worker's side of its connection channel
(L{txcluster.wire.CONNECTIONS_FD}): adopt the connections the master sends
(every connection in round-robin; in the other modes those it accepted for
this worker or another worker handed back), and hand idle ones back.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable, Optional, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from ..wire import ACCEPT_BATCH, receive_connections, send_connections

log = Logger(namespace="txcluster.worker")

#: How long the receiver waits before reading again after its doRead raised.
PAUSE_SECONDS = 0.1


def adopt_connection(reactor: Any, fd: int, family: socket.AddressFamily,
                     factory: IProtocolFactory) -> bool:
    """Serve the accepted connection C{fd} with C{factory}, and close
    C{fd} (Twisted adopts a copy); False if it could not be adopted (the
    client went away meanwhile, say), which is logged."""
    try:
        reactor.adoptStreamConnection(fd, family, factory)
        return True
    except OSError as e:  # the client went away meanwhile
        log.debug("could not adopt a connection: {error}", error=e)
    except Exception:
        log.failure("could not adopt a connection")
    finally:
        os.close(fd)
    return False


def address_family(fd: int) -> socket.AddressFamily:
    """The address family of a socket descriptor."""
    probe = socket.socket(fileno=fd)
    try:
        return probe.family
    finally:
        probe.detach()


@implementer(IReadDescriptor, IListeningPort)
class ConnectionReceiver:
    """
    Adopt the connections the master sends.  A listening port (in
    round-robin, the worker's only one): C{stopListening} adopts what the
    master already sent, then stops.
    """

    def __init__(self, reactor: Any, channel_fd: int, factory: IProtocolFactory,
                 on_received: Callable[[int], None] = lambda n: None) -> None:
        """
        @param on_received: told how many connections came in each message,
            before any is read from (reuseport: the master keeps a copy of
            each until then, L{txcluster.ledger})
        """
        self._reactor = reactor
        self._on_received = on_received
        self._channel = socket.socket(fileno=channel_fd)
        self._channel.setblocking(False)
        self._factory = factory
        self._family: Optional[socket.AddressFamily] = None  # one listening socket: one family
        self._stopped = False
        self.adopted = 0

    def fileno(self) -> int:
        return self._channel.fileno()

    def logPrefix(self) -> str:
        return "ConnectionReceiver"

    def startListening(self) -> None:
        self._factory.doStart()
        self._reactor.addReader(self)

    def stopListening(self) -> Deferred:
        if self._channel.fileno() >= 0 and not self._stopped:
            self._stopped = True
            self._reactor.removeReader(self)
            # The master may not know yet that this worker is stopping (say,
            # systemd sent SIGTERM to every process): from now on its sends
            # fail, and it deals those connections to another worker.
            self._channel.shutdown(socket.SHUT_RD)
            self.doRead()  # what the master sent before
            self._factory.doStop()
            # The channel stays open the other way, for hand_back().
        return succeed(None)

    def hand_back(self, fd: int) -> bool:
        """Send the connection C{fd} back to the master, which deals it to
        another worker; False if it cannot take it."""
        return self.hand_on([fd])

    def hand_on(self, fds: Sequence[int]) -> bool:
        """Send the connections C{fds} to the master in one message, for it
        to deal; False if it cannot take them.  The caller closes its copies."""
        try:
            send_connections(self._channel, fds)
        except OSError:
            return False
        return True

    def getHost(self) -> Any:
        return None

    def doRead(self) -> Optional[Any]:
        while True:
            try:
                received = receive_connections(self._channel)
            except BlockingIOError:
                return None
            except OSError as e:
                log.warn("receiving connections failed: {error}", error=e)
                return None
            if received.truncated:  # the kernel closed what did not fit
                log.error("connections lost: the message from the master was truncated "
                          "(this worker is out of file descriptors, or more than {n} "
                          "came at once)", n=ACCEPT_BATCH)
            if received.fds:
                self._on_received(len(received.fds))
            for fd in received.fds:
                self._adopt(fd)
            if received.closed:  # the master closed its end: it is gone
                self._reactor.removeReader(self)
                return None

    def _adopt(self, fd: int) -> None:
        if self._family is None:
            try:
                self._family = address_family(fd)
            except OSError as e:  # the client went away meanwhile
                log.debug("could not adopt a connection: {error}", error=e)
                os.close(fd)
                return
        if adopt_connection(self._reactor, fd, self._family, self._factory):
            self.adopted += 1

    def connectionLost(self, reason: Any) -> None:
        """doRead raised: Twisted has dropped us from the reactor."""
        log.failure("receiving connections failed; resuming", reason)
        if self._channel.fileno() >= 0:
            self._reactor.callLater(PAUSE_SECONDS, self._reactor.addReader, self)
