"""
How connections are spread over the workers (C{--balance}).

C{kernel} (every worker accepts on the shared socket): the kernel wakes the
workers and the first to call C{accept()} wins.  Twisted's port accepts up
to 100+ connections per wakeup, so one worker could drain a whole burst;
L{accept_one_per_wakeup} makes each wakeup take one, as tornado and libuv
did for the same problem.  The master stays off the accept path.

C{round-robin} (Node's cluster default): the master accepts and passes each
connection's descriptor to the next ready worker over a Unix socket pair
(C{SCM_RIGHTS}); the worker adopts it with C{adoptStreamConnection}.  Even
under keep-alive, where connections are long-lived and a burst decides the
split for good, and at the cost of one C{accept} and one C{sendmsg} per
connection in the master.  The master still never reads a request's bytes.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any, Callable, List, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from .listening import address_family

log = Logger(namespace="txcluster.balancing")

KERNEL = "kernel"
ROUND_ROBIN = "round-robin"
MODES = (KERNEL, ROUND_ROBIN)

#: Connections the master accepts per wakeup in round-robin mode; also the
#: most descriptors one message to a worker carries (the receiver's limit).
ACCEPT_BATCH = 64

#: While no worker can take a connection (every channel full), the master
#: holds what it accepted, stops accepting, and retries after this many seconds.
RETRY_SECONDS = 0.01


def accept_one_per_wakeup(port: IListeningPort) -> None:
    """Make a Twisted TCP/Unix port accept one connection per reactor wakeup.

    C{tcp.Port.doRead} raises its C{numberAccepts} after every full batch;
    resetting it before each read keeps it at one.
    """
    if not hasattr(port, "numberAccepts"):  # pragma: no cover - not a tcp.Port
        return
    read = port.doRead

    def read_one() -> Any:
        port.numberAccepts = 1
        return read()

    port.doRead = read_one


@implementer(IReadDescriptor)
class ConnectionDispatcher:
    """
    Master side of round-robin: accept on the listening socket and send
    each connection to the next of C{targets()}, the channels of the ready
    workers.  While there is no ready worker, connections wait in the
    kernel's backlog.

    One wakeup accepts what is waiting (up to L{ACCEPT_BATCH}) and sends each
    worker its share in one message.  A connection no worker can take yet
    (every channel full) is held, not dropped: the master stops accepting,
    so the backlog takes the pressure, and retries shortly.
    """

    def __init__(self, reactor: Any, listening_fd: int,
                 targets: Callable[[], List[socket.socket]]) -> None:
        self._reactor = reactor
        self._socket = socket.socket(fileno=os.dup(listening_fd))
        self._socket.setblocking(False)
        self._targets = targets
        self._next = 0
        self._held: List[socket.socket] = []
        self._retry: Optional[Any] = None
        self.reading = False
        self.dispatched = 0

    def fileno(self) -> int:
        return self._socket.fileno()

    def logPrefix(self) -> str:
        return "ConnectionDispatcher"

    @property
    def held(self) -> int:
        """Connections accepted that no worker could take yet."""
        return len(self._held)

    def start(self) -> None:
        """(Re)start accepting; called whenever a worker becomes ready."""
        if self._held:
            self._schedule_retry()  # accepting resumes once they are sent
        elif not self.reading and self._socket.fileno() >= 0:
            self.reading = True
            self._reactor.addReader(self)

    def stop(self) -> None:
        """Stop accepting; what is not accepted stays in the backlog."""
        if self.reading:
            self.reading = False
            self._reactor.removeReader(self)

    def close(self) -> None:
        """Stop for good.  Connections still held are closed, like those
        left in the backlog when the listening socket closes."""
        self.stop()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        for client in self._held:
            client.close()
        if self._held:
            log.warn("closed {n} connections no worker could take", n=len(self._held))
        self._held.clear()
        self._socket.close()  # our copy only: never shutdown()

    def doRead(self) -> None:
        if not self._targets():
            self.stop()  # resumed by start() when a worker is ready
            return
        self._held.extend(self._accept_waiting())
        self._send_held()

    def _accept_waiting(self) -> List[socket.socket]:
        accepted: List[socket.socket] = []
        while len(accepted) < ACCEPT_BATCH:
            try:
                client, _ = self._socket.accept()
            except BlockingIOError:
                break
            except OSError as e:
                # Out of descriptors or memory: try again on the next wakeup.
                # Anything else (ECONNABORTED, EPROTO, ...) concerns that one
                # connection only; accept(2) says to treat it like EAGAIN.
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warn("accept() failed: {error}", error=e)
                    break
                continue
            accepted.append(client)
        return accepted

    def _send_held(self) -> None:
        """Deal the held connections round-robin over the ready workers,
        one message per worker; a worker that cannot take its share (busy,
        gone, over its fd limit) passes it to the next one."""
        targets = self._targets()
        pending, self._held = self._held, []
        while pending and targets:
            shares: List[List[socket.socket]] = [[] for _ in targets]
            for i, client in enumerate(pending):
                shares[(self._next + i) % len(targets)].append(client)
            self._next = (self._next + len(pending)) % len(targets)
            pending = []
            refused = []
            for channel, share in zip(targets, shares):
                if share and self._send(channel, share):
                    continue
                pending += share
                if share:
                    refused.append(channel)
            targets = [t for t in targets if t not in refused]
        self._held = pending
        if self._held:
            self.stop()
            self._schedule_retry()

    def _send(self, channel: socket.socket, clients: List[socket.socket]) -> bool:
        try:
            socket.send_fds(channel, [b"c"], [c.fileno() for c in clients])
        except OSError:
            return False
        for client in clients:
            client.close()  # the worker has its copy
        self.dispatched += len(clients)
        return True

    def _schedule_retry(self) -> None:
        if self._retry is None or not self._retry.active():
            self._retry = self._reactor.callLater(RETRY_SECONDS, self._retry_held)

    def _retry_held(self) -> None:
        self._retry = None
        self._send_held()
        if not self._held:
            self.start()

    def connectionLost(self, reason: Any) -> None:
        """doRead raised: Twisted has dropped us from the reactor."""
        log.failure("the connection dispatcher failed; resuming", reason)
        self.reading = False
        self._reactor.callLater(0.1, self.start)


@implementer(IReadDescriptor, IListeningPort)
class ConnectionReceiver:
    """
    Worker side of round-robin: adopt the connections the master sends.
    Acts as the worker's listening port: C{stopListening} adopts what the
    master already sent, then stops.
    """

    def __init__(self, reactor: Any, channel_fd: int, factory: IProtocolFactory) -> None:
        self._reactor = reactor
        self._channel = socket.socket(fileno=channel_fd)
        self._channel.setblocking(False)
        self._factory = factory
        self._family: Optional[socket.AddressFamily] = None  # one listening socket: one family
        self.adopted = 0

    def fileno(self) -> int:
        return self._channel.fileno()

    def logPrefix(self) -> str:
        return "ConnectionReceiver"

    def startListening(self) -> None:
        self._factory.doStart()
        self._reactor.addReader(self)

    def stopListening(self) -> Deferred:
        if self._channel.fileno() >= 0:
            self._reactor.removeReader(self)
            self.doRead()  # what the master sent before it stopped sending
            self._channel.close()
            self._factory.doStop()
        return succeed(None)

    def getHost(self) -> Any:
        return None

    def doRead(self) -> Optional[Any]:
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(self._channel, ACCEPT_BATCH, ACCEPT_BATCH)
            except BlockingIOError:
                return None
            except OSError as e:
                log.warn("receiving connections failed: {error}", error=e)
                return None
            if flags & socket.MSG_CTRUNC:  # the kernel closed what did not fit
                log.error("a message from the master carried more than {n} connections",
                          n=ACCEPT_BATCH)
            for fd in fds:
                self._adopt(fd)
            if not data:  # the master closed its end: it is gone
                self._reactor.removeReader(self)
                return None

    def _adopt(self, fd: int) -> None:
        try:
            if self._family is None:
                self._family = address_family(fd)
            self._reactor.adoptStreamConnection(fd, self._family, self._factory)
            self.adopted += 1
        except OSError as e:  # the client went away meanwhile
            log.debug("could not adopt a connection: {error}", error=e)
        except Exception:
            log.failure("could not adopt a connection")
        finally:
            os.close(fd)

    def connectionLost(self, reason: Any) -> None:
        """doRead raised: Twisted has dropped us from the reactor."""
        log.failure("receiving connections failed; resuming", reason)
        if self._channel.fileno() >= 0:
            self._reactor.callLater(0.1, self._reactor.addReader, self)

